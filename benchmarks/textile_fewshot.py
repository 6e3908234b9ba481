"""Few-shot methods on the real textile images (nominal / local / global) with the weight-free ``texture`` backbone.

Runs ``fewvision.tasks.benchmark.run_benchmark`` - the same code as ``fewvision benchmark`` - over every registered method
at 1, 2, 4, 8 and 16 shots with 3 seeds. The textile set has no splits, so a seeded stratified half is held out for
evaluation (the support shots are drawn from the other half). Methods that need a text tower are listed as skipped.

Usage: .venv/bin/python benchmarks/textile_fewshot.py [--out DIR] [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

from fewvision.heads import head_names  # noqa: E402
from fewvision.tasks.benchmark import run_benchmark, write_outputs  # noqa: E402

SHOTS = (1, 2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for results.csv/.json and the plot")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--backbone", default="texture")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="textile-fewshot-"))

    result = run_benchmark("textile", head_names(), SHOTS, args.seeds, backbone=args.backbone, progress=True,
                           echo=lambda m: print(m, flush=True))
    paths = write_outputs(result, out)
    rows = [[r["method"], r["shots"], f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}",
             f"{r['balanced_accuracy_mean']:.4f} ± {r['balanced_accuracy_std']:.4f}",
             f"{1000 * r['fit_seconds']:.1f}", r["n_trainable_parameters"]] for r in result.rows]
    best = max((r for r in result.rows if r["shots"] == max(SHOTS)), key=lambda r: r["balanced_accuracy_mean"])
    split = result.setup["split"]
    markdown = (
        "## Few-shot methods on the textile images (`benchmarks/textile_fewshot.py`)\n\n"
        f"`fewvision benchmark textile --backbone {args.backbone} --shots {','.join(map(str, SHOTS))} --seeds "
        f"{args.seeds}`: {result.setup['n_images']} images, classes {', '.join(result.setup['classes'])}; "
        f"a seeded stratified split (seed {split['seed']}) holds out {split['test']} images for evaluation, and the "
        f"k support images per class are drawn per seed from the other {split['train']}. Mean ± standard deviation "
        "over seeds (ddof 1); fit time is the head alone on cached features.\n\n"
        + table(["method", "shots", "accuracy", "balanced accuracy", "fit ms", "trainable parameters"], rows)
        + f"\n\nBest at {best['shots']} shots: {best['method']}, balanced accuracy "
        f"{best['balanced_accuracy_mean']:.4f}.\n\nSkipped: "
        + ("; ".join(f"{s['method']} ({s['reason']})" for s in result.skipped) or "none") + "."
    )
    write_section("textile_fewshot", markdown)
    print(f"wrote {paths['csv']}, {paths['json']}, {paths['png']} and the textile_fewshot section")


if __name__ == "__main__":
    main()
