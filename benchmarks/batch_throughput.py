"""Throughput of `fewvision batch`: the Ray pipeline with 1 and 2 workers, and the in-process batch against
`fewvision predict`.

A prototype classifier on ``timm:resnet50@random`` (seeded random weights: none can be downloaded here; speed does
not depend on the values), fitted on 4 textile images per class, scores ``--images`` other textile images.

* Ray: a local cluster started once with workers + 1 logical CPUs (``ray.init(num_cpus=3)``), then
  ``run_batch(..., ray="auto", workers=N)`` for N = 1 and 2 (one torch thread per actor), best of ``--repeats``.
  "wall" is the whole call (the actors start and load the model inside it); "steady" counts the images that arrive
  after the first result, over the time from the first result to the last - the pipeline's rate once it runs.
* In process: ``fewvision batch MODEL DIR -o r.parquet --no-cache`` against ``fewvision predict MODEL DIR -o r.csv
  --no-cache``, each a new process as a user runs it (imports and model load included), torch's default threads,
  alternated, best of ``--repeats``.

Usage: .venv/bin/python benchmarks/batch_throughput.py [--images 256] [--repeats 2] [--no-write]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

FEWVISION = [sys.executable, "-m", "fewvision.cli"]
SPEC = "timm:resnet50@random"
CLASSES = ["nominal", "local", "global"]


def images(folder: Path, n: int) -> Path:
    """``n`` textile images (half nominal, a quarter each of local and global) copied into class folders, none of
    them a fitting image."""
    from fewvision.io.datasets import textile_root

    root = textile_root()
    share = {"nominal": n - 2 * (n // 4), "local": n // 4, "global": n // 4}
    for c in CLASSES:
        (folder / c).mkdir(parents=True)
        for p in sorted((root / c).glob("*.jpg"))[10 : 10 + share[c]]:
            shutil.copy(p, folder / c / p.name)
    return folder


def ray_run(model: Path, root: Path, out: Path, workers: int) -> dict:
    import fewvision.tasks.batch as batch

    arrivals: list[tuple[float, int]] = []
    tally = batch._tally

    def timed_tally(table, *args):  # when each batch of rows reaches the driver
        arrivals.append((time.perf_counter(), table.num_rows))
        return tally(table, *args)

    out.unlink(missing_ok=True)
    batch._tally = timed_tally
    try:
        start = time.perf_counter()
        summary = batch.run_batch(model, root, out, ray="auto", workers=workers)
        wall = time.perf_counter() - start
    finally:
        batch._tally = tally
    n = summary.n_scored + len(summary.skipped)
    after_first = sum(k for _, k in arrivals[1:])
    steady = after_first / (arrivals[-1][0] - arrivals[0][0]) if len(arrivals) > 1 else float("nan")
    return {"n": n, "wall": wall, "wall_rate": n / wall, "steady_rate": steady, "workers": summary.workers}


def cli_seconds(*args) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*FEWVISION, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)

    import pyarrow.parquet as pq
    import ray

    from fewvision.io.datasets import textile_root
    from fewvision.modelfile import save_model
    from fewvision.tasks.fewshot import fit

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = images(tmp / "images", args.images)
        support = [str(p) for c in CLASSES for p in sorted((textile_root() / c).glob("*.jpg"))[:4]]
        model = save_model(tmp / "model.fvm", fit(support, "prototype", SPEC, labels=[c for c in CLASSES
                                                                                   for _ in range(4)]))
        n = sum(1 for _ in root.rglob("*.jpg"))

        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            runs = {w: [] for w in (1, 2)}
            for _ in range(args.repeats):
                for w in runs:
                    runs[w].append(ray_run(model, root, tmp / f"ray{w}.parquet", w))
                    print(w, runs[w][-1], flush=True)
        finally:
            ray.shutdown()
        best = {w: max(r, key=lambda x: x["steady_rate"]) for w, r in runs.items()}
        best_wall = {w: max(r, key=lambda x: x["wall_rate"]) for w, r in runs.items()}

        predict_s, batch_s = [], []
        for _ in range(args.repeats):
            predict_s.append(cli_seconds("predict", model, root, "-o", tmp / "p.csv", "--no-cache"))
            (tmp / "b.parquet").unlink(missing_ok=True)
            batch_s.append(cli_seconds("batch", model, root, "-o", tmp / "b.parquet", "--no-cache"))
            print("predict", predict_s[-1], "batch", batch_s[-1], flush=True)

        local = {r["path"]: r for r in pq.read_table(tmp / "b.parquet").to_pylist()}
        worst = max(abs(r[f"p_{c}"] - local[r["path"]][f"p_{c}"]) for w in (1, 2)
                    for r in pq.read_table(tmp / f"ray{w}.parquet").to_pylist() for c in CLASSES)
        same_labels = all(r["label"] == local[r["path"]]["label"] for w in (1, 2)
                          for r in pq.read_table(tmp / f"ray{w}.parquet").to_pylist())

    load_end = os.getloadavg()[0]
    scaling = best[2]["steady_rate"] / best[1]["steady_rate"]
    wall_scaling = best_wall[2]["wall_rate"] / best_wall[1]["wall_rate"]
    in_process = min(predict_s) / min(batch_s)
    rows = [[f"Ray, {w} worker(s)", f"{best[w]['steady_rate']:.2f}", f"{best_wall[w]['wall_rate']:.2f}",
             f"{best_wall[w]['wall']:.1f}"] for w in (1, 2)]
    rows += [["`fewvision predict` (a new process)", "", f"{n / min(predict_s):.2f}", f"{min(predict_s):.1f}"],
             ["`fewvision batch`, in process (a new process)", "", f"{n / min(batch_s):.2f}", f"{min(batch_s):.1f}"]]
    md = (
        "## fewvision batch: Ray workers and the in-process batch (`benchmarks/batch_throughput.py`)\n\n"
        f"{n} textile images, a prototype classifier on `{SPEC}` (seeded random weights), CPU, best of "
        f"{args.repeats} runs. Ray: a local cluster of 3 logical CPUs (workers + 1), one torch thread per actor, "
        "batches of 32; *steady* is the rate once the first results have arrived, *wall* the whole call with the "
        "actors' start-up and model load (the cluster was already up). In process: each command in a new process, "
        "torch's default threads, `--no-cache`.\n\n"
        + table(["run", "steady images/s", "wall images/s", "wall s"], rows)
        + f"\n\n- Ray, 2 workers / 1 worker: **{scaling:.2f}x** steady, {wall_scaling:.2f}x wall (goal >= 1.7x)\n"
        f"- in-process batch / `fewvision predict`: **{in_process:.2f}x** (goal >= 0.9x)\n"
        f"- Ray rows against the in-process rows: the same labels: {'yes' if same_labels else 'NO'}; largest "
        f"probability difference {worst:.1e}\n"
        f"- load average (1 min) of the machine when the run started / ended: {load_start:.2f} / {load_end:.2f}\n"
        f"\nThis machine has {os.cpu_count()} cores: with 2 workers the two actors take both, and the read tasks, "
        "the driver and Ray's own processes run on the same cores.\n"
    )
    print(md)
    if not args.no_write:
        write_section("batch_throughput", md)


if __name__ == "__main__":
    main()
