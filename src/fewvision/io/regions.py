"""Defect regions: the connected parts of an anomaly map above the threshold, in the image's own pixels.

numpy only (the light install has no scipy): a run-length labelling with union-find, 4-connected like
``scipy.ndimage.label``'s default structure (tested equal to it). A map pixel is placed in the image through the same
coordinate ramps as the peak (:func:`fewvision.io.geometry.image_coordinates`), so any resize and centre crop of the
backbone's preprocessing is followed exactly; a region's box is the union of its map pixels' footprints, and its area
is its map pixel count times the image area one map pixel covers.
"""

from __future__ import annotations

import numpy as np


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels [H, W] int32: 0 background, 1..n regions in raster order of their first pixel, n) of a boolean mask,
    4-connected."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    parent: list[int] = []

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    runs: list[tuple[int, int, int]] = []  # (row, start, stop) of each run of True, stop exclusive
    previous: list[tuple[int, int, int]] = []  # (start, stop, run id) of the row above
    padded = np.zeros(width + 2, dtype=np.int8)
    occupied = mask.any(axis=1)
    for row in range(height):
        if not occupied[row]:
            previous = []
            continue
        padded[1:-1] = mask[row]
        edges = np.flatnonzero(np.diff(padded))
        current = []
        j = 0
        for start, stop in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            run = len(runs)
            runs.append((row, start, stop))
            parent.append(run)
            while j < len(previous) and previous[j][1] <= start:  # runs above that end before this one starts
                j += 1
            k = j
            while k < len(previous) and previous[k][0] < stop:  # overlapping columns: 4-connected
                a, b = root(run), root(previous[k][2])
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1
            current.append((start, stop, run))
        previous = current
    labels = np.zeros((height, width), dtype=np.int32)
    names: dict[int, int] = {}
    for run, (row, start, stop) in enumerate(runs):
        labels[row, start:stop] = names.setdefault(root(run), len(names) + 1)
    return labels, len(names)


def defect_regions(heat: np.ndarray, threshold: float, xs: np.ndarray, ys: np.ndarray, width: int, height: int,
                   min_area: float = 0.0) -> list[dict]:
    """The regions of ``heat`` [H, W] above ``threshold``, largest first, those under ``min_area`` image pixels
    dropped. ``xs`` / ``ys`` [H, W]: the image x / y each map pixel shows (``image_coordinates``); ``width`` x
    ``height``: the image's size. Each region: ``x``, ``y``, ``width``, ``height`` (its box in image pixels),
    ``area_px`` and ``area_pct`` (of the image) and ``peak`` (its highest map value)."""
    heat = np.asarray(heat, dtype=np.float32)
    labels, n = label_regions(heat > threshold)
    if n == 0:
        return []
    rows, cols = heat.shape
    # the image pixels between neighbouring map pixels (constant under resize and crop; the ramps place the end
    # pixels to 1/255 of the image, so the step is within about 0.2 % on a 640 px image)
    step_x = float(xs[:, -1].mean() - xs[:, 0].mean()) / (cols - 1) if cols > 1 else float(width)
    step_y = float(ys[-1, :].mean() - ys[0, :].mean()) / (rows - 1) if rows > 1 else float(height)
    # per-region reductions over the region pixels only, grouped by a sort (numpy's ufunc.at is ~50x slower)
    flat = labels.ravel()
    inside = np.flatnonzero(flat)
    order = inside[np.argsort(flat[inside], kind="stable")]
    starts = np.flatnonzero(np.diff(flat[order], prepend=0))
    counts = np.diff(np.append(starts, len(order)))
    peaks = np.maximum.reduceat(heat.ravel()[order], starts)
    lo_x, hi_x = np.minimum.reduceat(xs.ravel()[order], starts), np.maximum.reduceat(xs.ravel()[order], starts)
    lo_y, hi_y = np.minimum.reduceat(ys.ravel()[order], starts), np.maximum.reduceat(ys.ravel()[order], starts)
    regions = []
    for label in range(n):  # 0..n-1: regions 1..n in label order
        area = float(counts[label]) * step_x * step_y
        if area < min_area:
            continue
        # xs / ys are pixel indices (pixel i spans [i, i + 1)): a map pixel centred at index c covers
        # [c + 0.5 - step / 2, c + 0.5 + step / 2); an edge within half a map pixel of the image's is the image's
        # (the ramps place a map pixel to 1/255 of the image)
        x0, x1 = _edges(lo_x[label], hi_x[label], step_x, width)
        y0, y1 = _edges(lo_y[label], hi_y[label], step_y, height)
        regions.append({"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0, "area_px": int(round(area)),
                        "area_pct": round(100.0 * area / max(width * height, 1), 4), "peak": float(peaks[label])})
    regions.sort(key=lambda r: (-r["area_px"], -r["peak"]))
    return regions


def _edges(low: float, high: float, step: float, extent: int) -> tuple[int, int]:
    start, stop = low + 0.5 - step / 2, high + 0.5 + step / 2
    start = 0.0 if start < step / 2 else start
    stop = float(extent) if stop > extent - step / 2 else stop
    return int(np.clip(np.round(start), 0, extent)), int(np.clip(np.round(stop), 0, extent))

