"""Zero-shot anomaly scores for a folder of images: no model file, no good images.

>>> from fewvision.tasks.zeroshot_anomaly import zero_shot_anomaly
>>> result = zero_shot_anomaly(["today/"], method="musc", backbone="texture")
>>> result.rows[0]["score"], result.rows[0]["rank"]

* ``musc`` scores the images against each other (:mod:`fewvision.anomaly.musc`): the batch is the reference, so a
  score means "unusual within this batch" and needs a batch that is mostly good, of at least a few images.
* ``winclip`` scores each image against the text prompts (:class:`fewvision.anomaly.winclip.WinClipHead` with no
  reference images).

There is no threshold - nothing says what a good image scores - so rows carry the score and its rank in the batch
(1 = most anomalous); ``fewvision anomaly fit`` makes a thresholded model once good images exist. Maps are finished
by :func:`fewvision.anomaly.postprocess.finish_maps`, the one post-processing path; features come through the
feature cache like every other command's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..anomaly.musc import MuSc
from ..anomaly.postprocess import DEFAULT_SIGMA, finish_maps
from ..io.geometry import peak_in_image
from ..backbones.base import Backbone, unpack_layers
from ..features.cache import open_cache
from ..features.encode import GLOBAL, encode_files, patch_kind
from ..io.images import Skipped, iter_image_files
from ..progress import expect
from .anomaly import BASELINE_SIZE, DEFAULT_CHUNK_IMAGES, _as_backbone, _patch_chunks, Recorder, _score_chunks

ZERO_SHOT_METHODS = ("musc", "winclip")
# MuSc's paper reads CLIP ViT-L-14-336 or DINOv2 tokens; the small DINOv2 keeps a CPU batch of a few hundred images
# in minutes. WinCLIP's is the paper's CLIP.
DEFAULT_ZERO_SHOT_BACKBONES = {"musc": "timm:vit_small_patch14_dinov2.lvd142m",
                               "winclip": "openclip:ViT-B-16-plus-240/laion400m_e31"}


@dataclass
class ZeroShotAnomaly:
    """One row per readable image (path, score, rank, x, y, time), the finished maps in the same order, the
    display settings for heat maps (``decision``) and the skipped files."""

    rows: list[dict]
    maps: np.ndarray | None
    decision: dict[str, Any]
    skipped: list[Skipped] = field(default_factory=list)


def _musc(scorer: MuSc, bb: Backbone, paths: Sequence[str], cache, rec: Recorder, batch_size: int,
          chunk_images: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    layers = scorer.feature_layers(bb)
    layout = bb.patch_layout(layers) if layers else None
    per_layer: list[list[torch.Tensor]] = []
    for _, packed in _patch_chunks(bb, paths, cache, chunk_images, batch_size, rec, False, patch_kind(layers)):
        maps = unpack_layers(packed.float(), layout) if layout else [packed.float()]
        per_layer = per_layer or [[] for _ in maps]
        for store, m in zip(per_layer, maps):
            store.append(m)
    used = list(rec.used)
    if len(used) < 2:
        raise ValueError(f"musc scores images against each other: it needs at least 2 readable images, got "
                         f"{len(used)}")
    image_features = None
    if len(scorer.k_list):
        feats = encode_files(bb, used, cache, kind=GLOBAL, batch_size=batch_size, workers=0, progress=False)
        if feats.paths != used:  # read once already; a file that changed in between must not shift the rows
            raise ValueError("images changed while they were being scored; run again")
        image_features = torch.from_numpy(np.asarray(feats.features, dtype=np.float32))
    raw, scores = scorer.score([torch.cat(store) for store in per_layer], image_features, bb)
    return used, raw, scores


def zero_shot_anomaly(
    inputs: Sequence[str | os.PathLike],
    method: str = "musc",
    backbone: str | Backbone | None = None,
    *,
    params: dict | None = None,
    keep_maps: bool = True,
    weights: str | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    batch_size: int = 16,
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
    sigma: float = DEFAULT_SIGMA,
) -> ZeroShotAnomaly:
    """Score image files and/or folders with no good images (see the module docstring); unreadable files are
    skipped with their reason."""
    if method not in ZERO_SHOT_METHODS:
        raise ValueError(f"unknown zero-shot anomaly method '{method}': expected {' or '.join(ZERO_SHOT_METHODS)}")
    paths = [str(p) for p in iter_image_files(inputs)]
    expect(len(paths))
    bb = _as_backbone(backbone or DEFAULT_ZERO_SHOT_BACKBONES[method], cache_dir, weights)
    cache = open_cache(bb.id, cache_dir, enabled=use_cache)
    size = tuple(int(v) for v in bb.input_size)
    rec = Recorder()
    if method == "musc":
        used, raw, scores = _musc(MuSc(**(params or {})), bb, paths, cache, rec, batch_size, chunk_images)
        maps = finish_maps(raw, size, sigma)
    else:
        from ..anomaly.winclip import WinClipHead

        head = WinClipHead(**{**(params or {}), "shots": 0}).fit(None, bb)
        parts = list(_score_chunks(head, bb, paths, cache, size=size, sigma=sigma, chunk_images=chunk_images,
                                   batch_size=batch_size, rec=rec, progress=False))
        used = [p for ok, _, _ in parts for p in ok]
        maps = torch.cat([m for _, m, _ in parts]) if parts else torch.zeros(0, *size)
        scores = torch.cat([s for _, _, s in parts]) if parts else torch.zeros(0)
    order = torch.argsort(scores, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for i, (p, v, peak) in enumerate(zip(used, scores.tolist(), maps.flatten(1).argmax(1).tolist())):
        x, y = peak_in_image(p, bb.preprocess, size, divmod(int(peak), size[1]))
        rows.append({"path": p, "score": float(v), "rank": int(rank[i]), "x": x, "y": y, "time": now})
    # Heat maps show each pixel's excess over the batch's median map (the batch is mostly good), coloured from no
    # excess to the largest excess in the batch.
    small = F.adaptive_avg_pool2d(maps[:, None], BASELINE_SIZE)[:, 0] if len(maps) else torch.zeros(1, *BASELINE_SIZE)
    baseline = small.median(dim=0).values
    hottest = float((small - baseline).amax()) if len(maps) else 1.0
    decision = {"threshold": None, "method": method, "sigma": float(sigma), "map_size": list(size),
                "heatmap_baseline": [[round(float(v), 6) for v in row] for row in baseline.tolist()],
                "heatmap_range": [0.0, max(hottest, 1e-12)], "heatmap_reference": "the batch"}
    return ZeroShotAnomaly(rows, maps.numpy().astype(np.float32) if keep_maps else None, decision, rec.skipped)


__all__ = ["zero_shot_anomaly", "ZeroShotAnomaly", "ZERO_SHOT_METHODS", "DEFAULT_ZERO_SHOT_BACKBONES"]
