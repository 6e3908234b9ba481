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
    for row in range(height):
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
    # the image pixels between neighbouring map pixels (constant under resize and crop)
    step_x = float(xs[:, -1].mean() - xs[:, 0].mean()) / max(cols - 1, 1) if cols > 1 else float(width)
    step_y = float(ys[-1, :].mean() - ys[0, :].mean()) / max(rows - 1, 1) if rows > 1 else float(height)
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)
    peaks = np.full(n + 1, -np.inf)
    np.maximum.at(peaks, flat, heat.ravel())
    lo_x, hi_x = np.full(n + 1, np.inf), np.full(n + 1, -np.inf)
    lo_y, hi_y = np.full(n + 1, np.inf), np.full(n + 1, -np.inf)
    np.minimum.at(lo_x, flat, xs.ravel())
    np.maximum.at(hi_x, flat, xs.ravel())
    np.minimum.at(lo_y, flat, ys.ravel())
    np.maximum.at(hi_y, flat, ys.ravel())
    regions = []
    for label in range(1, n + 1):
        area = float(counts[label]) * step_x * step_y
        if area < min_area:
            continue
        x0 = int(np.clip(np.floor(lo_x[label] - step_x / 2), 0, width))
        y0 = int(np.clip(np.floor(lo_y[label] - step_y / 2), 0, height))
        x1 = int(np.clip(np.ceil(hi_x[label] + step_x / 2), 0, width))
        y1 = int(np.clip(np.ceil(hi_y[label] + step_y / 2), 0, height))
        regions.append({"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0, "area_px": int(round(area)),
                        "area_pct": round(100.0 * area / max(width * height, 1), 4), "peak": float(peaks[label])})
    regions.sort(key=lambda r: (-r["area_px"], -r["peak"]))
    return regions
