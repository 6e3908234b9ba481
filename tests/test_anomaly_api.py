"""The model-level anomaly API on real textile images with a tiny weight-free backbone: fit with a conformal
threshold, save / load / score identically, bad input, mixed image sizes, evaluation with masks, the report."""

import shutil

import numpy as np
import pytest
import torch
from anomaly_data import PixelPatchBackbone, build_mvtec
from model_checks import tensor_layouts
from PIL import Image

from fewvision.modelfile import load, save_model
from fewvision.tasks.anomaly import (
    evaluate_anomaly,
    fit_anomaly,
    rethreshold,
    score_files,
)


@pytest.fixture(scope="module")
def bb():
    return PixelPatchBackbone(size=64)


@pytest.fixture(scope="module")
def nominal(textile_root):
    return sorted((textile_root / "nominal").glob("*.jpg"))


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory, nominal):
    d = tmp_path_factory.mktemp("good")
    for p in nominal[:30]:
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory, nominal):
    return build_mvtec(tmp_path_factory.mktemp("mvtec") / "textile", nominal[40:], n_train=20, n_test_good=8,
                       n_per_defect=6, seed=0)


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_fit_calibrates_and_a_saved_model_scores_identically(tmp_path, bb, good_dir, nominal, method):
    model = fit_anomaly(good_dir, method, bb, target_false_reject=0.2, seed=0, use_cache=False)
    d = model.decision
    # All 30 good images fit the model and all 30 calibrate it, each scored by a model fitted without it (PaDiM:
    # exact leave-one-out; PatchCore with its default coreset: the coreset of the image's cross-validation fold).
    assert model.task == "anomaly" and model.info["n_fit_images"] == 30 and d["n_calibration"] == 30
    expected = {"padim": "leave-one-out conformal", "patchcore": "cross-conformal"}[method]
    assert d["calibration"] == expected and d["target_false_reject"] == 0.2
    cal = np.sort(d["calibration_scores"])
    k = 25  # ceil((30 + 1) * (1 - 0.2))
    assert d["threshold"] == cal[k - 1] and int((cal > d["threshold"]).sum()) == 30 - k
    assert "30 good images" in d["guarantee"] and "0.2" in d["guarantee"]
    probe = [str(p) for p in nominal[100:106]]
    before = score_files(model, probe, use_cache=False)
    assert before.maps.shape == (6, 64, 64) and np.isfinite(before.scores).all()
    path = save_model(tmp_path / "m.fvm", model)
    again = load(path).bind(bb)
    after = score_files(again, probe, use_cache=False)
    assert tensor_layouts(again.head) == tensor_layouts(model.head)
    assert np.array_equal(before.scores, after.scores) and np.array_equal(before.maps, after.maps)
    assert [r["verdict"] for r in after.rows] == ["ng" if s > d["threshold"] else "ok" for s in after.scores]
    # A cached second pass (patch maps stored as float16) scores within float16 rounding of the uncached one.
    warm = score_files(again, probe, use_cache=True)
    warm2 = score_files(again, probe, use_cache=True)
    assert np.array_equal(warm.scores, warm2.scores)
    assert np.allclose(warm.scores, before.scores, rtol=2e-2)


@pytest.mark.parametrize("method,params", [("padim", {}), ("patchcore", {"coreset_ratio": 1.0})])
def test_leave_one_out_scores_equal_a_refit_without_the_image(bb, nominal, method, params):
    """PaDiM's closed form and PatchCore's bank without the image's own patches (all patches kept, so the bank is
    exactly that of a refit) must give the maps of a model fitted on the other images."""
    from fewvision.anomaly import create_anomaly_head

    x = bb.patch_features(torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in nominal[:12]]))
    head = create_anomaly_head(method, **params).fit(x)
    maps, scores = head.score_left_out(x[3:6], 3)
    for j, i in enumerate(range(3, 6)):
        others = torch.cat([x[:i], x[i + 1:]])
        refit_maps, refit_scores = create_anomaly_head(method, **params).fit(others).score(x[i : i + 1])
        # float32 covariances with 12 images are ill-conditioned (eigenvalues down to eps = 0.01): 1e-3 relative
        torch.testing.assert_close(maps[j : j + 1], refit_maps, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(scores[j : j + 1], refit_scores, rtol=1e-3, atol=1e-4)
    # and they are not the in-sample scores, which see the image itself
    assert (head.score(x[3:6])[1] < scores).all()


def test_too_few_images_for_the_target_use_the_tightest_it_supports(bb, good_dir):
    model = fit_anomaly(good_dir, "patchcore", bb, target_false_reject=0.01, use_cache=False)
    d = model.decision
    assert d["requested_false_reject"] == 0.01 and d["target_false_reject"] == pytest.approx(1 / 31)
    assert "needs at least 99 calibration images; 30 support at best 0.0323" in d["target_note"]
    assert d["threshold"] == max(d["calibration_scores"])
    # A head without leave-one-out scores holds images out, and does not refuse either.
    ae = fit_anomaly(good_dir, "ae", bb, target_false_reject=0.01, holdout_fraction=0.2, use_cache=False,
                     image_size=32, channels=(8, 16), latent_channels=4, epochs=1, batch_size=8)
    assert ae.decision["calibration"] == "split conformal" and ae.decision["n_calibration"] == 6
    assert ae.info["n_fit_images"] == 24
    assert ae.decision["target_false_reject"] == pytest.approx(1 / 7) and "target_note" in ae.decision


def test_no_good_images_and_unreadable_ones(tmp_path, bb, nominal):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no good images found"):
        fit_anomaly(empty, "patchcore", bb, target_false_reject=0.5, use_cache=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(5):
        (broken / f"b{i}.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"none of the 5 good image\(s\) to fit on could be read \(first: .*b\d.png: "):
        fit_anomaly(broken, "patchcore", bb, target_false_reject=0.5, holdout_fraction=0.2, use_cache=False)
    with pytest.raises(ValueError, match="has no parameter"):
        fit_anomaly(nominal[:10], "patchcore", bb, target_false_reject=0.5, use_cache=False, coreset=0.1)


def test_mixed_sizes_and_bad_files_in_a_batch(tmp_path, bb, nominal):
    good = tmp_path / "good"
    good.mkdir()
    sizes = [(250, 250), (180, 320), (400, 300), (97, 131)]
    for i, p in enumerate(nominal[:16]):
        with Image.open(p) as im:
            im.convert("RGB").resize(sizes[i % 4]).save(good / f"g{i}.png")
    (good / "zz_truncated.jpg").write_bytes(nominal[0].read_bytes()[:300])
    model = fit_anomaly(good, "patchcore", bb, target_false_reject=0.25, holdout_fraction=0.25, use_cache=False)
    assert model.info["n_skipped"] == 1 and "zz_truncated.jpg" in model.info["skipped"][0]
    batch = [nominal[50], tmp_path / "missing-later.png", nominal[51]]
    (tmp_path / "missing-later.png").write_bytes(b"")
    res = score_files(model, batch, use_cache=False)
    assert [r["path"] for r in res.rows] == [str(nominal[50]), str(nominal[51])]
    assert len(res.skipped) == 1 and "empty file" in res.skipped[0].reason
    # A new target rate from the stored held-out scores, without refitting.
    before = model.decision["threshold"]
    rethreshold(model, 0.5)
    assert model.decision["threshold"] <= before


def test_evaluate_on_mvtec_layout_with_masks_and_report(tmp_path, bb, mvtec):
    from fewvision.reports.anomaly import write_anomaly_report

    model = fit_anomaly(mvtec / "train" / "good", "patchcore", bb, target_false_reject=0.25, holdout_fraction=0.25,
                        use_cache=False)
    ev = evaluate_anomaly(model, mvtec, n_bootstrap=200, use_cache=False)
    m = ev.metrics
    assert (m["n_good"], m["n_defect"]) == (8, 12)
    for key in ("image_auroc", "image_aupr", "image_f1", "threshold", "pixel_auroc", "aupro", "image_auroc_ci"):
        assert key in m
    assert set(m["per_defect_type"]) == {"scratch", "spot"}
    # Pasted defects are obvious even to raw-pixel patches; the pixel metrics must be far above chance (0.5 / ~0.15).
    assert m["pixel_auroc"] > 0.8 and m["aupro"] > 0.4
    assert sum(mk is not None and mk.any() for mk in ev.masks) == 12
    page = write_anomaly_report(tmp_path / "rep", title="t", rows=ev.predictions.rows, maps=ev.predictions.maps,
                                preprocess=bb.preprocess, decision=model.decision, metrics=m, is_defect=ev.is_defect,
                                masks=ev.masks)
    html = page.read_text()
    rows, defect = ev.predictions.rows, ev.is_defect
    missed = sum(1 for r, d in zip(rows, defect) if d and r["verdict"] == "ok")
    false_rejects = sum(1 for r, d in zip(rows, defect) if not d and r["verdict"] == "ng")
    caught = sum(defect) - missed
    assert f"Missed defects ({missed})" in html and f"False rejects ({false_rejects})" in html
    # histogram, ROC and one overlay per gallery image
    assert html.count("data:image/png;base64,") == 2 + min(missed, 12) + min(false_rejects, 12) + min(caught, 6)
    assert "white outlines are the ground-truth defects".lower() in html.lower()
    assert model.decision["guarantee"] in html and "Thresholds chosen with the labelled defects" in html
    assert "http://" not in html and "https://" not in html


def test_folder_with_good_and_defect_subfolders(tmp_path, bb, mvtec, nominal):
    root = tmp_path / "inspection"
    shutil.copytree(mvtec / "test", root)
    model = fit_anomaly(mvtec / "train" / "good", "padim", bb, target_false_reject=0.25, holdout_fraction=0.25,
                        use_cache=False)
    ev = evaluate_anomaly(model, root, n_bootstrap=100, use_cache=False)
    assert ev.metrics["n_good"] == 8 and ev.metrics["n_defect"] == 12
    assert "pixel_auroc" not in ev.metrics  # no masks in this layout
    with pytest.raises(ValueError, match="no 'good' folder"):
        shutil.move(str(root / "good"), str(root / "ok"))
        evaluate_anomaly(model, root, use_cache=False)


def test_heads_receive_a_stream_not_one_big_tensor(monkeypatch, bb, good_dir):
    from fewvision.anomaly.patchcore import PatchCore

    seen = []
    real_fit = PatchCore.fit

    def spy(self, inputs, backbone=None):
        assert not torch.is_tensor(inputs)

        def watch():
            for x in inputs:
                seen.append(len(x))
                yield x

        return real_fit(self, watch(), backbone)

    monkeypatch.setattr(PatchCore, "fit", spy)
    fit_anomaly(good_dir, "patchcore", bb, target_false_reject=0.2, holdout_fraction=0.2, use_cache=False,
                chunk_images=10)
    assert seen == [10, 10, 10]  # leave-one-out: all 30 images fit


def test_patchcore_on_clip_vit_patch_tokens(tiny_clip, nominal):
    model = fit_anomaly(nominal[:10], "patchcore", tiny_clip, target_false_reject=0.5, holdout_fraction=0.2,
                        use_cache=False)
    grid = model.head.grid_
    assert grid == [4, 4]  # 64 px / patch 16: the ViT's patch tokens
    res = score_files(model, nominal[200:203], use_cache=False)
    assert res.maps.shape == (3, 64, 64) and np.isfinite(res.scores).all()


def test_padim_on_a_cnn_fits_the_papers_layers_and_predicts_with_them(tmp_path, nominal):
    from fewvision.backbones import create_backbone

    cnn = create_backbone("timm:resnet18@random")
    model = fit_anomaly(nominal[:5], "padim", cnn, target_false_reject=0.25, cache_dir=str(tmp_path))
    head = model.head
    assert head.feature_layers_ == [1, 2, 3] and head.grid_ == [56, 56]  # layer1's grid at 224 px
    assert head.channel_index_.numel() == 100  # of 64 + 128 + 256 = 448, as the paper's ResNet-18
    loaded = load(save_model(tmp_path / "padim.fvm", model)).bind(cnn)
    assert loaded.head.feature_layers_ == [1, 2, 3]
    a = score_files(model, nominal[10:12], cache_dir=str(tmp_path))
    b = score_files(loaded, nominal[10:12], cache_dir=str(tmp_path))
    assert np.array_equal(a.scores, b.scores)
    layers23 = fit_anomaly(nominal[:5], "padim", cnn, target_false_reject=0.25, cache_dir=str(tmp_path), layers="2,3")
    assert layers23.head.grid_ == [28, 28] and layers23.head.feature_layers_ == [2, 3]
