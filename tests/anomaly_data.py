"""Build small MVTec-AD-layout data sets from good textile images by pasting synthetic defects, with their masks.

* scratch: a thin straight line (2-3 px), bright or dark, 40-90 px long, at a random angle;
* spot: a blob (ellipse, radius 5-12 px) filled with bright or dark noise.

Defects stay away from the border (the timm preprocessing crops about 16 px on each side of a 250 px image).
Layout: ``train/good``, ``test/good``, ``test/scratch``, ``test/spot``, ``ground_truth/<type>/<name>_mask.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fewvision.backbones.base import Backbone, make_id

MARGIN = 40


def _scratch(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    mask = Image.new("L", size, 0)
    length = rng.uniform(40, 90)
    angle = rng.uniform(0, np.pi)
    dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
    cx = rng.uniform(MARGIN + abs(dx), w - MARGIN - abs(dx))
    cy = rng.uniform(MARGIN + abs(dy), h - MARGIN - abs(dy))
    ImageDraw.Draw(mask).line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(2, 4)))
    return mask


def _spot(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    mask = Image.new("L", size, 0)
    rx, ry = rng.uniform(5, 12), rng.uniform(5, 12)
    cx, cy = rng.uniform(MARGIN, w - MARGIN), rng.uniform(MARGIN, h - MARGIN)
    ImageDraw.Draw(mask).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return mask


def paste_defect(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """(image with the defect, mask) for ``kind`` 'scratch' or 'spot'."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = (_scratch if kind == "scratch" else _spot)(image.size, rng)
    m = np.asarray(mask) > 0
    bright = rng.random() < 0.5
    if kind == "scratch":
        value = np.full(arr.shape[:2], 245.0 if bright else 15.0)
    else:
        base = 200.0 if bright else 50.0
        value = np.clip(base + rng.normal(0, 45, arr.shape[:2]), 0, 255)
    arr[m] = value[m][:, None]
    return Image.fromarray(arr.astype(np.uint8)), mask


def build_mvtec(root: Path, good_images: Sequence[Path], *, n_train: int, n_test_good: int, n_per_defect: int,
                seed: int = 0, kinds: Sequence[str] = ("scratch", "spot")) -> Path:
    """Write the layout under ``root`` from ``good_images`` (needs n_train + n_test_good + n_per_defect*len(kinds))."""
    need = n_train + n_test_good + n_per_defect * len(kinds)
    if len(good_images) < need:
        raise ValueError(f"need {need} good images, got {len(good_images)}")
    rng = np.random.default_rng(seed)
    images = list(good_images)
    (root / "train" / "good").mkdir(parents=True)
    (root / "test" / "good").mkdir(parents=True)
    for p in images[:n_train]:
        shutil.copy(p, root / "train" / "good" / p.name)
    for p in images[n_train : n_train + n_test_good]:
        shutil.copy(p, root / "test" / "good" / p.name)
    start = n_train + n_test_good
    for k, kind in enumerate(kinds):
        (root / "test" / kind).mkdir(parents=True)
        (root / "ground_truth" / kind).mkdir(parents=True)
        for p in images[start + k * n_per_defect : start + (k + 1) * n_per_defect]:
            with Image.open(p) as im:
                bad, mask = paste_defect(im, kind, rng)
            bad.save(root / "test" / kind / f"{p.stem}.png")
            mask.save(root / "ground_truth" / kind / f"{p.stem}_mask.png")
    return root


class PixelPatchBackbone(Backbone):
    """A tiny, weight-free backbone for plumbing tests: 64x64 input, patch features = the 4x4 pixel blocks of the
    normalised image (48 values each) on a 16x16 grid. Fast enough to run many fits in a test."""

    spec = "test:pixel-patches"

    def __init__(self, size: int = 64):
        from torchvision import transforms

        self.size = size
        self._preprocess = transforms.Compose([
            transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
            transforms.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
        ])
        self._id = make_id("test-pixel-patches", "none", repr(self._preprocess))

    @property
    def preprocess(self):
        return self._preprocess

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.size, self.size)

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        n, c, h, w = pixels.shape
        blocks = F.unfold(pixels.float(), kernel_size=4, stride=4)  # [n, c*16, (h/4)*(w/4)]
        return blocks.view(n, c * 16, h // 4, w // 4)
