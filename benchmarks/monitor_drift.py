"""Drift alarms: the false-alarm rate of the conformal test martingale on in-distribution images, and how many images
each kind of shift takes to be caught, against a plain "3 scores over the threshold in a row" rule.

PaDiM on the weight-free ``texture`` backbone, fitted on 100 good textile images (conformal-clip-data); its
calibration scores are its leave-one-out scores. In-distribution: the other 900 good images, in ``--null-orders``
random orders (the martingale's alarm must come in at most delta of them). The same for a prototype classification
head (60 images per class, half held out for calibration; the monitor watches 1 - the top probability). Shifts,
applied to images the model never saw: Gaussian blur sigma 1 and 2, brightness -15 %, JPEG quality 30, a 5 degree
rotation; each stream is 100 good images then the shifted ones, in ``--orders`` random orders; the delay is the
number of shifted images up to and including the one that raised the alarm (an alarm before the shift counts as a
false alarm, none at all as "not caught"). Goal: blur sigma 2 caught within 50 images at delta 0.01.

Usage: .venv/bin/python benchmarks/monitor_drift.py [--orders 100]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from fewvision.monitor.watch import Monitor

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


def null_row(cal, thr, ok, args, rng) -> list:
    false_alarms, peaks, rule_false = 0, [], 0
    for k in range(args.null_orders):
        order = rng.permutation(ok)
        mon = Monitor(cal, threshold=thr, delta=args.delta, seed=k, keep_series=True).run(order)
        false_alarms += any(a["kind"] == "martingale" for a in mon.alarms)
        peaks.append(max(mon.series["martingale"]))
        rule_false += thr is not None and run_rule(order, thr) is not None
    # Wilson 95 % interval of the false-alarm rate
    n, x, z = args.null_orders, false_alarms, 1.96
    centre = (x + z * z / 2) / (n + z * z)
    half = z * math.sqrt(x * (n - x) / n + z * z / 4) / (n + z * z)
    return ["none (in distribution)", f"{x}/{n} = {x / n:.3f} (95 % CI {max(0, centre - half):.3f}-"
            f"{centre + half:.3f})", f"{rule_false}/{n}" if thr is not None else "-",
            f"largest martingale value: median {np.median(peaks):.2f}, max {max(peaks):.2f} (alarm at "
            f"{1 / args.delta:g})"]


def shift_row(name, cal, thr, base, shifted, args, rng) -> list:
    delays, rule_delays, early = [], [], 0
    for k in range(args.orders):
        stream = np.r_[rng.permutation(base)[:100], rng.permutation(shifted)]
        mon = Monitor(cal, threshold=thr, delta=args.delta, seed=k, keep_series=False).run(stream)
        first = min((a["row"] for a in mon.alarms if a["kind"] == "martingale"), default=None)
        if first is not None and first < 100:
            early += 1
        delays.append(math.inf if first is None or first < 100 else first - 99)
        if thr is not None:
            r = run_rule(stream, thr)
            rule_delays.append(math.inf if r is None or r < 100 else r - 99)
    fmt = lambda d: "not caught" if math.isinf(d) else f"{d:g}"  # noqa: E731
    rule = (f"median {fmt(percentile(rule_delays, 0.5))}, p90 {fmt(percentile(rule_delays, 0.9))}"
            if thr is not None else "-")
    note = (f"{100 * float(np.mean(shifted > thr)):.0f}% of the shifted images over the threshold" if thr is not None
            else f"median non-conformity {np.median(shifted):.3g} (in distribution {np.median(base):.3g})")
    return [name, f"median {fmt(percentile(delays, 0.5))}, p90 {fmt(percentile(delays, 0.9))}"
            + (f" ({early} early)" if early else ""), rule, note]


def shifted_copies(images: list[Path], work: Path) -> dict[str, list[Path]]:
    from PIL import Image

    out = {}
    for name in SHIFTS:
        folder = work / name.replace(" ", "_").replace("%", "pct")
        folder.mkdir(parents=True)
        out[name] = [shift(name, Image.open(p).convert("RGB"), folder / p.stem) for p in images]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=100, help="random orders of each shifted stream")
    parser.add_argument("--null-orders", type=int, default=1000,
                        help="random orders of the in-distribution stream (enough for the interval to reach delta)")
    parser.add_argument("--delta", type=float, default=0.01)
    args = parser.parse_args()
    import shutil

    from fewvision.io.datasets import textile_root
    from fewvision.monitor.watch import nonconformity, reference
    from fewvision.tasks.anomaly import fit_anomaly, score_files
    from fewvision.tasks.fewshot import fit, predict

    root = textile_root()
    work = Path(tempfile.mkdtemp(prefix="monitor-drift-"))
    rng = np.random.default_rng(0)

    good = sorted((root / "nominal").glob("*.jpg"))
    model = fit_anomaly(good[:100], "padim", "texture", target_false_reject=0.01, use_cache=False)
    cal, thr = reference("anomaly", model.decision)
    ok = score_files(model, good[100:], keep_maps=False, use_cache=False).scores
    anomaly_rows = [null_row(cal, thr, ok, args, rng)]
    for name, paths in shifted_copies(good[100:300], work / "anomaly").items():  # images the model never saw
        shifted = score_files(model, paths, keep_maps=False, use_cache=False).scores
        anomaly_rows.append(shift_row(name, cal, thr, ok[200:], shifted, args, rng))

    classes = ("nominal", "local", "global")
    for c in classes:
        (work / "train" / c).mkdir(parents=True)
        for p in sorted((root / c).glob("*.jpg"))[:60]:
            shutil.copy(p, work / "train" / c / p.name)
    head = fit(str(work / "train"), "prototype", backbone="texture", calibrate_fraction=0.5, use_cache=False)
    cal, thr = reference("classification", head.decision)

    def unsure(paths):
        return np.array([nonconformity("classification", r["top_probability"])
                         for r in predict(head, paths, use_cache=False).rows])

    stream = [p for c in classes for p in sorted((root / c).glob("*.jpg"))[60:360]]
    ok = unsure(stream)
    class_rows = [null_row(cal, thr, ok, args, rng)]
    shift_from = [p for c in classes for p in sorted((root / c).glob("*.jpg"))[360:427]]
    for name, paths in shifted_copies(shift_from, work / "classification").items():
        class_rows.append(shift_row(name, cal, thr, ok, unsure(paths), args, rng))
    shutil.rmtree(work, ignore_errors=True)

    header = ["shift", "martingale: alarms / images to the alarm", "3 over the threshold in a row", ""]
    md = ("## Drift alarms (`benchmarks/monitor_drift.py`)\n\n"
          f"delta = {args.delta}. First row of each table: false alarms in {args.null_orders} random orders of "
          "in-distribution images (Wilson interval). Other rows: images until the alarm after a shift (100 "
          f"in-distribution images, then about 200 shifted ones, {args.orders} random orders), against the rule "
          "'3 scores over the threshold in a row' where there is a threshold.\n\n"
          "**PaDiM** on the `texture` backbone fitted on 100 good textile images (threshold at a 1 % false-reject "
          "target; calibration: its leave-one-out scores); in distribution: the other 900 good images.\n\n"
          + table(header, anomaly_rows)
          + "\n\n**Prototype head** on the `texture` backbone, 60 textile images per class (nominal, local, global), "
          "half of them held out for calibration; the monitor watches 1 - the top probability; in distribution: "
          "300 other images per class; shifted: 67 other images per class.\n\n"
          + table(header, class_rows)
          + "\n\nGoal: blur sigma 2 caught within 50 images at delta 0.01.\n")
    print(md)
    write_section("monitor_drift", md)


if __name__ == "__main__":
    main()
