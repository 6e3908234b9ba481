"""Tiling for high-resolution images (``anomaly fit --tile SIZE --tile-overlap F``), with numpy and Pillow only, so
the torch path and the light runtime cut, preprocess and stitch identically.

* **Grid.** Along each axis of length ``L`` the tiles are ``t = min(SIZE, L)`` pixels long and start at
  ``round(linspace(0, L - t, n))`` with ``n = ceil((L - t) / (t (1 - F))) + 1``: the first tile at the image's
  start, the last at its end, neighbours overlapping by at least ``F`` of a tile. No padding: every tile is image.
* **Tile pixels.** A tile is cut from the image at its native resolution and resized straight to the backbone's
  input size (its interpolation), then converted and normalised as the backbone does (:func:`tile_steps`); the
  backbone's own resize-and-centre-crop would cut the tile's borders, and those pixels would be seen by no tile at
  the image's edges.
* **Stitched map.** One map per image at ``scale = min(MAX_MAP_SCALE, map side / SIZE)`` map pixels per image
  pixel (a 2048 x 2048 image with 256 px tiles: 1024 x 1024), its pixel centres where a plain resize of the image to
  that size puts them. Each stitched pixel takes, from every tile whose pixels it lies in, the tile's finished map
  sampled bilinearly at that point, and keeps the **largest** (the rule in overlaps): the map then agrees with an
  image score taken as its maximum, and a defect seen well inside one tile is not diluted by a neighbour that sees
  it at its border, where a CNN's features have less context.
* **Image score.** For heads whose image score is their map's maximum, the stitched map's maximum; for heads that
  score an image themselves (PatchCore's re-weighted distance, GANomaly's latent code), the largest of their tiles'
  scores (``decision["tiling"]["score"]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..runtime.preprocess import Preprocess, output_size
from .geometry import sampling_matrix

MAX_MAP_SCALE = 0.5  # a stitched map pixel covers at least 2 x 2 image pixels: the features' own grid is coarser
DEFAULT_OVERLAP = 0.25


class TilingError(ValueError):
    """A tiling that cannot be used; one line."""


@dataclass(frozen=True)
class Tiling:
    size: int
    overlap: float = DEFAULT_OVERLAP
    score: str = "map_max"  # how an image score comes from its tiles: "map_max" or "tile_max" (module doc)

    def __post_init__(self):
        if not int(self.size) >= 16:
            raise TilingError(f"--tile must be at least 16 pixels, got {self.size}")
        if not 0 <= float(self.overlap) < 1:
            raise TilingError(f"--tile-overlap must be in [0, 1), got {self.overlap}")
        if self.score not in ("map_max", "tile_max"):
            raise TilingError(f"unknown tile score rule {self.score!r}")

    @classmethod
    def of(cls, decision: dict | None) -> "Tiling | None":
        """A model's tiling (``decision["tiling"]``), or None for a model that scores whole images."""
        spec = (decision or {}).get("tiling")
        return cls(int(spec["size"]), float(spec["overlap"]), spec.get("score", "map_max")) if spec else None

    def as_dict(self) -> dict[str, Any]:
        return {"size": int(self.size), "overlap": float(self.overlap), "score": self.score}

    def starts(self, length: int) -> tuple[int, list[int]]:
        """(tile length, the tiles' start offsets) along an axis of ``length`` pixels."""
        tile = min(int(self.size), int(length))
        stride = max(1.0, tile * (1.0 - float(self.overlap)))
        n = math.ceil(max(0, length - tile) / stride) + 1
        return tile, sorted({int(round(v)) for v in np.linspace(0, length - tile, n)})

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """(x0, y0, width, height) of every tile of a ``width`` x ``height`` image, row by row."""
        tw, xs = self.starts(width)
        th, ys = self.starts(height)
        return [(x, y, tw, th) for y in ys for x in xs]

    def map_size(self, width: int, height: int, tile_map: Sequence[int]) -> tuple[int, int]:
        """(height, width) of the stitched map of a ``width`` x ``height`` image (``tile_map``: one tile's map)."""
        scale = min(MAX_MAP_SCALE, min(int(tile_map[0]), int(tile_map[1])) / int(self.size))
        return max(1, round(height * scale)), max(1, round(width * scale))


def tile_steps(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The backbone's preprocessing steps for a tile: its resizes and crops replaced by one resize straight to its
    input size (so the whole tile is seen), its conversion and normalisation kept."""
    size = output_size(steps)
    if size is None:
        raise TilingError("tiling needs a backbone whose preprocessing ends at a fixed size")
    interpolation = next((s["interpolation"] for s in steps if s["op"] in ("resize", "resize_keep_ratio")),
                         "bilinear")
    out: list[dict[str, Any]] = [{"op": "rgb"}]
    out.append({"op": "resize", "size": [int(size[0]), int(size[1])], "max_size": None,
                "interpolation": interpolation})
    out += [dict(s) for s in steps if s["op"] in ("to_array", "normalize")]
    return out


class TileCutter:
    """PIL image -> (tile pixels ``[T, 3, h, w]`` float32, their boxes), the tiles preprocessed by
    :func:`tile_steps`."""

    def __init__(self, tiling: Tiling, steps: Sequence[dict[str, Any]]):
        self.tiling = tiling
        self.preprocess = Preprocess(tile_steps(steps))

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        image = image.convert("RGB")
        boxes = self.tiling.boxes(image.width, image.height)
        pixels = [self.preprocess(image.crop((x, y, x + w, y + h))) for x, y, w, h in boxes]
        return np.stack(pixels), boxes


def _centres(length: int, count: int) -> np.ndarray:
    """Image coordinates of the pixel centres of a plain resize of ``length`` pixels to ``count``."""
    return (np.arange(count, dtype=np.float64) + 0.5) * (length / count) - 0.5


def stitch(tile_maps: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], width: int, height: int,
           size: tuple[int, int]) -> np.ndarray:
    """The stitched ``size`` map of a ``width`` x ``height`` image from its tiles' finished maps ``[T, h, w]``
    (each covering its box exactly): bilinear samples at the stitched pixels' centres, the largest where tiles
    overlap (see the module's doc)."""
    tile_maps = np.asarray(tile_maps, dtype=np.float32)
    out = np.full(size, -np.inf, dtype=np.float32)
    ys, xs = _centres(height, size[0]), _centres(width, size[1])
    mh, mw = tile_maps.shape[-2:]
    for tile, (x0, y0, w, h) in zip(tile_maps, boxes):
        rows = np.flatnonzero((ys >= y0 - 0.5) & (ys <= y0 + h - 0.5))
        cols = np.flatnonzero((xs >= x0 - 0.5) & (xs <= x0 + w - 0.5))
        if not len(rows) or not len(cols):
            continue
        r = sampling_matrix((ys[rows] - y0 + 0.5) * (mh / h) - 0.5, mh)
        c = sampling_matrix((xs[cols] - x0 + 0.5) * (mw / w) - 0.5, mw)
        sampled = (r @ tile.astype(np.float64) @ c.T).astype(np.float32)
        block = out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        np.maximum(block, sampled, out=block)
    if not np.isfinite(out).all():  # the tiles cover the image by construction; a gap is a bug, not a zero
        raise TilingError(f"the tiles of a {width} x {height} image left stitched pixels uncovered")
    return out


def image_score(tiling: Tiling, stitched: np.ndarray, tile_scores: np.ndarray) -> float:
    return float(stitched.max()) if tiling.score == "map_max" else float(np.max(tile_scores))


class StitchedView:
    """The geometry of stitched maps, in the role a backbone's ``preprocess`` plays for whole-image maps
    (:mod:`fewvision.io.geometry`): an image resized to its stitched map's size (values in 0..1), and each map
    pixel's exact image coordinates (:meth:`coordinates`)."""

    def __init__(self, tiling: Tiling, tile_map: Sequence[int]):
        self.tiling, self.tile_map = tiling, (int(tile_map[0]), int(tile_map[1]))

    def size_of(self, width: int, height: int) -> tuple[int, int]:
        return self.tiling.map_size(width, height, self.tile_map)

    def __call__(self, image: Image.Image) -> np.ndarray:
        h, w = self.size_of(image.width, image.height)
        resized = image.convert("RGB").resize((w, h), Image.BILINEAR)
        return np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)

    def coordinates(self, width: int, height: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(xs, ys) ``[H, W]``: the image pixel each stitched map pixel's centre lies on."""
        ys, xs = _centres(height, size[0]), _centres(width, size[1])
        grid_x, grid_y = np.meshgrid(np.clip(xs, 0, width - 1), np.clip(ys, 0, height - 1))
        return grid_x, grid_y

    def __repr__(self) -> str:
        return f"StitchedView({self.tiling}, tile map {self.tile_map})"


def geometry_of(decision: dict, preprocess, map_size: Sequence[int]):
    """What places a model's maps on its images: the backbone's preprocessing for whole-image maps, a
    :class:`StitchedView` for a tiled model's stitched maps."""
    tiling = Tiling.of(decision)
    return StitchedView(tiling, map_size) if tiling else preprocess


__all__ = ["Tiling", "TilingError", "TileCutter", "StitchedView", "stitch", "image_score", "tile_steps", "geometry_of",
           "MAX_MAP_SCALE", "DEFAULT_OVERLAP"]
