"""High-resolution images: a 16-32 px real defect in a 2048 x 2048 px image, scored tile by tile (``--tile 256``)
against the whole image resized to the backbone's input (the default).

Data: mosaics of 2048 x 2048 px, each built from 81 good textile images (conformal-clip-data ``nominal``; their
white last row and column cut off, each turned 0 or 180 degrees at random). The fitting mosaics use nominal images
[0:500], the test mosaics [500:1000]. A defect mosaic gets one defect cut from a ``local`` image (the 16-32 px
square around its speckle, found as the window with the most fine-scale energy, pasted with a soft round edge so
the patch brings no seam) at a random place: 0.006-0.024 % of the image. Builder: ``tests/anomaly_data.py``.

Models: PatchCore with every default on the weight-free ``texture`` backbone (256 px input), fitted on
``N_FIT`` good mosaics (the fit holds out 20 % of them for the threshold), once with ``tile=256`` (overlap 0.25:
121 tiles an image; PatchCore's tiled default, a 1 % coreset) and once on the whole image. Measured on ``N_TEST``
good and ``N_TEST`` defect mosaics: image AUROC; how many defect images have their map's peak on the defect (within
8 px) and their largest region overlapping it; scoring time per image and per megapixel (one process, this machine's cores); the fit's time.

Usage: .venv/bin/python benchmarks/tiling.py [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import numpy as np  # noqa: E402
from _report import table, write_section  # noqa: E402
from anomaly_data import mosaics  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from fewvision.io.datasets import textile_root  # noqa: E402
from fewvision.io.tiles import Tiling  # noqa: E402
from fewvision.tasks.anomaly import fit_anomaly, score_files  # noqa: E402

SIDE = 2048
TILE = 256
N_FIT = 16
N_TEST = 10
NEAR = 8  # px: a peak this close to the pasted defect's square is on it


def on_defect(row: dict, where: tuple[int, int, int]) -> tuple[bool, bool]:
    """(the peak is on the defect, the largest region overlaps it)."""
    x, y, size = where
    peak = x - NEAR <= row["x"] <= x + size + NEAR and y - NEAR <= row["y"] <= y + size + NEAR
    box = (row.get("regions") or [None])[0]
    overlaps = bool(box) and box["x"] < x + size and x < box["x"] + box["width"] and \
        box["y"] < y + size and y < box["y"] + box["height"]
    return peak, overlaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()
    root_data = textile_root()
    good = sorted((root_data / "nominal").glob("*.jpg"))
    local = sorted((root_data / "local").glob("*.jpg"))
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mosaics(root / "fit", good[:500], N_FIT, SIDE, rng)
        test_good = mosaics(root / "test" / "good", good[500:], N_TEST, SIDE, rng)
        test_bad = mosaics(root / "test" / "local", good[500:], N_TEST, SIDE, rng, defects=local)
        sizes = [w[2] for _, w in test_bad]
        test = [p for p, _ in test_good + test_bad]
        truth = [0] * N_TEST + [1] * N_TEST
        megapixels = SIDE * SIDE / 1e6
        for name, tile in (("tiled (--tile 256)", TILE), ("whole image resized", None)):
            start = time.perf_counter()
            model = fit_anomaly([root / "fit"], "patchcore", "texture", tile=tile, use_cache=False)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            res = score_files(model, test, use_cache=False, keep_maps=False)
            score_s = (time.perf_counter() - start) / len(test)
            scores = [r["score"] for r in res.rows]
            hits = [on_defect(r, w) for r, (_, w) in zip(res.rows[N_TEST:], test_bad)]
            auroc = roc_auc_score(truth, scores)
            rows.append([name, round(auroc, 3), f"{sum(h[0] for h in hits)} / {N_TEST}",
                         f"{sum(h[1] for h in hits)} / {N_TEST}", round(score_s, 2), round(score_s / megapixels, 2),
                         round(fit_s, 1)])
            print(rows[-1], flush=True)
    tiles = len(Tiling(TILE).boxes(SIDE, SIDE))
    markdown = (
        "## High-resolution images: tiles against the resized image (`benchmarks/tiling.py`)\n\n"
        f"{N_TEST} good and {N_TEST} defect mosaics of {SIDE} x {SIDE} px (81 good textile images each); each defect "
        f"mosaic carries one real 'local' defect of {min(sizes)}-{max(sizes)} px. PatchCore, every default, on the "
        f"`texture` backbone, fitted on {N_FIT} good mosaics. Tiled: {TILE} px tiles, overlap 0.25, "
        f"PatchCore's tiled default coreset of 1 %, {tiles} tiles an "
        "image, each resized to the backbone's 256 px input (native resolution); resized: the whole image to "
        "256 px, where the defect is 2-4 px. Peak: the map's maximum within 8 px of the defect; region: the largest "
        "defect region overlaps it. Scoring: one process, seconds per image and per megapixel, features computed "
        "(no cache). The threshold is not measured here: the fitting mosaics share their textile images "
        f"({N_FIT} x 81 cells from 500 images), so the ones a fit holds out are not new good images "
        "(`textile_anomaly` and `anomaly_calibration` measure thresholds).\n\n"
        + table(["scoring", "image AUROC", "peak on the defect", "largest region on it", "s / image", "s / MP",
                 "fit s"], rows)
    )
    print(markdown)
    if not args.no_write:
        write_section("tiling", markdown)


if __name__ == "__main__":
    main()
