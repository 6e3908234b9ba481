"""Scoring an image tile by tile (a model fitted with ``--tile``), without torch: the loop the torch path and the
light runtime share, so both cut, stitch and score an image the same way. The tiling's rules are in
:mod:`fewvision.io.tiles`; ``run`` is the model's own scoring of preprocessed tiles (the head and its
post-processing on torch, or the exported graph).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from ..io.images import BadImage, Skipped, load_image
from ..io.tiles import StitchedView, TileCutter, image_score, stitch
from .rows import Recorder, anomaly_rows

# tile pixels [T, 3, h, w] -> (maps [T, h', w'], scores [T])
Run = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
TILES_PER_RUN = 16


def cut(cutter: TileCutter, paths: Sequence[str], rec: Recorder) -> Iterator[tuple[str, tuple[int, int], np.ndarray,
                                                                                    list]]:
    """(path, (width, height), tile pixels, tile boxes) per readable image; the others go to ``rec.skipped`` with
    their reason and the loop goes on."""
    for path in paths:
        try:
            image = load_image(path)
            pixels, boxes = cutter(image)
        except BadImage as err:
            rec.skipped.append(Skipped(path, err.reason))
            continue
        except Exception as err:  # noqa: BLE001 - one odd image must not stop the batch
            rec.skipped.append(Skipped(path, f"cannot cut into tiles ({type(err).__name__}: {err})"))
            continue
        yield path, (image.width, image.height), pixels, boxes


def score_tiled(cutter: TileCutter, run: Run, paths: Sequence[str], rec: Recorder, *,
                tiles_per_run: int = TILES_PER_RUN) -> Iterator[tuple[str, np.ndarray, float]]:
    """(path, stitched map, image score) per readable image, in order."""
    for path, (width, height), pixels, boxes in cut(cutter, paths, rec):
        maps, scores = [], []
        for start in range(0, len(pixels), tiles_per_run):
            m, s = run(pixels[start : start + tiles_per_run])
            maps.append(np.asarray(m, dtype=np.float32))
            scores.append(np.asarray(s, dtype=np.float64).reshape(-1))
        tile_maps = np.concatenate(maps)
        stitched = stitch(tile_maps, boxes, width, height, cutter.tiling.map_size(width, height, tile_maps.shape[-2:]))
        rec.used.append(path)
        yield path, stitched, image_score(cutter.tiling, stitched, np.concatenate(scores))


def tiled_predictions(cutter: TileCutter, run: Run, paths: Sequence[str], rec: Recorder, *, view: StitchedView,
                      threshold: float | None, review_band: float, regions: tuple[float | None, float],
                      keep_maps: bool, advance: Callable[[int], None] | None = None) -> tuple[list[dict], list]:
    """(rows, stitched maps or []) of image files for a tiled model: :func:`score_tiled`, then the rows every path
    makes (:func:`fewvision.tasks.rows.anomaly_rows`) in the stitched maps' geometry."""
    rows, maps = [], []
    for path, stitched, score in score_tiled(cutter, run, paths, rec):
        rows += anomaly_rows([path], stitched[None], np.array([score]), view, stitched.shape, threshold, review_band,
                             regions)
        if keep_maps:
            maps.append(stitched)
        if advance is not None:
            advance(1)
    return rows, maps


__all__ = ["score_tiled", "tiled_predictions", "cut", "TILES_PER_RUN"]
