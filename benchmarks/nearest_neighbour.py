"""PatchCore's exact nearest-neighbour search: faiss ``IndexFlatL2`` against fewvision's ``nearest_rows`` (chunked
torch matrix products), side by side on the same random data in one process.

    .venv/bin/python benchmarks/nearest_neighbour.py [--no-write]

Sizes are PatchCore's: the queries are the patches of 16 test images (28 x 28 grid), the bank a 10% coreset of
50 or 200 training images or all patches of 50 (resnet18 layer2+3: 384 channels; wide_resnet50_2: 1536). Each
search runs twice; the faster run counts. The two must return the same nearest items.
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

from fewvision.anomaly.patchcore import nearest_rows  # noqa: E402

PATCHES_PER_IMAGE = 28 * 28
CASES = [  # (label, bank rows, channels, k)
    ("resnet18, 10% of 50 images", 3920, 384, 1),
    ("resnet18, 10% of 200 images", 15680, 384, 1),
    ("resnet18, all patches of 50 images", 39200, 384, 1),
    ("wide_resnet50_2, 10% of 200 images", 15680, 1536, 1),
    ("resnet18, 10% of 200 images, k = 9 (Eq. 7)", 15680, 384, 9),
]


def _best_of_two(fn):
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()
    try:
        import faiss
    except ImportError:
        text = "**Not measured**: faiss is not installed (`pip install faiss-cpu`)."
        print(text)
        if not args.no_write:
            write_section("nearest_neighbour", "## PatchCore nearest-neighbour search\n\n" + text)
        return

    rows = []
    for label, n_bank, dim, k in CASES:
        g = torch.Generator().manual_seed(0)
        bank = torch.randn(n_bank, dim, generator=g)
        queries = torch.randn(16 * PATCHES_PER_IMAGE, dim, generator=g)
        index = faiss.IndexFlatL2(dim)
        index.add(np.ascontiguousarray(bank.numpy()))
        q = np.ascontiguousarray(queries.numpy())
        t_faiss, (d_faiss, i_faiss) = _best_of_two(lambda: index.search(q, k))
        t_torch, (d_torch, i_torch) = _best_of_two(lambda: nearest_rows(queries, bank, k))
        same = float((i_torch.numpy()[:, 0] == i_faiss[:, 0]).mean())
        gap = float(np.abs(d_torch.numpy() - np.sqrt(np.maximum(d_faiss, 0))).max())
        rows.append([label, len(queries), n_bank, dim, k, f"{t_faiss:.2f}", f"{t_torch:.2f}", t_faiss / t_torch,
                     f"{same:.4f}", f"{gap:.1e}"])
        print(rows[-1], flush=True)
    md = "\n".join([
        "## PatchCore nearest-neighbour search (`benchmarks/nearest_neighbour.py`)",
        "",
        f"Exact search, float32, random data; faiss {faiss.__version__} (`IndexFlatL2.search`, "
        f"{faiss.omp_get_max_threads()} OpenMP threads) against fewvision's `anomaly.patchcore.nearest_rows` "
        f"(chunks of queries, one `torch.addmm` per chunk, {torch.get_num_threads()} torch threads). Best of two "
        "runs each, in one process.",
        "",
        table(["case", "queries", "bank rows", "channels", "k", "faiss s", "fewvision s", "faiss / fewvision",
               "same nearest item", "max distance gap"], rows),
        "",
        "Both compute the squared distances as |q|^2 - 2 q.m + |m|^2 with a matrix product; the difference is "
        "whose BLAS does the product. fewvision uses torch's, which is why PatchCore no longer depends on faiss.",
    ])
    print(md)
    if not args.no_write:
        write_section("nearest_neighbour", md)


if __name__ == "__main__":
    main()
