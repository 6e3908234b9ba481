"""Throughput of `fewvision classify` against a bare open_clip loop, and cold- against warm-cache run time.

Both sides use the same architecture and seeded random weights (no weights can be downloaded here; speed does not
depend on the weight values), the same images, batch size and thread count, measured side by side in one run.
The bare loop is what a user would write: open each file with PIL, apply open_clip's preprocess, stack a batch,
``model.encode_image`` under ``torch.inference_mode``, then the zero-shot softmax.

Usage: .venv/bin/python benchmarks/classify_speed.py [--model ViT-B-32] [--images 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

from fewvision.backbones import create_backbone  # noqa: E402
from fewvision.io.datasets import textile  # noqa: E402
from fewvision.tasks.zeroshot import classify  # noqa: E402

CLASSES = ["nominal", "local", "global"]


def bare_loop(backbone, paths, classes, batch_size):
    """Plain open_clip: PIL decode + preprocess in the main process, batched encode, zero-shot softmax."""
    import open_clip
    from PIL import Image

    model, preprocess, tokenizer = backbone.model, backbone.preprocess, backbone.tokenizer
    with torch.inference_mode():
        weights = open_clip.build_zero_shot_classifier(model, tokenizer, classes, open_clip.SIMPLE_IMAGENET_TEMPLATES)
        scale = model.logit_scale.exp()
        out = []
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]])
            feats = model.encode_image(batch, normalize=True)
            out.append((scale * feats @ weights).softmax(dim=-1))
    return torch.cat(out)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)

    spec = f"openclip:{args.model}@random"
    backbone = create_backbone(spec)
    paths = textile().paths[: args.images]
    n = len(paths)

    bare_s = timed(lambda: bare_loop(backbone, paths, CLASSES, args.batch_size), args.repeats)

    def ours_no_cache():
        classify(paths, CLASSES, backbone=backbone, templates=["simple"], use_cache=False, batch_size=args.batch_size)

    ours_s = timed(ours_no_cache, args.repeats)

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cold = classify(paths, CLASSES, backbone=backbone, templates=["simple"], cache_dir=cache_dir,
                        batch_size=args.batch_size)
        cold_s = time.perf_counter() - start
        warm_runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            warm = classify(paths, CLASSES, backbone=backbone, templates=["simple"], cache_dir=cache_dir,
                            batch_size=args.batch_size)
            warm_runs.append(time.perf_counter() - start)
            assert warm.encoded == 0, "warm run ran the encoder"
        warm_s = statistics.median(warm_runs)
    assert cold.labels == warm.labels

    ratio = (n / ours_s) / (n / bare_s)
    rows = [
        ["bare open_clip loop", f"{n / bare_s:.1f}", "1.00"],
        ["fewvision classify (no cache)", f"{n / ours_s:.1f}", f"{ratio:.2f}"],
        ["fewvision classify, cold cache", f"{n / cold_s:.1f}", f"{bare_s / cold_s:.2f}"],
        ["fewvision classify, warm cache", f"{n / warm_s:.1f}", f"{bare_s / warm_s:.2f}"],
    ]
    md = (
        "## classify throughput and the feature cache (`benchmarks/classify_speed.py`)\n\n"
        f"{n} textile images, `{spec}` (seeded random weights), batch size {args.batch_size}, CPU; "
        f"median of {args.repeats} runs.\n\n"
        + table(["pipeline", "images/s", "ratio to bare loop"], rows)
        + f"\n\n- throughput ratio, classify / bare open_clip loop: **{ratio:.2f}** (goal >= 0.95)\n"
        f"- cold / warm cache run time: {cold_s:.2f} s / {warm_s:.3f} s = **{cold_s / warm_s:.0f}x** (goal >= 50x)\n"
    )
    write_section("classify_speed", md)
    print(md)


if __name__ == "__main__":
    main()
