"""timm patch features: fewvision's fused stage graph against the model's own ``forward_intermediates``, side by
side in one process on the same weights and the same batches.

    .venv/bin/python benchmarks/timm_patch_features.py [--no-write]

fewvision (``TimmBackbone.patch_features``) runs timm's FX feature graph cut after the last requested stage, with
each BatchNorm folded into its convolution, in channels-last layout, and packs the layers into one map. The
reference is ``model.forward_intermediates(..., stop_early=True)`` on the same model (what the backbone did before).
Random weights (seed 0), random pixels; 128 images in batches of 16; best of two passes each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _report import table, write_section  # noqa: E402

from fewvision.backbones import create_backbone  # noqa: E402
from fewvision.backbones.base import unpack_layers  # noqa: E402

MODELS = ("resnet18", "wide_resnet50_2")
N_IMAGES, BATCH = 128, 16


def _best_of_two(fn, batches) -> float:
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        for x in batches:
            fn(x)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()
    rows = []
    for name in MODELS:
        bb = create_backbone(f"timm:{name}@random")
        g = torch.Generator().manual_seed(0)
        batches = [torch.randn(BATCH, 3, *bb.input_size, generator=g) for _ in range(N_IMAGES // BATCH)]

        def reference(x):
            with torch.inference_mode():
                return bb.model.forward_intermediates(x, indices=list(bb.feature_layers), intermediates_only=True,
                                                      stop_early=True)

        t_ref = _best_of_two(reference, batches)
        t_fv = _best_of_two(bb.patch_features, batches)
        gap = max(float((a - b).abs().max()) for a, b in
                  zip(unpack_layers(bb.patch_features(batches[0]), bb.patch_layout()), reference(batches[0])))
        rows.append([name, f"{N_IMAGES} x {bb.input_size[0]} px", f"{t_ref:.2f}", f"{t_fv:.2f}", t_ref / t_fv,
                     f"{gap:.1e}"])
        print(rows[-1], flush=True)
    md = "\n".join([
        "## timm patch features (`benchmarks/timm_patch_features.py`)",
        "",
        "fewvision's `TimmBackbone.patch_features` (timm FX feature graph cut after the last stage used, BatchNorm "
        "folded into the convolutions, channels-last) against the same model's `forward_intermediates` "
        f"(stop_early), stages 2 and 3, random weights, batches of {BATCH}, best of two passes, one process.",
        "",
        table(["model", "images", "forward_intermediates s", "fewvision s", "speed-up", "max difference"], rows),
    ])
    print(md)
    if not args.no_write:
        write_section("timm_patch_features", md)


if __name__ == "__main__":
    main()
