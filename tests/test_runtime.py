"""The light install: packed models scored from their ONNX graph with Pillow / numpy preprocessing, in a process
that cannot import torch (nor scikit-learn, scipy, the exporter ...), giving the torch path's rows."""

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fewvision.backbones import create_backbone
from fewvision.deploy.pack import pack_model
from fewvision.modelfile import load, save_model
from fewvision.runtime import model as runtime
from fewvision.runtime.preprocess import Preprocess, steps_of
from fewvision.tasks import anomaly as anomaly_tasks
from fewvision.tasks import fewshot

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).parent
TOLERANCE = 1e-4  # the export's parity bound: absolute below 1, relative above
# Heat maps: every pixel of the graph's maps within 1e-3 of torch's (relative above 1); measured up to 1.5e-4 for
# PaDiM on onnxruntime here. A heat map's colours are 1/256 of its range apart.
MAP_TOLERANCE = 1e-3


# The tests marked `light` run in CI's light-install step (.ci/light.sh, `make test-light`), which points this at
# a fresh environment with `pip install .` only; `make test` leaves them to it. Run alone, they use this
# environment with everything but the light install's packages blocked.
LIGHT_PYTHON = os.environ.get("FEWVISION_LIGHT_PYTHON")


def light(*args, allow=(), cwd=None):
    """``fewvision ARGS`` in a process where only the light install's packages import: (code, stdout, stderr).
    Here: this environment with everything else blocked (tests/no_torch.py); in CI also the real light install."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               FEWVISION_TEST_ALLOW=",".join(allow), OMP_NUM_THREADS="1")
    code = ("import no_torch, sys; sys.argv[0] = 'fewvision'; from fewvision.cli import main; main()")
    done = subprocess.run([LIGHT_PYTHON or sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)
    return done.returncode, done.stdout, done.stderr


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.abs(a - b) / np.maximum(1.0, np.abs(b))).max())


# --- preprocessing --------------------------------------------------------------------------------------------------
def test_the_replayed_preprocessing_is_the_libraries_transform_exactly():
    """Every eval transform open_clip and timm build for the sizes, resize modes, crop modes and interpolations
    they offer, on images smaller, larger and of other aspect ratios than the target: the same float32 pixels."""
    import timm.data
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in [(300, 260), (224, 224), (100, 333), (517, 77), (31, 40), (1200, 1600)]]
    transforms = []
    for size, mode, interpolation in itertools.product([224, (240, 200), (336, 336)], ["shortest", "longest", "squash"],
                                                       ["bicubic", "bilinear"]):
        cfg = asdict(PreprocessCfg())
        cfg.update(size=size, resize_mode=mode, interpolation=interpolation)
        transforms.append(image_transform_v2(PreprocessCfg(**cfg), is_train=False))
    for crop_mode, crop_pct, size in itertools.product(["center", "squash", "border"], [0.875, 1.0],
                                                       [(3, 224, 224), (3, 256, 192)]):
        transforms.append(timm.data.create_transform(input_size=size, crop_pct=crop_pct, crop_mode=crop_mode,
                                                     interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                                                     std=(0.229, 0.224, 0.225)))
    steps = set()
    for transform in transforms:
        replay = Preprocess(steps_of(transform))
        steps |= {s["op"] for s in replay.steps}
        for image in images:
            want, got = transform(image).numpy(), replay(image)
            assert got.dtype == np.float32 and np.array_equal(got, want), (transform, image.size)
    assert steps == {"rgb", "resize", "resize_keep_ratio", "center_crop", "to_array", "normalize"}


# --- packed models on the light install -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packs(tmp_path_factory, tiny_clip_config, textile_subset, textile_root):
    """Packed models with their graphs: a calibrated classifier with prediction sets on the tiny CLIP and PatchCore
    on resnet18 (weights from files, so the archives must carry them); and the .fvm each came from. PaDiM's and the
    other heads' graphs against torch: tests/test_deploy_onnx.py (the light path around a graph is the same)."""
    root = tmp_path_factory.mktemp("packs")
    init = create_backbone(f"openclip:{tiny_clip_config}")
    torch.manual_seed(3)
    state = {k: (v + 0.02 * torch.randn_like(v)) if v.is_floating_point() else v
             for k, v in init.model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "clip.safetensors"))
    import timm

    torch.manual_seed(1)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "resnet18.safetensors"))
    good = root / "good"
    good.mkdir()
    for p in sorted((textile_root / "nominal").glob("*.jpg"))[:12]:
        shutil.copy(p, good / p.name)
    models = {
        "linear": fewshot.fit(textile_subset, "linear", backbone=f"openclip:{tiny_clip_config}@{root / 'clip.safetensors'}",
                              shots=6, calibrate_fraction=0.5, alpha=0.2, use_cache=False),
        "patchcore": anomaly_tasks.fit_anomaly([good], method="patchcore",
                                               backbone=f"timm:resnet18@{root / 'resnet18.safetensors'}",
                                               use_cache=False),
    }
    # a threshold inside the good scores: both verdicts occur below
    models["patchcore"] = anomaly_tasks.rethreshold(models["patchcore"], 0.5)
    out = {}
    for name, model in models.items():
        save_model(root / f"{name}.fvm", model)
        manifest = pack_model(root / f"{name}.fvm", root / f"{name}.fvz")
        assert "graph/fp32.onnx" in manifest["files"] and manifest["graph"]["parity"] <= TOLERANCE
        out[name] = (root / f"{name}.fvm", root / f"{name}.fvz")
    return out


@pytest.fixture(scope="module")
def anomaly_images(tmp_path_factory, textile_root):
    folder = tmp_path_factory.mktemp("anomaly-images")
    for label, source, part in (("good", "nominal", slice(12, 20)), ("local", "local", slice(0, 6)),
                                ("global", "global", slice(0, 4))):
        (folder / label).mkdir()
        for p in sorted((textile_root / source).glob("*.jpg"))[part]:
            shutil.copy(p, folder / label / p.name)
    return folder


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, textile_root):
    """Labelled images of the three classes that no model here was fitted or calibrated on."""
    folder = tmp_path_factory.mktemp("held-out")
    for cls in ("nominal", "local", "global"):
        (folder / cls).mkdir()
        for p in sorted((textile_root / cls).glob("*.jpg"))[20:28]:
            shutil.copy(p, folder / cls / p.name)
    return folder


@pytest.mark.light
def test_a_classifier_predicts_and_evaluates_without_torch_as_with_it(packs, tmp_path, textile_subset, held_out):
    fvm, fvz = packs["linear"]
    code, _, err = light("predict", fvz, textile_subset, "--abstain", "-o", tmp_path / "light.csv",
                         "--engine", "onnxruntime")
    assert code in (0, 1), err
    model = load(fvm)
    want = fewshot.predict(model, [textile_subset], abstain=True, use_cache=False)
    got = read_csv(tmp_path / "light.csv")
    assert [r["path"] for r in got] == [r["path"] for r in want.rows] and len(got) == 36
    names = model.class_names
    have = np.array([[float(r[f"p_{n}"]) for n in names] for r in got])
    expect = np.array([[r["probabilities"][n] for n in names] for r in want.rows])
    assert np.abs(have - expect).max() <= TOLERANCE and expect.std(0).max() > 1e-3
    top = np.sort(expect, 1)
    clear = (top[:, -1] - top[:, -2] > 2 * TOLERANCE)
    assert clear.sum() >= 30
    assert [g["label"] for g, c in zip(got, clear) if c] == [w["label"] for w, c in zip(want.rows, clear) if c]
    assert any(r["label"] == "review" for r in got)  # the prediction sets, from the graph's metadata, decide

    code, _, err = light("eval", fvz, held_out, "-o", tmp_path / "m.json")
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    reference = fewshot.evaluate_model(model, held_out, use_cache=False).metrics
    assert metrics["n"] == reference["n"] == 24
    assert metrics["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-9)
    assert metrics["coverage"] == pytest.approx(reference["coverage"], abs=1e-9)
    code, out, err = light("info", fvz)
    assert code == 0 and "linear" in out and "nominal" in out and "fp32 (--engine auto on this machine)" in out, err


@pytest.mark.light
def test_anomaly_models_score_and_evaluate_without_torch_as_with_it(packs, tmp_path, anomaly_images):
    fvm, fvz = packs["patchcore"]
    code, _, err = light("anomaly", "predict", fvz, anomaly_images, "-o", tmp_path / "light.csv",
                         "--heatmaps", tmp_path / "maps", "--review-band", "0.05", "--engine", "onnxruntime")
    assert code in (0, 1), err
    model = load(fvm)
    want = anomaly_tasks.score_files(model, [anomaly_images], review_band=0.05, use_cache=False)
    got = read_csv(tmp_path / "light.csv")
    assert [r["path"] for r in got] == [r["path"] for r in want.rows] and len(got) == 18
    assert relative([float(r["score"]) for r in got], want.scores) <= TOLERANCE
    assert [r["verdict"] for r in got] == [r["verdict"] for r in want.rows]
    assert {r["verdict"] for r in got} >= {"ok", "ng"}
    assert [(int(r["x"]), int(r["y"])) for r in got] == [(r["x"], r["y"]) for r in want.rows]
    assert len(list((tmp_path / "maps").glob("*.png"))) == 18
    # The maps themselves (what the heat maps draw), in process: the graph's against torch's.
    maps = runtime.score_files(runtime.open_model(fvz, engine="onnxruntime"), [anomaly_images]).maps
    assert maps.shape == want.maps.shape and relative(maps, want.maps) <= MAP_TOLERANCE

    # with the "report" extra (matplotlib; CI's light environment installs it): the report and its charts, the ROC
    # curve among them, drawn without scikit-learn
    code, _, err = light("anomaly", "eval", fvz, anomaly_images, "-o", tmp_path / "m.json", "--report",
                         tmp_path / "report", allow=("matplotlib",))
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    reference = anomaly_tasks.evaluate_anomaly(model, anomaly_images, use_cache=False).metrics
    assert metrics["image_auroc"] == pytest.approx(reference["image_auroc"], abs=1e-9)
    assert metrics["n_good"] == 8 and metrics["n_defect"] == 10
    page = (tmp_path / "report" / "report.html").read_text()
    assert '" alt="ROC curve">' in page and '" alt="score histogram">' in page


@pytest.mark.light
def test_the_monitor_watches_a_packed_models_scores_on_the_light_install(packs, tmp_path, anomaly_images):
    fvm, fvz = packs["patchcore"]
    code, _, err = light("anomaly", "predict", fvz, anomaly_images, "-o", tmp_path / "scores.csv")
    assert code in (0, 1), err
    code, _, err = light("monitor", tmp_path / "scores.csv", "--model", fvz, "-o", tmp_path / "monitor.json",
                         "--report", tmp_path / "report", allow=("matplotlib",))
    assert code == 0, err
    result = json.loads((tmp_path / "monitor.json").read_text())
    assert len(result["series"]["score"]) == 18
    assert [float(r["score"]) for r in read_csv(tmp_path / "scores.csv")] == result["series"]["score"]
    assert "data:image/png" in (tmp_path / "report" / "monitor.html").read_text()


def test_a_report_without_matplotlib_is_refused_before_any_image_is_scored(packs, tmp_path, anomaly_images):
    """The light install alone has no matplotlib (its charts come with the "report" extra): asked for a report, a
    command says so in one line, naming the extra, before it scores anything. Not in CI's light step, which
    installs the extra."""
    fvm, fvz = packs["patchcore"]
    for command in (["anomaly", "predict", fvz, anomaly_images, "-o", tmp_path / "scores.csv"],
                    ["anomaly", "eval", fvz, anomaly_images, "-o", tmp_path / "m.json"],
                    ["monitor", anomaly_images / "none.csv", "--model", fvz, "-o", tmp_path / "monitor.json"]):
        code, _, err = light(*command, "--report", tmp_path / "report")
        assert code == 2 and err.count("\n") == 1 and "pip install 'fewvision[report]'" in err, err
    assert not [p for p in tmp_path.iterdir()]  # nothing scored, nothing written


@pytest.mark.parametrize("command, module, extra", [
    (["anomaly", "fit", "{good}", "-o", "{tmp}/m.fvm"], "torch", "full"),
    (["pack", "{fvm}", "-o", "{tmp}/m.fvz"], "torch", "full"),
    (["serve", "--data-dir", "{tmp}/service"], "uvicorn", "full"),
    (["batch", "{fvz}", "{good}", "-o", "{tmp}/r.parquet"], "pyarrow", "batch"),
])
def test_a_command_that_needs_an_extra_names_it_in_one_line(packs, tmp_path, anomaly_images, command, module, extra):
    """On the light install (here: with the extras' libraries blocked) fitting, packing, serving, or batch without
    pyarrow: exit 2 and the extra to install, not an internal error."""
    fvm, fvz = packs["patchcore"]
    args = [a.format(good=anomaly_images / "good", tmp=tmp_path, fvm=fvm, fvz=fvz) for a in command]
    code, _, err = light(*args)
    assert code == 2 and err.count("\n") == 1, err
    assert f"needs {module}, which is not installed here: pip install 'fewvision[{extra}]'" in err, err


def test_every_library_the_light_install_lacks_has_its_extra_named():
    """The table behind that line covers every library the light-install tests block (tests/no_torch.py), and
    names extras that pyproject.toml defines."""
    import ast
    import tomllib

    from fewvision.cli.common import EXTRA_OF_MODULE

    blocker = ast.parse((TESTS / "no_torch.py").read_text())
    full_only = next(ast.literal_eval(node.value) for node in ast.walk(blocker)
                     if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "FULL_ONLY")
    assert len(full_only) >= 15 and full_only <= set(EXTRA_OF_MODULE), full_only - set(EXTRA_OF_MODULE)
    extras = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRA_OF_MODULE.values()) <= set(extras), set(EXTRA_OF_MODULE.values()) - set(extras)


@pytest.mark.light
def test_batch_runs_a_packed_model_without_torch(packs, tmp_path, anomaly_images):
    import pyarrow.parquet as pq

    fvm, fvz = packs["patchcore"]
    code, _, err = light("batch", fvz, anomaly_images, "-o", tmp_path / "light.parquet", allow=("pyarrow",))
    assert code in (0, 1), err
    rows = pq.read_table(tmp_path / "light.parquet").to_pylist()
    want = {r["path"]: r for r in anomaly_tasks.score_files(load(fvm), [anomaly_images], use_cache=False).rows}
    assert len(rows) == 18 and all(abs(r["score"] - want[r["path"]]["score"]) <= TOLERANCE * max(1, r["score"])
                                   for r in rows)


@pytest.mark.light
def test_a_model_that_needs_torch_is_refused_in_one_line_naming_the_extra(tmp_path, textile_subset):
    texture = tmp_path / "texture.fvm"
    save_model(texture, fewshot.fit(textile_subset, "prototype", backbone="texture", shots=2))
    manifest = pack_model(texture, tmp_path / "texture.fvz")
    assert "graph/fp32.onnx" not in manifest["files"] and "texture backbone" in manifest["graph_note"]
    for model in (texture, tmp_path / "texture.fvz"):
        code, _, err = light("predict", model, textile_subset, "-o", tmp_path / "r.csv")
        assert code == 2 and err.count("\n") == 1 and "pip install 'fewvision[full]'" in err, err


# --- engines and precisions -----------------------------------------------------------------------------------------
def test_auto_takes_the_gated_precision_else_the_fastest_checked_engine_installed_here(monkeypatch):
    from fewvision.runtime import engines

    here = {"onnxruntime", "openvino"}
    monkeypatch.setattr(engines, "installed", lambda name: name in here)
    monkeypatch.setattr(engines, "cpu_has_bf16", lambda: True)
    measured = {"onnxruntime": {"images_per_s": 20.0}, "openvino": {"images_per_s": 22.0}}
    assert engines.choose("auto", None, measured=measured) == ("openvino", "fp32")
    measured["onnxruntime"]["images_per_s"] = 30.0
    assert engines.choose("auto", None, measured=measured) == ("onnxruntime", "fp32")
    bf16 = {"engine": "openvino", "precision": "bf16"}
    assert engines.choose("auto", bf16, measured=measured) == ("openvino", "bf16")
    assert engines.choose("onnxruntime", bf16, measured=measured) == ("onnxruntime", "fp32")  # asked for: fp32
    int8 = {"engine": "onnxruntime", "precision": "int8"}
    assert engines.choose("auto", int8, graphs=("fp32", "int8"), measured=measured) == ("onnxruntime", "int8")
    assert engines.choose("auto", int8, graphs=("fp32",), measured=measured) == ("onnxruntime", "fp32")
    monkeypatch.setattr(engines, "cpu_has_bf16", lambda: False)  # a line PC without bf16: fp32, not a failure
    assert engines.choose("auto", bf16, measured=measured) == ("onnxruntime", "fp32")
    here.discard("openvino")  # checked when packed, but not installed here
    measured["openvino"]["images_per_s"] = 99.0
    assert engines.choose("auto", bf16, measured=measured) == ("onnxruntime", "fp32")
    assert engines.choose("auto", None, measured=None) == ("onnxruntime", "fp32")  # a bare .onnx
    with pytest.raises(engines.EngineError, match=r"pip install 'fewvision\[openvino\]'"):
        engines.choose("openvino", None, measured=measured)


def test_openvino_runs_the_graph_with_the_same_verdicts(packs, anomaly_images, tmp_path):
    fvm, fvz = packs["patchcore"]
    want = anomaly_tasks.score_files(load(fvm), [anomaly_images], use_cache=False)
    code, _, err = light("anomaly", "predict", fvz, anomaly_images, "-o", tmp_path / "openvino.csv", "--engine",
                         "openvino")
    assert code in (0, 1), err
    got = read_csv(tmp_path / "openvino.csv")
    assert relative([float(r["score"]) for r in got], want.scores) <= TOLERANCE  # measured 2.7e-5 here
    assert [r["verdict"] for r in got] == [r["verdict"] for r in want.rows]


def test_reduced_precision_is_recorded_only_past_its_gate_on_the_users_images(packs, tmp_path, held_out,
                                                                              monkeypatch, capsys):
    from cli_helpers import run_cli

    fvm, _ = packs["linear"]
    # int8 on a transformer: its matrix products are quantised; the accuracy change is measured on held_out.
    code, out, err = run_cli(monkeypatch, capsys, "pack", fvm, "-o", tmp_path / "int8.fvz", "--precision", "int8",
                             "--calibrate", held_out, "--max-drop", "1")
    assert code == 0, err
    model = runtime.open_model(tmp_path / "int8.fvz")
    recorded = model.packed["precision"]
    assert model.engine_name == "onnxruntime int8" and recorded["images"] == 24 and recorded["metric"] == "accuracy"
    assert "onnxruntime int8" in out and "recorded" in out
    import onnx

    from fewvision.modelfile import open_pack

    nodes = onnx.load(str(open_pack(tmp_path / "int8.fvz").graphs["graph/int8.onnx"])).graph.node
    assert sum(n.op_type == "DequantizeLinear" for n in nodes) >= 10 and any(n.op_type == "MatMul" for n in nodes)
    # Both sides of the limit are tested on a CNN in test_deploy_onnx (the same gate); without --calibrate: refused.
    code, _, err = run_cli(monkeypatch, capsys, "pack", fvm, "-o", tmp_path / "x.fvz", "--precision", "int8")
    assert code == 2 and "--calibrate" in err


def test_bf16_is_recorded_where_the_cpu_has_it_and_measured_first(packs, tmp_path, held_out, monkeypatch, capsys):
    from cli_helpers import run_cli

    fvm, _ = packs["linear"]
    code, out, err = run_cli(monkeypatch, capsys, "pack", fvm, "-o", tmp_path / "bf16.fvz", "--precision", "bf16",
                             "--calibrate", held_out, "--max-drop", "1")
    if code != 0 and "no bf16" in err:  # this CPU cannot run it: refused in one line, nothing written
        assert code == 2 and "bf16" in err and not (tmp_path / "bf16.fvz").exists()
        return
    assert code == 0, err
    code, out, err = light("info", tmp_path / "bf16.fvz")
    assert code == 0 and "openvino bf16 (--engine auto on this machine)" in out and "24 image(s)" in out, err
    probabilities = {}
    for engine in ("auto", "onnxruntime"):  # what auto runs (bf16) against fp32
        code, _, err = light("predict", tmp_path / "bf16.fvz", held_out, "-o", tmp_path / f"{engine}.csv",
                             "--engine", engine)
        assert code in (0, 1), err
        probabilities[engine] = np.array([[float(v) for k, v in r.items() if k.startswith("p_")]
                                          for r in read_csv(tmp_path / f"{engine}.csv")])
    assert 0 < np.abs(probabilities["auto"] - probabilities["onnxruntime"]).max() < 0.1  # bf16 ran: close, not equal


def test_heat_maps_need_neither_matplotlib_nor_torch_and_look_the_same():
    from matplotlib import colormaps

    from fewvision.io.geometry import resize_bilinear
    from fewvision.reports.anomaly import colours

    rng = np.random.default_rng(0)
    x = np.r_[rng.random(100_000).astype(np.float32), np.float32([0, 1, 0.5, 1 / 256, 255 / 256, 0.99999994])]
    want = colormaps["jet"](x, bytes=True)[..., :3].astype(np.float32) / 255
    assert np.array_equal(colours(x, [0, 1]), want)
    for source, target in (((16, 16), (224, 224)), ((7, 9), (30, 11)), ((20, 30), (5, 7)), ((64, 64), (64, 64))):
        m = rng.random(source).astype(np.float32)
        torch_map = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=target, mode="bilinear",
                                                    align_corners=False)[0, 0].numpy()
        assert np.abs(resize_bilinear(m, target) - torch_map).max() <= 2e-6, (source, target)


def test_the_light_runtime_checks_the_graph_it_runs_and_not_the_weights_it_never_reads(packs, tmp_path,
                                                                                      textile_subset):
    import tarfile

    from fewvision.modelfile import PackError, load_packed, open_pack

    _, fvz = packs["linear"]

    def flipped(member_prefix: str) -> Path:
        copy = tmp_path / f"{member_prefix.strip('/')}.fvz"
        shutil.copy(fvz, copy)
        with tarfile.open(copy) as tar:
            member = next(m for m in tar.getmembers() if m.name.startswith(member_prefix))
        with open(copy, "r+b") as fh:
            fh.seek(member.offset_data + member.size // 2)
            byte = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([byte[0] ^ 0xFF]))
        return copy

    graph, weights = flipped("graph/"), flipped("backbone/")
    with pytest.raises(PackError, match="'graph/fp32.onnx' fails its sha256 check"):
        runtime.open_model(graph)
    model = runtime.open_model(weights, engine="onnxruntime")
    assert len(runtime.predict(model, [textile_subset]).rows) == 36  # never read
    with pytest.raises(PackError, match="fails its sha256 check"):  # the torch path reads them: refused there
        open_pack(weights)
    with pytest.raises(PackError):
        load_packed(weights)


@pytest.mark.light
def test_the_station_judges_with_a_packed_graph_without_torch(packs, tmp_path, anomaly_images):
    import signal
    import time

    from station_helpers import land, store_rows, write_station

    fvm, fvz = packs["patchcore"]
    station_file = write_station(tmp_path, fvz, [{"csv": {"path": "verdicts.csv"}}], engine="onnxruntime")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    code = "import no_torch, sys; sys.argv[0] = 'fewvision'; from fewvision.cli import main; main()"
    process = subprocess.Popen([LIGHT_PYTHON or sys.executable, "-c", code, "station", "run", str(station_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    images = sorted(anomaly_images.rglob("*.jpg"))
    try:
        (tmp_path / "incoming").mkdir(exist_ok=True)
        for i, image in enumerate(images):
            land(image, tmp_path / "incoming", f"P{i:03d}_{image.parent.name}.jpg")
        deadline = time.monotonic() + 120
        def delivered() -> int:  # the CSV sink writes after the store commits: wait for both
            sink = tmp_path / "verdicts.csv"
            return min(len(store_rows(tmp_path)), len(read_csv(sink)) if sink.exists() else 0)

        while delivered() < len(images) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert delivered() == len(images), process.stdout.read1().decode() if process.poll() else ""
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    assert "no module" not in output.lower(), output
    want = anomaly_tasks.score_files(load(fvm), images, use_cache=False)
    scores = dict(store_rows(tmp_path, "select filename, score from predictions"))
    for row, image, i in zip(want.rows, images, range(len(images))):
        got = scores[f"P{i:03d}_{image.parent.name}.jpg"]
        assert abs(got - row["score"]) <= TOLERANCE * max(1.0, abs(row["score"]))
    verdicts = read_csv(tmp_path / "verdicts.csv")
    assert len(verdicts) == len(images) and {v["verdict"] for v in verdicts} >= {"ok", "ng"}


def test_packing_and_measuring_never_load_openvino_in_the_packing_process(packs, tmp_path):
    """OpenVINO's thread pool does not survive a fork of the process that loaded it (a DataLoader's workers, a test
    runner's): pack measures it in a fresh interpreter (runtime.measure). Checked in an interpreter of its own, since
    this one may have run a pack on OpenVINO for another test - a script as a user writes one, without
    ``if __name__ == "__main__":``, which the fresh interpreter must not run again (multiprocessing's spawn did: the
    script packed a second time in the child, and the parent waited forever)."""
    script = tmp_path / "pack_line3.py"
    script.write_text("import sys\nfrom pathlib import Path\nfrom fewvision.deploy.pack import pack_model\n"
                      "print('the script ran', flush=True)\n"
                      f"pack_model(Path({str(packs['linear'][0])!r}), Path({str(tmp_path / 'again.fvz')!r}))\n"
                      "print('openvino loaded' if 'openvino' in sys.modules else 'openvino not loaded')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "again.fvz").is_file()
    assert done.stdout.count("the script ran") == 1, done.stdout[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "openvino not loaded", done.stdout[-2000:]


def test_a_measurement_apart_returns_its_error_and_a_child_that_dies_is_an_error_not_a_wait():
    from fewvision.runtime.measure import apart

    assert apart(os.getpid) != os.getpid()
    with pytest.raises(ValueError, match="invalid literal for int"):
        apart(int, "seven")
    with pytest.raises(RuntimeError, match=r"os._exit|_exit.*exit code 3"):
        apart(os._exit, 3)
