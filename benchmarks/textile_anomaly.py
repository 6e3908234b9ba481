"""Anomaly detection on the real textile images (nominal / local / global) with the weight-free ``texture`` backbone.

Protocol: fit on the first 200 nominal images (sorted) with ``fit_anomaly(..., target_false_reject=0.05, seed=0)``
for PatchCore and PaDiM with default parameters: every image fits the head and, through its leave-one-out score,
calibrates the conformal threshold. Test on nominal images [600:800] (sorted) against the first 200 local and the
first 200 global images: image AUROC for good-vs-local and good-vs-global, the false-reject rate of the fitted
threshold on the 200 test good images, and the miss rate at that threshold per defect type.

Threshold study: the realised false-reject rate on the 200 test good images for targets 5% and 1%, with the
leave-one-out threshold of all 200 images against the split-conformal threshold of the previous release (160 fitted,
40 held out), the latter over 20 seeds of the split for PaDiM (whose fit takes a second).

Patch features of all 800 images are encoded once into a feature cache in a temporary folder (timed on its own),
so the fit and scoring times of both methods are the heads on cached features.

Usage: .venv/bin/python benchmarks/textile_anomaly.py [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from _report import table, write_section  # noqa: E402

from fewvision.backbones import create_backbone  # noqa: E402
from fewvision.decide.threshold import conformal_threshold  # noqa: E402
from fewvision.features.cache import open_cache  # noqa: E402
from fewvision.features.encode import PATCH, encode_files  # noqa: E402
from fewvision.io.datasets import textile_root  # noqa: E402
from fewvision.io.images import iter_image_files  # noqa: E402
from fewvision.tasks.anomaly import DEFAULT_CHUNK_IMAGES, PATCH_CACHE_DTYPE, _split, fit_anomaly, score_files  # noqa: E402

METHODS = ("patchcore", "padim")
N_FIT = 200
TEST_GOOD = slice(600, 800)
N_TEST_DEFECT = 200
TARGET_FALSE_REJECT = 0.05
HOLDOUT_FRACTION = 0.2  # the split-conformal comparison
SPLIT_SEEDS = 20
GOAL_AUROC = 0.95
BASELINE = {"local": 0.87, "global": 0.92}  # 24-filter Gabor bank + nearest-neighbour score (from the issue)


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in iter_image_files([folder]))


def main() -> None:
    from scipy.stats import ks_2samp
    from sklearn.metrics import roc_auc_score

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()

    root = textile_root()
    by = {c: _images(root / c) for c in ("nominal", "local", "global")}
    fit_paths = by["nominal"][:N_FIT]
    test = {"good": by["nominal"][TEST_GOOD], "local": by["local"][:N_TEST_DEFECT],
            "global": by["global"][:N_TEST_DEFECT]}
    assert len(fit_paths) == N_FIT and all(len(v) == 200 for v in test.values()), {k: len(v) for k, v in test.items()}
    assert not set(fit_paths) & set(test["good"])
    test_paths = test["good"] + test["local"] + test["global"]
    bb = create_backbone("texture")

    results = {}
    with tempfile.TemporaryDirectory(prefix="fv-textile-anomaly-") as cache_dir:
        # Encode every image's patch features once (the same call and cache fit_anomaly / score_files use).
        cache = open_cache(bb.id, cache_dir)
        t0 = time.perf_counter()
        all_paths = fit_paths + test_paths
        for start in range(0, len(all_paths), DEFAULT_CHUNK_IMAGES):
            encode_files(bb, all_paths[start : start + DEFAULT_CHUNK_IMAGES], cache, kind=PATCH, batch_size=16,
                         workers=0, progress=False, dtype=PATCH_CACHE_DTYPE)
        encode_s = time.perf_counter() - t0
        print(f"encoded {len(all_paths)} images in {encode_s:.1f}s", flush=True)

        for method in METHODS:
            t0 = time.perf_counter()
            model = fit_anomaly(fit_paths, method, bb, target_false_reject=TARGET_FALSE_REJECT, seed=0,
                                cache_dir=cache_dir)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pred = score_files(model, test_paths, keep_maps=False, cache_dir=cache_dir)
            score_s = time.perf_counter() - t0
            if pred.skipped:
                raise RuntimeError(f"{method}: {len(pred.skipped)} test image(s) skipped, first {pred.skipped[0]}")
            by_path = {r["path"]: r["score"] for r in pred.rows}
            scores = {k: np.array([by_path[p] for p in v]) for k, v in test.items()}
            thr = float(model.decision["threshold"])
            r = {"fit_s": fit_s, "score_s": score_s, "threshold": thr,
                 "n_fit": model.info["n_fit_images"], "n_cal": model.info["n_calibration_images"],
                 "false_reject": float(np.mean(scores["good"] > thr))}
            for defect in ("local", "global"):
                y = np.r_[np.zeros(len(scores["good"])), np.ones(len(scores[defect]))]
                r[f"auroc_{defect}"] = float(roc_auc_score(y, np.r_[scores["good"], scores[defect]]))
                r[f"miss_{defect}"] = float(np.mean(scores[defect] <= thr))
            r["meets"] = all(r[f"auroc_{d}"] >= GOAL_AUROC for d in ("local", "global"))
            cal = model.decision["calibration_scores"]
            r["ks_p"] = float(ks_2samp(cal, scores["good"]).pvalue)  # leave-one-out scores vs new good images
            for target in (0.05, 0.01):
                r[f"loo_{target}"] = float(np.mean(scores["good"] > conformal_threshold(cal, target)))
            seeds = range(SPLIT_SEEDS) if method == "padim" else range(1)
            for target in (0.05, 0.01):
                r[f"split_{target}"] = []
            for seed in seeds:  # the previous release's split conformal: fit on 160, calibrate on the other 40
                fit_idx, hold_idx = _split(len(fit_paths), HOLDOUT_FRACTION, seed)
                part = fit_anomaly([fit_paths[i] for i in fit_idx], method, bb, target_false_reject=0.05, seed=0,
                                   cache_dir=cache_dir)
                held = score_files(part, [fit_paths[i] for i in hold_idx], keep_maps=False, cache_dir=cache_dir)
                test_good = score_files(part, test["good"], keep_maps=False, cache_dir=cache_dir).scores
                for target in (0.05, 0.01):
                    try:
                        thr = conformal_threshold(held.scores, target)
                        r[f"split_{target}"].append(float(np.mean(test_good > thr)))
                    except ValueError:  # 40 held-out images cannot support 1%
                        pass
            results[method] = r
            print(f"{method}: {r}", flush=True)

    rows = [[m, r["auroc_local"], r["auroc_global"], "yes" if r["meets"] else "**no**",
             f"{100 * r['false_reject']:.1f}%", f"{100 * r['miss_local']:.1f}%", f"{100 * r['miss_global']:.1f}%",
             f"{r['fit_s']:.1f}", f"{r['score_s']:.1f}"] for m, r in results.items()]
    rows.append(["baseline: 24-filter Gabor bank + nearest neighbour", BASELINE["local"], BASELINE["global"],
                 "**no**", "-", "-", "-", "-", "-"])
    study_rows = []
    for m, r in results.items():
        study_rows.append([m, "leave-one-out, all 200", f"{100 * r['loo_0.05']:.1f}%", f"{100 * r['loo_0.01']:.1f}%"])
        for target in (0.05, 0.01):
            v = r[f"split_{target}"]
            r[f"split_text_{target}"] = (
                "not reachable" if not v else f"{100 * v[0]:.1f}%" if len(v) == 1 else
                f"mean {100 * np.mean(v):.1f}%, {100 * min(v):.1f}-{100 * max(v):.1f}% over {len(v)} seeds")
        study_rows.append([m, "split conformal, 40 held out", r["split_text_0.05"], r["split_text_0.01"]])
    first = next(iter(results.values()))
    verdict = "; ".join(
        f"{m} {'meets' if r['meets'] else 'does **not** meet'} it"
        + ("" if r["meets"] else " (" + ", ".join(f"{d} {r[f'auroc_{d}']:.4f}" for d in ("local", "global")
                                                    if r[f"auroc_{d}"] < GOAL_AUROC) + ")")
        + f" and {'beats' if all(r[f'auroc_{d}'] > BASELINE[d] for d in BASELINE) else 'does **not** beat'}"
        " the baseline on both"
        for m, r in results.items())
    markdown = (
        "## Anomaly detection on the textile images (`benchmarks/textile_anomaly.py`)\n\n"
        f"Backbone `texture` (weight-free). Each method (default parameters) is fitted with `fit_anomaly` on the first "
        f"{N_FIT} nominal images (sorted): all {first['n_fit']} fit the head and their {first['n_cal']} leave-one-out "
        f"scores set the conformal threshold for a target false-reject rate of {TARGET_FALSE_REJECT:.0%}. Test: nominal "
        f"images [{TEST_GOOD.start}:{TEST_GOOD.stop}] (sorted) against the first {N_TEST_DEFECT} local and the "
        f"first {N_TEST_DEFECT} global images, scored with `score_files`. False reject: share of the "
        f"{TEST_GOOD.stop - TEST_GOOD.start} test good images above the fitted threshold; miss: share of that defect "
        "type at or below it.\n\n"
        f"Goal (from the issue): image AUROC >= {GOAL_AUROC} on both local and global. Baseline to beat: a 24-filter "
        f"Gabor bank with a nearest-neighbour score, {BASELINE['local']} local / {BASELINE['global']} global "
        "(figures quoted from the issue, not measured by this script).\n\n"
        + table(["method", "AUROC good vs local", "AUROC good vs global", f"meets >= {GOAL_AUROC} on both",
                 "false reject (target 5%)", "miss local", "miss global", "fit s", "score s (600 images)"], rows)
        + f"\n\nVerdict: {verdict}.\n\n"
        + "Realised false-reject rate on the 200 test good images (threshold study):\n\n"
        + table(["method", "threshold from", "target 5%", "target 1%"], study_rows)
        + "\n\nWith 40 held-out images the split-conformal threshold is the 39th of 40 scores, so the false-reject rate "
        "it gives is Beta(2, 39)-distributed around 5% (sd 3.3 points) before the binomial noise of 200 test images; "
        f"PaDiM's split at seed 0 (the previous release's) gives {100 * results['padim']['split_0.05'][0]:.1f}% here. "
        "The leave-one-out scores of images 0-199 and the scores of the test good images 600-799 come from one "
        "distribution as far as a two-sample Kolmogorov-Smirnov test can tell (p = "
        + ", ".join(f"{r['ks_p']:.2f} {m}" for m, r in results.items()) + "). "
        "With 40 images a 1% target is not reachable at all (it needs 99). Leave-one-out calibration on all 200 "
        "images narrows the spread and reaches 1%.\n\n"
        f"Patch features of all {len(all_paths)} images were encoded once into a temporary feature cache first "
        f"({encode_s:.1f} s wall), so fit times (fitting plus scoring the held-out good images) and scoring times "
        "are the heads on cached features (fit includes the leave-one-out scoring pass). Wall times are from a machine "
        "shared with other work."
    )
    print(markdown)
    if not args.no_write:
        write_section("textile_anomaly", markdown)
        print("wrote the textile_anomaly section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
