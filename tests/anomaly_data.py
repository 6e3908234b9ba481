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


# --- high-resolution mosaics with a real local defect (--tile) -----------------------------------------------------
def defect_centre(image: Image.Image) -> tuple[int, int]:
    """(x, y) of the local defect of a textile 'local' image: its defects are speckles, so the 16 px window with
    the most fine-scale energy (the image minus its 2 px Gaussian blur) away from the border."""
    from PIL import ImageFilter

    grey = image.convert("L")
    fine = np.asarray(grey, dtype=np.float32) - np.asarray(grey.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    energy = torch.from_numpy(fine ** 2)[None, None]
    local = F.avg_pool2d(energy, 16, stride=1)[0, 0].numpy()
    local[:12], local[-12:], local[:, :12], local[:, -12:] = 0, 0, 0, 0
    y, x = np.unravel_index(int(local.argmax()), local.shape)
    return int(x) + 8, int(y) + 8


def cut_defect(path: Path, size: int) -> tuple[Image.Image, Image.Image]:
    """(RGB patch, soft round alpha) of ``size`` px around the defect of a 'local' textile image: the alpha is 1
    on the patch's disc and falls to 0 over its outer 3 px, so the pasted patch brings no square seam."""
    with Image.open(path) as im:
        image = im.convert("RGB")
    x, y = defect_centre(image)
    half = size // 2
    x, y = min(max(x, half), image.width - half), min(max(y, half), image.height - half)
    patch = image.crop((x - half, y - half, x - half + size, y - half + size))
    r = np.hypot(*np.meshgrid(np.arange(size) - (size - 1) / 2, np.arange(size) - (size - 1) / 2))
    alpha = np.clip((size / 2 - r) / 3, 0, 1)
    return patch, Image.fromarray((alpha * 255).astype(np.uint8), mode="L")


BORDER = 2  # the textile images end in a white last row and column: cut 2 px off every side so no seam is white


def mosaic(cells: Sequence[Path], side: int, rng: np.random.Generator) -> Image.Image:
    """A ``side`` x ``side`` image tiled with the textile images ``cells`` (row by row, their white last row and
    column cut off, each turned 0 or 180 degrees at random: the weave's direction is kept), cropped at the right
    and bottom edges."""
    with Image.open(cells[0]) as im:
        cw, ch = im.width - 2 * BORDER, im.height - 2 * BORDER
    per_row, per_col = -(-side // cw), -(-side // ch)
    if len(cells) < per_row * per_col:
        raise ValueError(f"a {side} px mosaic of {cw} px images needs {per_row * per_col} of them")
    canvas = Image.new("RGB", (per_row * cw, per_col * ch))
    for i in range(per_row * per_col):
        with Image.open(cells[i]) as im:
            cell = im.convert("RGB").crop((BORDER, BORDER, im.width - BORDER, im.height - BORDER))
        canvas.paste(cell.rotate(180) if rng.random() < 0.5 else cell, ((i % per_row) * cw, (i // per_row) * ch))
    return canvas.crop((0, 0, side, side))


def mosaics(folder: Path, good: Sequence[Path], n: int, side: int, rng: np.random.Generator, *,
            defects: Sequence[Path] = (), defect_size: tuple[int, int] = (16, 32)) -> list[tuple[Path, tuple]]:
    """``n`` mosaics written as PNG under ``folder``, their cells drawn from ``good`` without replacement while it
    lasts; with ``defects`` ('local' images), mosaic i gets the defect of ``defects[i]`` (16-32 px) pasted at a
    random place. [(path, (x, y, size) of the defect or None)]."""
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(good[0]) as im:
        per = (-(-side // (im.width - 2 * BORDER))) * (-(-side // (im.height - 2 * BORDER)))
    order = list(rng.permutation(len(good)))
    out = []
    for i in range(n):
        if len(order) < per:
            order += list(rng.permutation(len(good)))
        cells, order = [good[j] for j in order[:per]], order[per:]
        image = mosaic(cells, side, rng)
        where = None
        if defects:
            size = int(rng.integers(defect_size[0], defect_size[1] + 1))
            patch, alpha = cut_defect(defects[i], size)
            x, y = (int(v) for v in rng.integers(0, side - size, 2))
            image.paste(patch, (x, y), alpha)
            where = (x, y, size)
        path = folder / f"mosaic_{i:03d}.png"
        image.save(path, compress_level=1)  # lossless either way; the default level takes 4 times as long
        out.append((path, where))
    return out
