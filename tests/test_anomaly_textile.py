"""PatchCore and PaDiM on the real textile images with the built-in weight-free `texture` backbone.

Good = nominal; defects = local (small noisy spots) and global (a change of the whole texture). Fitted on 30 good
images (each also calibrates the threshold through a score by a model fitted without it), tested on 30 good + 30 local
+ 30 global images that are not among them. Floors are measured values minus an honest margin (the numbers are deterministic for a given
backbone; the margin absorbs numerical differences between machines and small revisions of the texture features).
"""

from pathlib import Path

import numpy as np
import pytest
from anomaly_data import build_mvtec
from PIL import Image
from sklearn.metrics import roc_auc_score

from fewvision.backbones import create_backbone
from fewvision.tasks.anomaly import evaluate_anomaly, fit_anomaly, score_files

N_FIT, N_TEST = 30, 30

# method: (local floor, global floor); measured (local, global) in the comments.
FLOORS = {
    "patchcore": (0.95, 0.93),  # measured 1.000, 0.972 (texture-v2; 0.914, 0.980 with texture-v1)
    "padim": (0.95, 0.94),  # measured 0.998, 0.984 (texture-v2; 0.868, 0.991 with texture-v1)
}


@pytest.fixture(scope="module")
def texture():
    return create_backbone("texture")


@pytest.fixture(scope="module")
def split(textile_root):
    by = {c: sorted(str(p) for p in (textile_root / c).glob("*.jpg")) for c in ("nominal", "local", "global")}
    return {"fit": by["nominal"][:N_FIT], "good": by["nominal"][600 : 600 + N_TEST], "local": by["local"][:N_TEST],
            "global": by["global"][:N_TEST]}


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_textile_image_auroc(texture, split, method):
    model = fit_anomaly(split["fit"], method, texture, target_false_reject=0.2, seed=0)
    res = score_files(model, split["good"] + split["local"] + split["global"], keep_maps=False)
    s = res.scores
    good, local, glob = s[:N_TEST], s[N_TEST : 2 * N_TEST], s[2 * N_TEST :]
    y = np.r_[np.zeros(N_TEST), np.ones(N_TEST)]
    auc_local = roc_auc_score(y, np.r_[good, local])
    auc_global = roc_auc_score(y, np.r_[good, glob])
    print(f"{method}: local {auc_local:.3f} global {auc_global:.3f}")
    floor_local, floor_global = FLOORS[method]
    assert auc_local >= floor_local and auc_global >= floor_global
    # The conformal threshold (20% target, 30 calibration scores): within three binomial sd on 30 new good images.
    assert (good > model.decision["threshold"]).mean() <= 0.2 + 3 * np.sqrt(0.2 * 0.8 / N_TEST)


def test_textile_pasted_defects_pixel_metrics(tmp_path, textile_root, texture):
    nominal = sorted((textile_root / "nominal").glob("*.jpg"))[700:]
    root = build_mvtec(tmp_path / "textile", nominal, n_train=20, n_test_good=6, n_per_defect=6, seed=2)
    model = fit_anomaly(root / "train" / "good", "patchcore", texture, target_false_reject=0.25)
    ev = evaluate_anomaly(model, root, n_bootstrap=200)
    m = ev.metrics
    print(f"pasted defects: image {m['image_auroc']:.3f} pixel {m['pixel_auroc']:.3f} aupro {m['aupro']:.3f}")
    # Measured: image 1.000, pixel 0.996, AUPRO 0.984 (texture-v2; 0.917, 0.984, 0.922 with texture-v1).
    # Chance: 0.5, 0.5, ~0.15 (PRO ~ FPR for random maps).
    assert m["pixel_auroc"] >= 0.95 and m["aupro"] >= 0.9 and m["image_auroc"] >= 0.9
    # Defect regions: the largest region's box (image pixels) holds the pasted defect. Measured on the 12 defect
    # images: every one has a region, its box holds 0.77-1.00 of the mask's pixels (mean 0.97).
    covered = []
    for r in ev.predictions.rows:
        kind = Path(r["path"]).parent.name
        if kind == "good":
            continue
        mask = np.asarray(Image.open(root / "ground_truth" / kind / f"{Path(r['path']).stem}_mask.png")) > 0
        assert r["n_regions"] >= 1 and r["n_regions"] == len(r["regions"]), r["path"]
        box = r["regions"][0]
        covered.append(mask[box["y"]:box["y"] + box["height"], box["x"]:box["x"] + box["width"]].sum() / mask.sum())
    assert len(covered) == 12 and min(covered) >= 0.65 and np.mean(covered) >= 0.9, covered


@pytest.mark.slow
def test_default_fit_on_200_good_images_meets_its_false_reject_target(texture, textile_root):
    """The common case: 200 good images and the default flags (PatchCore, 1% false rejects). The fit must not refuse,
    every image fits and calibrates (5-fold cross-conformal), and on 200 other good images the realised false-reject rate is
    within the target plus three binomial standard deviations (measured: 0.5%)."""
    nominal = sorted(str(p) for p in (textile_root / "nominal").glob("*.jpg"))
    model = fit_anomaly(nominal[:200], backbone=texture)
    d = model.decision
    assert model.head.method == "patchcore" and d["target_false_reject"] == 0.01 and "target_note" not in d
    assert model.info["n_fit_images"] == 200 and d["n_calibration"] == 200
    scored = score_files(model, nominal[600:800], keep_maps=False)
    good = scored.scores
    bound = 0.01 + 3 * np.sqrt(0.01 * 0.99 / len(good))
    assert (good > d["threshold"]).mean() <= bound
    # the defect regions' map threshold is calibrated the same way on the same images' map maxima: a good image
    # shows a region as rarely
    assert d["region_threshold"] != d["threshold"]
    assert np.mean([r["n_regions"] > 0 for r in scored.rows]) <= bound
