"""Where the pixels of an anomaly map lie in the image: display images, ground-truth masks and peak locations put
through the backbone's own preprocessing (any resize and crop followed exactly), with numpy and Pillow only, so the
torch path and the light runtime place heat maps and peaks identically. ``preprocess`` is any callable from a PIL
image to ``[C, H, W]`` pixels (a torch transform or :class:`fewvision.runtime.preprocess.Preprocess`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _pixels(value) -> np.ndarray | None:
    """A preprocessed image (torch tensor or numpy array [C, H, W]) as float32 numpy; None for anything else."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, RuntimeError):
        return None
    return array if array.ndim == 3 else None


def _affine_ends(preprocess) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel values ``preprocess`` gives to a black and a white image (None if not a per-channel affine map)."""
    lo = _pixels(preprocess(Image.new("RGB", (64, 64), (0, 0, 0))))
    hi = _pixels(preprocess(Image.new("RGB", (64, 64), (255, 255, 255))))
    if lo is None or hi is None:
        return None
    lo = lo.reshape(len(lo), -1).mean(1)
    hi = hi.reshape(len(hi), -1).mean(1)
    if not np.all(np.abs(hi - lo) > 1e-6):
        return None
    return lo.reshape(-1, 1, 1), hi.reshape(-1, 1, 1)


def input_view(image, preprocess, size: tuple[int, int]) -> np.ndarray:
    """An image (PIL) in the geometry of the maps: ``[H, W, 3]`` floats in 0..1.

    The backbone's own preprocessing (resize, crop, normalisation) is applied and the per-channel normalisation is
    undone using what it does to a black and a white image, so any crop or resize matches the maps exactly. A
    preprocessing that is not a per-channel affine map of the pixels falls back to a plain resize.
    """
    ends = _affine_ends(preprocess)
    if ends is not None:
        x = _pixels(preprocess(image.convert("RGB")))
        if x is not None and tuple(x.shape[-2:]) == tuple(size):
            lo, hi = ends
            x = np.clip((x - lo) / (hi - lo), 0, 1)
            if x.shape[0] == 1:
                x = np.broadcast_to(x, (3, *x.shape[1:]))
            return np.ascontiguousarray(x[:3].transpose(1, 2, 0))
    arr = np.asarray(image.convert("RGB").resize((size[1], size[0])), dtype=np.float32) / 255.0
    return arr


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) of an image file as ``load_image`` will see it (EXIF rotation applied), from its header."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


_COORDINATES: dict[tuple, tuple] = {}  # (id(preprocess), width, height, size) -> (preprocess, xs, ys)


def image_coordinates(preprocess, width: int, height: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel of the maps (``size``), the (x, y) of the original ``width`` x ``height`` image it shows:
    two ramp images (red = x, green = y) go through the backbone's own preprocessing, so any resize and crop is
    followed exactly, to 1/255 of the image (finer than a map pixel covers for images under ~57,000 px). Cached
    per image size: a batch from one camera computes it once. A geometry that knows its coordinates exactly (the
    stitched maps of tiled models, :class:`fewvision.io.tiles.StitchedView`) gives them itself."""
    if hasattr(preprocess, "coordinates"):
        return preprocess.coordinates(int(width), int(height), tuple(size))
    key = (id(preprocess), int(width), int(height), tuple(size))
    hit = _COORDINATES.get(key)
    if hit is not None and hit[0] is preprocess:
        return hit[1], hit[2]
    xs, ys = _image_coordinates(preprocess, int(width), int(height), tuple(size))
    if len(_COORDINATES) > 32:
        _COORDINATES.clear()
    _COORDINATES[key] = (preprocess, xs, ys)
    return xs, ys


def _image_coordinates(preprocess, width: int, height: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    # uint8 from the start: float64 ramps of a 40 MP image would take 1.9 GB
    ramp = np.zeros((height, width, 3), dtype=np.uint8)
    ramp[..., 0] = np.linspace(0, 255, width).round().astype(np.uint8)[None, :]
    ramp[..., 1] = np.linspace(0, 255, height).round().astype(np.uint8)[:, None]
    ramp = Image.fromarray(ramp, mode="RGB")
    view = input_view(ramp, preprocess, size)
    return view[..., 0] * (width - 1), view[..., 1] * (height - 1)


def peak_in_image(path: str, preprocess, size: tuple[int, int], peak: tuple[int, int]) -> tuple[int | None, int | None]:
    """(x, y) in the image's own pixels of the map pixel ``peak`` = (row, column); None when the size is unknown."""
    wh = image_size(path)
    if wh is None:
        return None, None
    xs, ys = image_coordinates(preprocess, wh[0], wh[1], tuple(size))
    return int(round(float(xs[peak]))), int(round(float(ys[peak])))


MASK_COVERAGE = 0.25


def mask_view(mask, preprocess, size: tuple[int, int], coverage: float = MASK_COVERAGE) -> np.ndarray:
    """A ground-truth mask (PIL, any mode; non-zero = defect) in the geometry of the maps: ``[H, W]`` bool.

    The mask goes through the backbone's own resize and crop; a map pixel is a defect pixel when at least
    ``coverage`` of it is defect. A quarter (not a half) so that a 2-3 px scratch survives down-scaling instead of
    vanishing from the evaluation.
    """
    binary = (np.asarray(mask.convert("L")) > 0).astype(np.uint8) * 255
    rgb = Image.fromarray(binary, mode="L").convert("RGB")
    return input_view(rgb, preprocess, size)[..., 0] >= coverage


def sampling_matrix(positions: np.ndarray, source: int) -> np.ndarray:
    """``[len(positions), source]`` weights of linear interpolation at ``positions`` (source pixel units, centres at
    integers), clamped at both ends as ``align_corners=False`` up-sampling is."""
    position = np.clip(np.asarray(positions, dtype=np.float64), 0.0, source - 1.0)
    left = np.minimum(np.floor(position).astype(np.int64), source - 1)
    right = np.minimum(left + 1, source - 1)
    weight = position - left
    matrix = np.zeros((len(position), source), dtype=np.float64)
    rows = np.arange(len(position))
    np.add.at(matrix, (rows, left), 1.0 - weight)
    np.add.at(matrix, (rows, right), weight)
    return matrix


def _interpolation_matrix(source: int, target: int) -> np.ndarray:
    """``[target, source]`` weights of 1-D linear interpolation with half-pixel centres (``align_corners=False``):
    target pixel i samples source position ``(i + 0.5) * source / target - 0.5``, clamped at the edges."""
    return sampling_matrix((np.arange(target, dtype=np.float64) + 0.5) * (source / target) - 0.5, source)


def resize_bilinear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D map resized to ``size`` as torch's ``interpolate(mode="bilinear", align_corners=False)`` does (to
    float32 rounding), with numpy alone."""
    array = np.asarray(array, dtype=np.float64)
    rows = _interpolation_matrix(array.shape[0], int(size[0]))
    cols = _interpolation_matrix(array.shape[1], int(size[1]))
    return (rows @ array @ cols.T).astype(np.float32)
