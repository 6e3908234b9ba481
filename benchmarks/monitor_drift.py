"""Drift alarms: the false-alarm rate of the conformal test martingale on in-distribution images, and how many images
each kind of shift takes to be caught, against a plain "3 scores over the threshold in a row" rule.

PaDiM on the weight-free ``texture`` backbone, fitted on 100 good textile images (conformal-clip-data); its
calibration scores are its leave-one-out scores. In-distribution: the other 900 good images, in ``--null-orders`` random
orders (the martingale's alarm must come in at most delta of them). Shifts, applied to good images the model never
saw: Gaussian blur sigma 1 and 2, brightness -15 %, JPEG quality 30, a 5 degree rotation; each stream is 100 good
images then the shifted ones, in ``--orders`` random orders; the delay is the number of shifted images up to and
including the one that raised the alarm (an alarm before the shift counts as a false alarm, none at all as "not
caught"). Goal: blur sigma 2 caught within 50 images at delta 0.01.

Usage: .venv/bin/python benchmarks/monitor_drift.py [--orders 100]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import percentile, table, write_section  # noqa: E402

SHIFTS = ("blur sigma 1", "blur sigma 2", "brightness -15 %", "JPEG quality 30", "rotation 5 degrees")


def shift(name: str, image, out: Path) -> Path:
    """``image`` with the shift ``name`` applied, saved under ``out`` (PNG; JPEG at quality 30 for that shift)."""
    from PIL import ImageEnhance, ImageFilter

    if name == "JPEG quality 30":
        out = out.with_suffix(".jpg")
        image.save(out, quality=30)
        return out
    if name.startswith("blur"):
        image = image.filter(ImageFilter.GaussianBlur(float(name.split()[-1])))
    elif name.startswith("brightness"):
        image = ImageEnhance.Brightness(image).enhance(0.85)
    else:
        image = image.rotate(5, resample=3)  # bicubic
    out = out.with_suffix(".png")
    image.save(out)
    return out


def run_rule(scores: np.ndarray, threshold: float, k: int = 3) -> int | None:
    """The first index where the last ``k`` scores are all over the threshold."""
    run = 0
    for i, s in enumerate(scores):
        run = run + 1 if s > threshold else 0
        if run >= k:
            return i
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=100, help="random orders of each shifted stream")
    parser.add_argument("--null-orders", type=int, default=1000,
                        help="random orders of the in-distribution stream (enough for the interval to reach delta)")
    parser.add_argument("--delta", type=float, default=0.01)
    args = parser.parse_args()
    from PIL import Image

    from fewvision.io.datasets import textile_root
    from fewvision.monitor.watch import Monitor
    from fewvision.tasks.anomaly import fit_anomaly, score_files

    good = sorted((textile_root() / "nominal").glob("*.jpg"))
    model = fit_anomaly(good[:100], "padim", "texture", target_false_reject=0.01, use_cache=False)
    cal, thr = model.decision["calibration_scores"], model.decision["threshold"]
    in_dist = good[100:]
    ok = score_files(model, in_dist, keep_maps=False, use_cache=False).scores
    rng = np.random.default_rng(0)
    false_alarms, peaks, rule_false = 0, [], 0
    for k in range(args.null_orders):
        order = rng.permutation(ok)
        mon = Monitor(cal, threshold=thr, delta=args.delta, seed=k, keep_series=True).run(order)
        false_alarms += any(a["kind"] == "martingale" for a in mon.alarms)
        peaks.append(max(mon.series["martingale"]))
        rule_false += run_rule(order, thr) is not None
    # Wilson 95 % interval of the false-alarm rate
    n, x, z = args.null_orders, false_alarms, 1.96
    centre = (x + z * z / 2) / (n + z * z)
    half = z * math.sqrt(x * (n - x) / n + z * z / 4) / (n + z * z)
    rows = [["none (in distribution)", f"{x}/{n} = {x / n:.3f} (95 % CI {max(0, centre - half):.3f}-"
             f"{centre + half:.3f})", f"{rule_false}/{n}", f"largest martingale value: median {np.median(peaks):.2f}, "
             f"max {max(peaks):.2f} (alarm at {1 / args.delta:g})"]]

    shift_images = good[100:300]  # shifted copies of images the model never saw
    work = Path(tempfile.mkdtemp(prefix="monitor-drift-"))
    for name in SHIFTS:
        folder = work / name.replace(" ", "_").replace("%", "pct")
        folder.mkdir()
        paths = [shift(name, Image.open(p).convert("RGB"), folder / p.stem) for p in shift_images]
        shifted = score_files(model, paths, keep_maps=False, use_cache=False).scores
        base = ok[200:]  # good images other than the shifted ones' originals
        delays, rule_delays, early = [], [], 0
        for k in range(args.orders):
            stream = np.r_[rng.permutation(base)[:100], rng.permutation(shifted)]
            mon = Monitor(cal, threshold=thr, delta=args.delta, seed=k, keep_series=False).run(stream)
            first = min((a["row"] for a in mon.alarms if a["kind"] == "martingale"), default=None)
            if first is not None and first < 100:
                early += 1
            delays.append(math.inf if first is None or first < 100 else first - 99)
            r = run_rule(stream, thr)
            rule_delays.append(math.inf if r is None or r < 100 else r - 99)
        fmt = lambda d: "not caught" if math.isinf(d) else f"{d:g}"  # noqa: E731
        over = float(np.mean(shifted > thr))
        rows.append([name, f"median {fmt(percentile(delays, 0.5))}, p90 {fmt(percentile(delays, 0.9))}"
                     + (f" ({early} early)" if early else ""),
                     f"median {fmt(percentile(rule_delays, 0.5))}, p90 {fmt(percentile(rule_delays, 0.9))}",
                     f"{100 * over:.0f}% of the shifted images over the threshold"])
    md = ("## Drift alarms (`benchmarks/monitor_drift.py`)\n\n"
          f"PaDiM on the `texture` backbone fitted on 100 good textile images (threshold at a 1 % false-reject "
          f"target), delta = {args.delta}. First row: false alarms in {args.null_orders} random orders of the other "
          "900 good images' scores (Wilson interval). Other rows: images until the alarm after a shift (100 good "
          f"images, then 200 shifted ones, {args.orders} random orders), against the rule '3 scores over the "
          "threshold in a row'.\n\n"
          + table(["shift", "martingale: alarms / images to the alarm", "3 in a row", ""], rows)
          + "\n\nGoal: blur sigma 2 caught within 50 images at delta 0.01.\n")
    print(md)
    write_section("monitor_drift", md)


if __name__ == "__main__":
    main()
