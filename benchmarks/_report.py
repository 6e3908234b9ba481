"""Benchmark scripts write their results into docs/benchmarks.md, each into its own marked section.

A section is replaced in place between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` (appended if absent), so
every script can be re-run alone without touching the others' numbers. Written atomically.
"""

from __future__ import annotations

import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

from fewvision.io.atomic import atomic_write_text

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every number on this page is written by a script in `benchmarks/` (named in each section); none is typed.\n"
    "Re-run one with `.venv/bin/python benchmarks/<script>.py`, or all with `make benchmarks`.\n"
)


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {datetime.now(timezone.utc):%Y-%m-%d}")


def write_section(name: str, markdown: str, path: Path = DOC) -> None:
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- BEGIN {name} -->\n{markdown.rstrip()}\n\n_Machine: {machine()}._\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def percentile(values, q: float):
    """The nearest-rank ``q`` quantile of ``values`` (q in [0, 1])."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]
