"""Whole-process time of ``fewvision classify`` with a cold and with a warm cache (weights loaded only when needed).

A ViT-B-32 weights file (open_clip's architecture, seeded random weights: none can be downloaded here; load time does
not depend on the values) is written to a temp folder, then ``fewvision classify`` runs as a user runs it, in a new
process, over 128 textile images: once with an empty cache (weights hashed and loaded, images encoded) and
``--repeats`` times with the features and prompt embeddings cached. The warm runs must not build the model.

Usage: .venv/bin/python benchmarks/warm_start.py [--images 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

FEWVISION = [sys.executable, "-m", "fewvision.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import logging

    import open_clip
    import torch
    from safetensors.torch import save_file

    from fewvision.io.datasets import textile

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's random-init notice
    work = Path(tempfile.mkdtemp(prefix="warm-start-"))
    try:
        weights = work / f"{args.model}.safetensors"
        torch.manual_seed(0)
        model = open_clip.create_model(args.model)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        del model
        images = work / "images"
        images.mkdir()
        for p in textile().paths[: args.images]:
            shutil.copy(p, images / Path(p).name)
        env = {**os.environ, "FEWVISION_CACHE_DIR": str(work / "cache")}
        command = [*FEWVISION, "classify", str(images), "--classes", "nominal,local,global", "--backbone",
                   f"openclip:{args.model}@{weights}", "--out", str(work / "out.csv")]

        def run() -> float:
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            return time.perf_counter() - start

        cold = run()
        cold_rows = (work / "out.csv").read_text()
        warm_runs = [run() for _ in range(args.repeats)]
        assert (work / "out.csv").read_text() == cold_rows, "the warm run gave other results"
        warm = statistics.median(warm_runs)
        size_mb = weights.stat().st_size / 1e6
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [["cold cache (hash + load weights, encode)", f"{cold:.2f}"],
            ["warm cache (features and prompts cached)", f"{warm:.2f}"]]
    md = (
        "## Warm start: a cached run does not load the weights (`benchmarks/warm_start.py`)\n\n"
        f"`fewvision classify` over {args.images} textile images in a new process, `openclip:{args.model}@FILE` "
        f"({size_mb:.0f} MB weights file), median of {args.repeats} warm runs.\n\n"
        + table(["run", "seconds (whole process)"], rows)
        + f"\n\n- cold / warm: **{cold / warm:.1f}x** (goal >= 4x)\n"
    )
    write_section("warm_start", md)
    print(md)


if __name__ == "__main__":
    main()
