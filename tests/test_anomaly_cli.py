"""`fewvision anomaly fit | predict | eval` end to end on textile images with pasted scratches and spots (MVTec
layout with masks), through the same entry point users run (`fewvision.cli.main`)."""

import csv
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from anomaly_data import build_mvtec
from cli_helpers import run_cli
from PIL import Image

BACKBONE = "timm:resnet18@random"




@pytest.fixture(scope="module")
def mvtec(tmp_path_factory, textile_root):
    good = sorted((textile_root / "nominal").glob("*.jpg"))[200:]
    return build_mvtec(tmp_path_factory.mktemp("mvtec-cli") / "textile", good, n_train=16, n_test_good=6,
                       n_per_defect=5, seed=1)



def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fit_predict_eval(tmp_path, monkeypatch, capsys, mvtec):
    model = tmp_path / "m.fvm"
    # The MVTec category folder itself: its train/good is used, not the test images or the masks.
    code, out, err = run_cli(monkeypatch, capsys, "anomaly", "fit", mvtec, "--method", "patchcore",
                             "--backbone", BACKBONE, "--target-false-reject", "0.25", "-o", model)
    assert code == 0, err
    assert f"good images: {mvtec / 'train' / 'good'}: 16 image(s), MVTec AD layout" in err
    assert "threshold" in out and "set on 16 good images" in out and model.is_file()
    assert oct(model.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the user's umask, not 0600

    images = tmp_path / "incoming"
    shutil.copytree(mvtec / "test" / "spot", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    results = tmp_path / "results.csv"
    code, out, err = run_cli(monkeypatch, capsys, "anomaly", "predict", model, images, "-o", results,
                             "--heatmaps", tmp_path / "heat", "--report", tmp_path / "daily", "--exit-code")
    assert code == 1, err  # --exit-code: something was flagged
    rows = list(csv.DictReader(results.open()))
    assert len(rows) == 6 and list(rows[0]) == ["path", "verdict", "score", "threshold", "normalized_score", "x", "y",
                                                "n_regions", "largest_region_px", "largest_region_pct", "regions",
                                                "heatmap", "model_sha256", "backbone", "time", "error"]
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.png") and "broken.png" in err
    scored = [r for r in rows if not r["error"]]
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    for r in scored:
        assert r["verdict"] in ("ok", "ng") and (r["verdict"] == "ng") == (float(r["score"]) > float(r["threshold"]))
        assert float(r["normalized_score"]) == pytest.approx(float(r["score"]) / float(r["threshold"]), rel=1e-5)
        w, h = Image.open(r["path"]).size
        assert 0 <= int(r["x"]) < w and 0 <= int(r["y"]) < h
        assert r["model_sha256"] == sha and r["backbone"] == BACKBONE and r["time"].endswith("+00:00")
    assert sum(r["verdict"] == "ng" for r in scored) >= 4  # pasted spots are over the conformal threshold
    with_regions = []
    for r in scored:  # the regions column: one JSON list of boxes in image pixels, largest first
        regions = json.loads(r["regions"])
        assert int(r["n_regions"]) == len(regions)
        if regions:
            with_regions.append(r)
            w, h = Image.open(r["path"]).size
            assert int(r["largest_region_px"]) == regions[0]["area_px"] == max(b["area_px"] for b in regions)
            assert float(r["largest_region_pct"]) == pytest.approx(100 * regions[0]["area_px"] / (w * h), rel=0.01)
            assert all(0 <= b["x"] < b["x"] + b["width"] <= w and 0 <= b["y"] < b["y"] + b["height"] <= h
                       for b in regions)
    assert len(with_regions) >= 4  # measured: every spot image
    heat = sorted((tmp_path / "heat").glob("*.png"))
    assert len(heat) == 5 and all(r["heatmap"] for r in scored)
    w, h = Image.open(scored[0]["path"]).size
    picture = Image.open(scored[0]["heatmap"])
    assert picture.width > 2 * w and picture.height > h  # image and overlay side by side at the image's size
    outlined = np.asarray(Image.open(with_regions[0]["heatmap"]).convert("RGB"))
    assert (outlined == (255, 0, 255)).all(-1).sum() > 20  # the regions' boxes, outlined in magenta
    assert "ng " in err and "vs threshold" in err  # the closing summary names the flagged images
    daily = (tmp_path / "daily" / "report.html").read_text()
    assert "Flagged (" in daily and "Passed, nearest the threshold" in daily and " region" in daily
    code, _, err = run_cli(monkeypatch, capsys, "anomaly", "predict", model, images, "-o", results,
                           "--min-region-area", "1e9")
    assert code == 0, err
    again = {r["path"]: r for r in csv.DictReader(results.open()) if not r["error"]}
    assert all(again[r["path"]]["n_regions"] == "0" and again[r["path"]]["verdict"] == r["verdict"] for r in scored)

    metrics_path = tmp_path / "metrics.json"
    code, out, err = run_cli(monkeypatch, capsys, "anomaly", "eval", model, mvtec, "--out", metrics_path,
                             "--report", tmp_path / "report")
    assert code == 0, err
    m = json.loads(metrics_path.read_text())
    for key in ("image_auroc", "image_aupr", "image_f1", "n_good", "n_defect", "threshold", "pixel_auroc", "aupro"):
        assert key in m
    assert (m["n_good"], m["n_defect"]) == (6, 10)
    # Measured 0.95 / 0.992 / 0.963 (image AUROC / pixel AUROC / AUPRO) with these 16 + 16 images; chance is
    # 0.5 / 0.5 / ~0.15.
    assert m["image_auroc"] >= 0.85 and m["pixel_auroc"] >= 0.9 and m["aupro"] >= 0.7
    html = (tmp_path / "report" / "report.html").read_text()
    assert "ROC curve" in html and "Missed defects" in html and "False rejects" in html


def test_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, mvtec):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(monkeypatch, capsys, "anomaly", "fit", mvtec / "train" / "good", "-o", tmp_path / "m.fvm")
    assert code == 2 and "--backbone texture" in err and "--weights" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(monkeypatch, capsys, "anomaly", "fit", mvtec / "train" / "good", "--backbone",
                             BACKBONE, "-o", tmp_path / "m.fvm")  # 1% false rejects from 16 good images: not refused
    assert code == 0 and "needs at least 99 calibration images; 16 support at best 0.0588" in err
    assert "target of 0.0588 of good parts rejected" in out  # the closest 16 images support
    code, _, err = run_cli(monkeypatch, capsys, "anomaly", "predict", tmp_path / "nope.fvm", mvtec, "--out",
                           tmp_path / "r.csv")
    assert code == 2 and "nope.fvm" in err


def test_a_tiled_model_evaluates_against_masks_in_its_stitched_geometry(tmp_path, monkeypatch, capsys, mvtec):
    """``--tile``: stored by fit, followed by eval; the ground-truth masks are put into each image's stitched
    map, so the pixel metrics exist and mean what they say."""
    model = tmp_path / "tiled.fvm"
    code, out, err = run_cli(monkeypatch, capsys, "anomaly", "fit", mvtec, "--backbone", "texture", "--tile", "128",
                             "--tile-overlap", "0", "-o", model)
    assert code == 0 and "(128 px tiles, overlap 0)" in out, err
    code, out, _ = run_cli(monkeypatch, capsys, "info", model)
    assert code == 0 and "128 px at native resolution, overlap 0;" in out and "largest tile score" in out
    metrics_path = tmp_path / "m.json"
    code, _, err = run_cli(monkeypatch, capsys, "anomaly", "eval", model, mvtec, "--out", metrics_path,
                           "--report", tmp_path / "report")
    assert code == 0, err
    m = json.loads(metrics_path.read_text())
    # measured 1.0 / 0.998 / 0.993 (image AUROC / pixel AUROC / AUPRO); with each tile's map shifted 20 px in the
    # stitching: 1.0 / 0.75 / 0.49
    assert m["image_auroc"] >= 0.9 and m["pixel_auroc"] >= 0.95 and m["aupro"] >= 0.9
    code, _, err = run_cli(monkeypatch, capsys, "anomaly", "fit", mvtec, "--backbone", "texture", "--tile", "8",
                           "-o", tmp_path / "x.fvm")
    assert code == 2 and "--tile" in err and len(err.strip().splitlines()) == 1
