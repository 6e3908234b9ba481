"""PatchCore's threshold calibration with its default coreset: realised false-reject rate of new good images.

Protocol: the 1000 nominal textile images, weight-free ``texture`` backbone, patch features encoded once (float16,
as the feature cache stores them). For each random split (seeded): 200 images fit PatchCore with default
parameters (``coreset_ratio=0.1``, seed = the split's number) and calibrate its threshold; the other 800 are new
good images, scored by the fitted model. Two calibrations of the same fitted model, targets 1 % and 5 %
(``conformal_threshold``: the ``ceil((n + 1)(1 - alpha))``-th smallest of the 200 calibration scores):

* previous release - each image scored against the full coreset without the items taken from its own patches
  (the other items were chosen by a greedy k-center that saw the image);
* 5-fold cross-conformal (now the default) - each image scored by the coreset of its fold, drawn from the other
  folds' patches only (``PatchCore.score_left_out``).

Realised false-reject rate = share of the 800 new good images above the threshold. Splits run until the time budget
(CPU time of this process) is spent, at least one. Timings: the fit of the shipped coreset, the calibration pass of each method (for the
cross-conformal one: drawing the fold coresets and scoring every image with its fold's), on cached features.

Usage: .venv/bin/python benchmarks/anomaly_calibration.py [--cpu-minutes 5] [--max-splits 20] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _report import table, write_section  # noqa: E402

from fewvision.anomaly.patchcore import PatchCore, cross_conformal_bound  # noqa: E402
from fewvision.backbones import create_backbone  # noqa: E402
from fewvision.decide.threshold import conformal_threshold  # noqa: E402
from fewvision.features.cache import open_cache  # noqa: E402
from fewvision.features.encode import PATCH, encode_files  # noqa: E402
from fewvision.io.datasets import textile_root  # noqa: E402
from fewvision.io.images import iter_image_files  # noqa: E402
from fewvision.tasks.anomaly import DEFAULT_CHUNK_IMAGES, PATCH_CACHE_DTYPE  # noqa: E402

N_FIT = 200
TARGETS = (0.01, 0.05)
METHODS = {"old": "full coreset without the image's own items (previous release)",
           "cross": "5-fold cross-conformal (default now)"}


def _chunked(fn, x: torch.Tensor) -> np.ndarray:
    """Scores of ``x`` by ``fn(chunk, first_index)`` in fit_anomaly's chunks."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), DEFAULT_CHUNK_IMAGES):
            out.append(fn(x[start : start + DEFAULT_CHUNK_IMAGES], start)[1].double().numpy())
    return np.concatenate(out)


class _Clock:
    """Wall and CPU seconds (this process, all threads) since the last lap."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def one_split(features: torch.Tensor, split: int, n_fit: int) -> dict:
    order = np.random.default_rng(split).permutation(len(features))
    fit_x, new_x = features[np.sort(order[:n_fit])], features[np.sort(order[n_fit:])]
    r = {}
    clock = _Clock()
    head = PatchCore(seed=split).fit(fit_x)
    r["fit_s"], r["fit_cpu"] = clock.lap()
    cal = {"old": _chunked(head._score_without_own_items, fit_x)}
    r["old_s"], r["old_cpu"] = clock.lap()
    cal["cross"] = _chunked(head.score_left_out, fit_x)
    r["cross_s"], r["cross_cpu"] = clock.lap()
    r["folds"] = len({head.calibration_fold(i) for i in range(n_fit)})
    head.release_fit_data()
    new = _chunked(lambda x, _: head.score(x), new_x)
    r["n_new"] = len(new)
    for name, scores in cal.items():
        r[f"mean_{name}"] = float(scores.mean())
        for alpha in TARGETS:
            r[f"{name}_{alpha}"] = float(np.mean(new > conformal_threshold(scores, alpha)))
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-minutes", type=float, default=5.0,
                        help="CPU time (all threads) after which no further split starts (at least one runs)")
    parser.add_argument("--max-splits", type=int, default=20)
    parser.add_argument("--fit-images", type=int, default=N_FIT, help="good images that fit and calibrate")
    parser.add_argument("--images", type=int, default=None, help="use only the first N nominal images (smoke tests)")
    parser.add_argument("--cache-dir", default=None,
                        help="feature cache folder (default: fewvision's; a second run does not encode again)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()

    paths = sorted(str(p) for p in iter_image_files([textile_root() / "nominal"]))[: args.images]
    n_fit = args.fit_images
    bb = create_backbone("texture")
    t0 = time.perf_counter()
    cache = open_cache(bb.id, args.cache_dir)
    parts = []
    for start in range(0, len(paths), DEFAULT_CHUNK_IMAGES):
        feats = encode_files(bb, paths[start : start + DEFAULT_CHUNK_IMAGES], cache, kind=PATCH, batch_size=16,
                             workers=0, progress=False, dtype=PATCH_CACHE_DTYPE)
        if feats.skipped:
            raise RuntimeError(f"unreadable textile image: {feats.skipped[0]}")
        parts.append(torch.from_numpy(feats.features).float())
    features = torch.cat(parts)
    encode_s = time.perf_counter() - t0
    print(f"encoded {len(features)} images in {encode_s:.1f}s", flush=True)

    runs, start = [], time.process_time()
    while len(runs) < args.max_splits and (not runs or time.process_time() - start < 60 * args.cpu_minutes):
        runs.append(one_split(features, len(runs), n_fit))
        print(f"split {len(runs) - 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in runs[-1].items()), flush=True)
        report(runs, n_fit, len(features), encode_s, write=not args.no_write)  # after every split: an interrupted
        # run still leaves the splits it finished


def report(runs: list[dict], n_fit: int, n_images: int, encode_s: float, write: bool) -> None:
    n_new, folds = runs[0]["n_new"], runs[0]["folds"]
    rows = []
    for name, label in METHODS.items():
        row = [label]
        for alpha in TARGETS:
            v = np.array([r[f"{name}_{alpha}"] for r in runs])
            row += [f"{100 * v.mean():.2f}%", f"{100 * v.min():.2f}-{100 * v.max():.2f}%",
                    f"{int((v > alpha).sum())} of {len(v)}"]
        rows.append(row)
    mean = lambda key: float(np.mean([r[key] for r in runs]))  # noqa: E731
    timing = [[f"fit of the shipped coreset ({n_fit} images)", f"{mean('fit_s'):.1f}", f"{mean('fit_cpu'):.1f}"],
              [f"calibration, previous release (bank without own items, {n_fit} images scored)",
               f"{mean('old_s'):.1f}", f"{mean('old_cpu'):.1f}"],
              [f"calibration, {folds}-fold cross-conformal ({folds} fold coresets drawn, {n_fit} images scored)",
               f"{mean('cross_s'):.1f}", f"{mean('cross_cpu'):.1f}"]]
    old_total, new_total = mean("fit_cpu") + mean("old_cpu"), mean("fit_cpu") + mean("cross_cpu")
    score_ratio = np.mean([r["mean_cross"] / r["mean_old"] for r in runs])
    markdown = (
        "## PatchCore threshold calibration with a coreset (`benchmarks/anomaly_calibration.py`)\n\n"
        f"Textile nominal images, `texture` backbone, PatchCore defaults (coreset 10 %). {len(runs)} random splits: "
        f"{n_fit} good images fit the model and calibrate its threshold, the other {n_new} are new good images. "
        "Realised false-reject rate = share of the new good images above the threshold (mean over splits, range, "
        "and how many splits exceeded the target). Both rows calibrate the same fitted model; only the "
        "calibration scores differ.\n\n"
        + table(["calibration scores", "target 1%: realised", "range", "splits above 1%",
                 "target 5%: realised", "range", "splits above 5%"], rows)
        + f"\n\nMean calibration score, cross-conformal / previous: {score_ratio:.3f}. With {n_fit} images and "
        f"{folds} folds the proven worst case of the cross-conformal rule (Barber et al. 2021, Theorem 4; for a "
        "part rejected only when every fold coreset scores it above the threshold, not for the shipped coreset "
        f"these rows measure) is {cross_conformal_bound(0.01, n_fit, folds):.3f} for a 1 % target and "
        f"{cross_conformal_bound(0.05, n_fit, folds):.3f} for 5 %.\n\n"
        "Time per split (mean; on features encoded once, or read from the feature cache: "
        f"{n_images} images in {encode_s:.1f} s wall):\n\n"
        + table(["step", "wall s", "CPU s (all threads)"], timing)
        + f"\n\nFit plus calibration, CPU time: {old_total:.1f} s with the previous calibration, {new_total:.1f} s "
        f"with the cross-conformal one ({new_total / old_total:.2f}x). The machine was shared with other work, so "
        "wall times are longer than the CPU times; the CPU times are the comparable ones."
    )
    print(markdown, flush=True)
    if write:
        write_section("anomaly_calibration", markdown)
        print(f"wrote the anomaly_calibration section ({len(runs)} splits)", flush=True)


if __name__ == "__main__":
    main()
