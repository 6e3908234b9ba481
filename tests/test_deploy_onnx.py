"""ONNX export: onnxruntime's probabilities, anomaly scores and maps equal fewvision's to 1e-4 for every exportable
head, and ``predict`` / ``anomaly predict`` write the same columns from an exported model."""

import csv
import shutil

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import run_cli
from safetensors.torch import save_file

from fewvision.backbones import create_backbone
from fewvision.deploy.onnx import ExportError, export_onnx, predict_onnx, score_onnx
from fewvision.modelfile import ModelFileError, save_model
from fewvision.tasks import anomaly as anomaly_tasks
from fewvision.tasks import fewshot

pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-4  # the issue's parity bound: absolute below 1, relative above
# Of the 12 test images, those whose label must agree (top two classes > 2 x TOLERANCE apart) at the least;
# measured: all 12 for every head below (smallest top-two gap 0.0012, tip-f).
MIN_CLEAR = 10


def worst(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.abs(a - b) / np.maximum(1.0, np.abs(b))).max())


@pytest.fixture(scope="module")
def tiny_clip_weights(tmp_path_factory, tiny_clip_config):
    """The tiny CLIP with a weight file (not the seeded init, so the export must carry these values)."""
    init = create_backbone(f"openclip:{tiny_clip_config}")
    torch.manual_seed(3)
    state = {k: (v + 0.02 * torch.randn_like(v)) if v.is_floating_point() else v
             for k, v in init.model.state_dict().items()}
    path = tmp_path_factory.mktemp("clip-weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return f"openclip:{tiny_clip_config}@{path}"


@pytest.fixture(scope="module")
def test_images(textile_subset):
    return sorted(p for p in textile_subset.rglob("*.jpg"))[::3]


def _export(tmp_path, model, name):
    save_model(tmp_path / f"{name}.fvm", model)
    manifest = export_onnx(tmp_path / f"{name}.fvm", tmp_path / f"{name}.onnx")
    return tmp_path / f"{name}.onnx", manifest


CLASSIFIERS = [("prototype", {}), ("linear", {}), ("tip", {}), ("tip-f", {"epochs": 2}),
               ("clip-adapter", {"epochs": 3}), ("coop", {"steps": 3, "n_ctx": 2}), ("zeroshot", {}),
               ("prolip", {"steps": 3})]


@pytest.mark.parametrize("method,params", CLASSIFIERS, ids=[m for m, _ in CLASSIFIERS])
def test_every_exportable_classifier_gives_fewvisions_probabilities(tmp_path, tiny_clip_weights, textile_subset,
                                                                     test_images, method, params):
    model = fewshot.fit(textile_subset, method, backbone=tiny_clip_weights, shots=4, use_cache=False, **params)
    path, manifest = _export(tmp_path, model, method)
    assert manifest["parity"] <= TOLERANCE
    expected = fewshot.predict(model, test_images, use_cache=False)
    got = predict_onnx(path, test_images)
    assert [r["path"] for r in got.rows] == [r["path"] for r in expected.rows] and len(got.rows) == len(test_images)
    names = model.class_names
    want = np.array([[r["probabilities"][n] for n in names] for r in expected.rows])
    have = np.array([[r["probabilities"][n] for n in names] for r in got.rows])
    assert np.abs(want - have).max() <= TOLERANCE
    assert want.std(0).max() > 1e-3  # the probabilities vary across images: the check is not vacuous
    # Labels agree on every image whose top two classes are further apart than the parity bound allows to swap.
    top = np.sort(want, 1)
    clear = top[:, -1] - top[:, -2] > 2 * TOLERANCE
    assert clear.sum() >= MIN_CLEAR, (method, int(clear.sum()))
    assert [r["label"] for r, c in zip(got.rows, clear) if c] == [r["label"] for r, c in zip(expected.rows, clear) if c]


def test_calibration_and_prediction_sets_come_through_the_export(tmp_path, tiny_clip_weights, textile_subset,
                                                                 test_images):
    model = fewshot.fit(textile_subset, "linear", backbone=tiny_clip_weights, shots=6, calibrate_fraction=0.4,
                        alpha=0.2, use_cache=False)
    assert model.decision.get("temperature") and model.decision.get("conformal")
    path, _ = _export(tmp_path, model, "calibrated")
    expected = fewshot.predict(model, test_images, abstain=True, use_cache=False)
    got = predict_onnx(path, test_images, abstain=True)
    assert [(r["label"], r.get("set"), r.get("review_reason")) for r in got.rows] == \
        [(r["label"], r.get("set"), r.get("review_reason")) for r in expected.rows]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory, textile_root):
    folder = tmp_path_factory.mktemp("good")
    for p in sorted((textile_root / "nominal").glob("*.jpg"))[:10]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def anomaly_images(textile_root):
    return sorted((textile_root / "local").glob("*.jpg"))[:3] + sorted((textile_root / "nominal").glob("*.jpg"))[10:12]


ANOMALY = [("patchcore", "timm:resnet18@random"), ("padim", "timm:resnet18@random"), ("patchcore", "clip"),
           ("anomalydino", "timm:resnet18@random")]
# AnomalyDINO without its rotated copies here: 8 x the bank would make this one test 30 s; the graph is the same.
PARAMS = {"anomalydino": {"rotate": False}}


@pytest.mark.parametrize("method,spec", ANOMALY, ids=[f"{m}-{s.split(':')[0]}" for m, s in ANOMALY])
def test_anomaly_exports_give_fewvisions_scores_and_maps(tmp_path, tiny_clip_weights, good_folder,
                                                                      anomaly_images, method, spec):
    spec = tiny_clip_weights if spec == "clip" else spec
    model = anomaly_tasks.fit_anomaly([good_folder], method=method, backbone=spec, use_cache=False,
                                      target_false_reject=0.2, **PARAMS.get(method, {}))
    path, manifest = _export(tmp_path, model, method)
    assert manifest["parity"] <= TOLERANCE
    expected = anomaly_tasks.score_files(model, anomaly_images, use_cache=False)
    got = score_onnx(path, anomaly_images)
    assert worst(got.scores, expected.scores) <= TOLERANCE
    assert worst(got.maps, expected.maps) <= TOLERANCE
    assert expected.maps.std() > 1e-3 and expected.scores.std() > 1e-4
    assert [(r["verdict"], r["x"], r["y"]) for r in got.rows] == [(r["verdict"], r["x"], r["y"]) for r in expected.rows]


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_and_anomaly_predict_take_the_onnx_file(monkeypatch, capsys, tmp_path, tiny_clip_weights,
                                                        textile_subset, good_folder, anomaly_images):
    fvm, onnx_file = tmp_path / "c.fvm", tmp_path / "c.onnx"
    assert run_cli(monkeypatch, capsys, "fit", textile_subset, "--method", "prototype", "--backbone",
                   tiny_clip_weights, "--shots", "3", "-o", fvm)[0] == 0
    code, out, err = run_cli(monkeypatch, capsys, "export", fvm, "--format", "onnx", "-o", onnx_file)
    assert code == 0, err
    assert "onnxruntime matches fewvision" in out
    for source, target in ((fvm, "fvm.csv"), (onnx_file, "onnx.csv")):
        code, _, err = run_cli(monkeypatch, capsys, "predict", source, textile_subset, "-o", tmp_path / target,
                               "--no-cache")
        assert code == 0, err
    a, b = _csv(tmp_path / "fvm.csv"), _csv(tmp_path / "onnx.csv")
    assert list(a[0]) == list(b[0]) and [r["label"] for r in a] == [r["label"] for r in b]
    for ra, rb in zip(a, b):
        for c in (c for c in ra if c.startswith("p_")):
            assert float(ra[c]) == pytest.approx(float(rb[c]), abs=TOLERANCE)

    afvm, aonnx = tmp_path / "a.fvm", tmp_path / "a.onnx"
    assert run_cli(monkeypatch, capsys, "anomaly", "fit", good_folder, "--backbone", "timm:resnet18@random",
                   "-o", afvm)[0] == 0
    assert run_cli(monkeypatch, capsys, "export", afvm, "-o", aonnx)[0] == 0
    for source, target in ((afvm, "afvm.csv"), (aonnx, "aonnx.csv")):
        code, _, err = run_cli(monkeypatch, capsys, "anomaly", "predict", source, *anomaly_images, "-o",
                               tmp_path / target, "--heatmaps", tmp_path / f"maps-{target}", "--no-cache")
        assert code == 0, err
    a, b = _csv(tmp_path / "afvm.csv"), _csv(tmp_path / "aonnx.csv")
    assert list(a[0]) == list(b[0])
    assert [(r["verdict"], r["x"], r["y"]) for r in a] == [(r["verdict"], r["x"], r["y"]) for r in b]
    assert len(list((tmp_path / "maps-aonnx.csv").glob("*.png"))) == len(anomaly_images)
    # Each kind of exported model is sent to its own command.
    code, _, err = run_cli(monkeypatch, capsys, "predict", aonnx, *anomaly_images)
    assert code == 2 and "anomaly predict" in err


def test_what_cannot_be_exported_is_refused_in_one_line(monkeypatch, capsys, tmp_path, textile_subset):
    texture = tmp_path / "t.fvm"
    save_model(texture, fewshot.fit(textile_subset, "prototype", backbone="texture", shots=2))
    code, _, err = run_cli(monkeypatch, capsys, "export", texture, "-o", tmp_path / "t.onnx")
    assert code == 2 and err.count("\n") == 1 and "texture backbone cannot be exported" in err
    assert not (tmp_path / "t.onnx").exists()
    with pytest.raises(ExportError, match="'with-good' cannot be exported"):
        model = fewshot.fit(textile_subset, "prototype", backbone="timm:resnet18@random", shots=2,
                            good=[textile_subset / "nominal"], good_method="padim")
        save_model(tmp_path / "g.fvm", model)
        export_onnx(tmp_path / "g.fvm", tmp_path / "g.onnx")
    plain = tmp_path / "plain.onnx"
    onnx.save_model(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["pixels"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])), str(plain))
    code, _, err = run_cli(monkeypatch, capsys, "predict", plain, textile_subset)
    assert code == 2 and "not one exported by 'fewvision export'" in err


# The int8 PaDiM below on its 24 check images (12 good, 12 local; an AUROC step is 1/144). Its drop depends on the
# CPU's int8 kernels (measured 6/144 on one AMD EPYC, 0/144 on another with AVX-512 VNNI), so the test measures it
# first and tries the gate half a step either side of it.
HALF_STEP = 0.5 / 144


@pytest.mark.slow
def test_int8_is_calibrated_on_the_users_images_and_gated_on_the_auroc_change(tmp_path, good_folder, textile_root):
    from sklearn.metrics import roc_auc_score

    from fewvision.deploy.onnx import load_onnx, quantize_int8

    # 20 of PaDiM's channels (default 100): the int8 calibration, the gate and every file write stay small
    model = anomaly_tasks.fit_anomaly([good_folder], method="padim", backbone="timm:resnet18@random",
                                      use_cache=False, n_features=20)
    path, _ = _export(tmp_path, model, "padim")
    check = tmp_path / "check"
    for label, source, part in (("good", "nominal", slice(20, 32)), ("local", "local", slice(0, 12))):
        (check / label).mkdir(parents=True)
        for p in sorted((textile_root / source).glob("*.jpg"))[part]:
            shutil.copy(p, check / label / p.name)
    int8_path = tmp_path / "padim-int8.onnx"
    q = quantize_int8(path, int8_path, check, max_drop=1.0)["int8"]
    int8 = load_onnx(int8_path)
    assert int8.manifest["int8"]["calibration_images"] == 24 and q["metric"] == "AUROC" and q["images"] == 24
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8_path)).graph.node)
    images = sorted(check.rglob("*.jpg"))
    auroc, scores = {}, {}
    for file, reported in ((path, q["fp32"]), (int8_path, q["int8"])):
        res = score_onnx(file, images, keep_maps=False)
        truth = [r["path"].split("/")[-2] == "local" for r in res.rows]
        auroc[file], scores[file] = roc_auc_score(truth, [r["score"] for r in res.rows]), res.scores
        assert auroc[file] == pytest.approx(reported, abs=1e-9)
    assert 0 < np.abs(scores[int8_path] - scores[path]).max() < 0.2 * np.abs(scores[path]).max()  # quantised, close
    drop = auroc[path] - auroc[int8_path]
    # Just below this model's drop: refused, and nothing is written. Just above: written.
    with pytest.raises(ExportError, match="not written"):
        quantize_int8(path, tmp_path / "refused.onnx", check, max_drop=drop - HALF_STEP)
    assert not (tmp_path / "refused.onnx").exists()
    quantize_int8(path, tmp_path / "kept.onnx", check, max_drop=drop + HALF_STEP)
    assert (tmp_path / "kept.onnx").is_file()


def test_a_runtime_that_would_preprocess_differently_is_refused(tmp_path, textile_subset, test_images):
    import json

    model = fewshot.fit(textile_subset, "prototype", backbone="timm:resnet18@random", shots=2, use_cache=False)
    path, _ = _export(tmp_path, model, "pinned")
    proto = onnx.load(str(path))
    manifest = json.loads(proto.metadata_props[0].value)
    assert manifest["backbone"]["steps"]  # replayed without timm: the installed version does not matter ...
    del manifest["backbone"]["steps"]  # ... unlike a file exported before the steps were recorded
    manifest["backbone"]["preprocess"]["data_cfg"]["crop_pct"] = 0.5  # as if timm's defaults had changed
    proto.metadata_props[0].value = json.dumps(manifest)
    onnx.save_model(proto, str(tmp_path / "drifted.onnx"))
    with pytest.raises(ModelFileError, match="preprocessing differently"):
        predict_onnx(tmp_path / "drifted.onnx", test_images)


def test_a_graph_too_large_for_one_onnx_file_is_refused_before_tracing(tmp_path, monkeypatch, good_folder):
    import fewvision.deploy.onnx as deploy_onnx

    model = anomaly_tasks.fit_anomaly([good_folder], method="padim", backbone="timm:resnet18@random",
                                      use_cache=False)
    save_model(tmp_path / "big.fvm", model)
    monkeypatch.setattr(deploy_onnx, "ONNX_MAX_BYTES", 10_000_000)  # resnet18 to layer3 alone is ~11 MB
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("traced anyway"))
    with pytest.raises(ExportError, match="more than one ONNX file holds"):
        export_onnx(tmp_path / "big.fvm", tmp_path / "big.onnx")
    assert not (tmp_path / "big.onnx").exists()


def test_other_commands_given_an_onnx_file_say_what_it_is(monkeypatch, capsys, tmp_path, textile_subset):
    model = fewshot.fit(textile_subset, "prototype", backbone="timm:resnet18@random", shots=2, use_cache=False)
    path, _ = _export(tmp_path, model, "other")
    code, out, err = run_cli(monkeypatch, capsys, "info", path)
    assert code == 0 and "onnxruntime" in out and "nominal" in out, err
    for args in (["anomaly", "rethreshold", path, "--target-false-reject", "0.1", "-o", tmp_path / "n.fvm"],
                 ["pack", path, "-o", tmp_path / "p.fvz"]):
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and "an exported ONNX model" in err and err.count("\n") == 1, (args, err)


def test_int8_for_a_classifier_reports_the_accuracy_change(monkeypatch, capsys, tmp_path, textile_subset):
    fvm = tmp_path / "cls.fvm"
    save_model(fvm, fewshot.fit(textile_subset, "linear", backbone="timm:resnet18@random", shots=4, use_cache=False))
    code, out, err = run_cli(monkeypatch, capsys, "export", fvm, "-o", tmp_path / "cls.onnx", "--int8", textile_subset,
                             "--max-drop", "1")
    assert code == 0, err
    assert "int8 accuracy" in out and (tmp_path / "cls-int8.onnx").exists()
    got = predict_onnx(tmp_path / "cls-int8.onnx", sorted(textile_subset.rglob("*.jpg")))
    assert len(got.rows) == 36
    code, _, err = run_cli(monkeypatch, capsys, "export", fvm, "-o", tmp_path / "x.onnx", "--force")
    assert code == 2 and "apply to --int8" in err
