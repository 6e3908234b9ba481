"""Datasets with many classes, made on first use from data installed with the package (nothing downloaded):

* ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), written as PNG files;
* ``textile-defects``: **synthetic** defects painted on the ``conformal-clip-data`` textile's *nominal* images -
  six defect types (spots, scratches, holes, stains, folds, missing threads) and the untouched nominal images, 100
  of each by default, to play a site's known (base) and new (novel) defect types for meta-learning. They are
  drawn by the rules below, not photographed: accuracy on them says how a method separates these drawn shapes on
  this fabric, not how it does on a real line.

Each is written once under ``<cache>/datasets/<name>-v<version>/`` (a class folder each), seeded, into a temporary
folder renamed into place, so an interrupted run leaves nothing half-written; later loads read the folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .paths import cache_dir
from .textile import TEXTILE_CLASSES, images_in, textile_root

DEFECT_TYPES = ("spots", "scratches", "holes", "stains", "folds", "missing_threads")
GENERATED = ("digits", "textile-defects")
VERSION = 1  # bump when the drawing rules change: another version is another folder


def generated_root(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The class-folder root of a generated dataset, made if missing."""
    makers: dict[str, Callable[[Path], None]] = {"digits": write_digits, "textile-defects": write_textile_defects}
    if name not in makers:
        raise ValueError(f"unknown generated dataset '{name}': expected one of {', '.join(GENERATED)}")
    root = cache_dir(cache) / "datasets" / f"{name}-v{VERSION}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
    try:
        makers[name](tmp)
        os.replace(tmp, root)
    except OSError:
        if not root.is_dir():  # not another process that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_digits(root: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(int(label))
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), "L").save(folder / f"digit_{i:04d}.png")


# --- synthetic textile defects --------------------------------------------------------------------------------
def _grid(shape):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    return yy, xx


def _soft(distance: np.ndarray, radius: float, edge: float = 1.0) -> np.ndarray:
    """1 inside ``radius``, 0 outside, a linear edge ``edge`` pixels wide (anti-aliased shapes)."""
    return np.clip((radius - distance) / edge + 0.5, 0.0, 1.0)


def _line_distance(yy, xx, y0, x0, angle, half_length=None):
    """Distance of every pixel to a line (or segment of ``half_length``) through (y0, x0) at ``angle``."""
    dy, dx = np.sin(angle), np.cos(angle)
    along = (yy - y0) * dy + (xx - x0) * dx
    across = np.abs(-(yy - y0) * dx + (xx - x0) * dy)
    if half_length is None:
        return across, along
    beyond = np.clip(np.abs(along) - half_length, 0, None)
    return np.hypot(across, beyond), along


def _blur(img: np.ndarray, radius: float) -> np.ndarray:
    from PIL import Image, ImageFilter

    grey = Image.fromarray(np.round(np.clip(img, 0, 255)).astype(np.uint8), "L")
    return np.asarray(grey.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` (grey levels 0-255, float) with one defect of ``kind`` drawn at a random place, size and angle."""
    img = image.astype(np.float64).copy()
    h, w = img.shape
    yy, xx = _grid(img.shape)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    if kind == "spots":  # a few small round dark or bright dots
        for _ in range(rng.integers(1, 5)):
            y, x = cy + rng.normal(0, 18), cx + rng.normal(0, 18)
            m = _soft(np.hypot(yy - y, xx - x), rng.uniform(2.5, 6.5))
            img = img * (1 - m) + m * (rng.uniform(10, 45) if rng.random() < 0.7 else rng.uniform(215, 250))
    elif kind == "scratches":  # a thin bright straight line segment
        d, _ = _line_distance(yy, xx, cy, cx, rng.uniform(0, np.pi), rng.uniform(35, 100))
        m = _soft(d, rng.uniform(0.6, 1.3))
        img = img * (1 - m) + m * np.minimum(img + rng.uniform(70, 110), 255)
    elif kind == "holes":  # a dark opening with a frayed, irregular rim
        angle = np.arctan2(yy - cy, xx - cx)
        r0 = rng.uniform(8, 18)
        phases, amps = rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.05, 0.18, 3)
        radius = r0 * (1 + sum(a * np.sin((k + 2) * angle + p) for k, (a, p) in enumerate(zip(amps, phases))))
        dist = np.hypot(yy - cy, xx - cx)
        rim = _soft(np.abs(dist - radius), 1.2) * (rng.random(img.shape) < 0.7)
        inside = _soft(dist, radius)
        img = img * (1 - inside) + inside * rng.uniform(5, 25)
        img = img * (1 - rim) + rim * rng.uniform(190, 235)
    elif kind == "stains":  # a large, soft, low-contrast dark blot
        m = np.zeros_like(img)
        for _ in range(rng.integers(3, 7)):
            y, x, s = cy + rng.normal(0, 15), cx + rng.normal(0, 15), rng.uniform(10, 28)
            m = np.maximum(m, np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s)))
        img = img * (1 - rng.uniform(0.25, 0.45) * m)
    elif kind == "folds":  # a crease across the cloth: a bright and a dark band side by side
        angle, s = rng.uniform(0, np.pi), rng.uniform(4, 9)
        side = -(yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)  # signed distance to the crease line
        shade = -side / s * np.exp(0.5 - side**2 / (2 * s * s))  # derivative-of-Gaussian profile, peak 1
        img = img + rng.uniform(45, 75) * shade
    elif kind == "missing_threads":  # a thread gone along the weave: a smooth lighter stripe across the image
        angle = np.deg2rad(rng.uniform(-25, -10)) if rng.random() < 0.7 else np.deg2rad(rng.uniform(-5, 5))
        across, _ = _line_distance(yy, xx, cy, cx, angle)
        m = _soft(across, rng.uniform(1.5, 3.0))
        img = img * (1 - m) + m * np.minimum(_blur(img, 4) + rng.uniform(20, 40), 255)
    else:
        raise ValueError(f"unknown defect type '{kind}': expected one of {', '.join(DEFECT_TYPES)}")
    return np.clip(img, 0, 255)


def write_textile_defects(root: Path, per_class: int = 100, seed: int = 0) -> None:
    """``per_class`` images of each defect type and of nominal cloth, each from a different nominal image."""
    from PIL import Image

    nominal = images_in(textile_root() / TEXTILE_CLASSES[0])
    classes = ("nominal",) + DEFECT_TYPES
    if len(nominal) < per_class * len(classes):
        raise ValueError(f"{per_class} images per class need {per_class * len(classes)} nominal textile images; "
                         f"the package has {len(nominal)}")
    order = np.random.default_rng(seed).permutation(len(nominal))
    for c, kind in enumerate(classes):
        folder = root / kind
        folder.mkdir()
        for j in range(per_class):
            source = nominal[order[c * per_class + j]]
            with Image.open(source) as im:
                grey = np.asarray(im.convert("L"), dtype=np.float64)
            if kind != "nominal":
                grey = paint_defect(grey, kind, np.random.default_rng([seed, c, j]))
            Image.fromarray(np.round(grey).astype(np.uint8), "L").save(folder / f"{kind}_{j:03d}_{source.stem}.png")
