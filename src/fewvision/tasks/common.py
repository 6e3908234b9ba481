"""What the task modules share: result containers, backbone and feature helpers, classification metrics."""

from __future__ import annotations

import os
from typing import Sequence

from ..backbones import create_backbone
from ..backbones.base import Backbone
from ..features.cache import open_cache
from ..features.encode import GLOBAL, Features, encode_files
from ..heads import ClassifierHead
from .rows import Predictions, classification_rows


def as_backbone(backbone: str | Backbone, cache_dir: str | None = None, weights: str | None = None) -> Backbone:
    return backbone if isinstance(backbone, Backbone) else create_backbone(backbone, cache_dir=cache_dir, weights=weights)


def encode(backbone: Backbone, paths: Sequence[str | os.PathLike], kind: str = GLOBAL, *,
           cache_dir: str | None = None, use_cache: bool = True, progress: bool = False, batch_size: int = 32,
           workers: int | None = None, description: str = "encoding") -> Features:
    """Features of ``kind`` for image files, through the backbone's feature cache."""
    cache = open_cache(backbone.id, cache_dir, enabled=use_cache)
    return encode_files(backbone, paths, cache, kind=kind, batch_size=batch_size, workers=workers,
                        progress=progress, description=description)



def predictions_from(head: ClassifierHead, feats: Features, unknown_threshold: float | None = None) -> Predictions:
    names = list(head.class_names_)
    if len(feats.paths) == 0:
        return Predictions(names, [], feats.skipped, feats.encoded)
    rows = classification_rows(feats.paths, head.predict_proba(feats.tensor), names,
                               unknown_threshold=unknown_threshold)
    return Predictions(names, rows, feats.skipped, feats.encoded)
