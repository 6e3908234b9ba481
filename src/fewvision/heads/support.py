"""The labelled examples a head learns from.

``Support`` carries the L2-normalised image features of the readable support images (from the cache), their
labels and class names, and - for heads that need more than cached features - the backbone and the image paths,
with accessors for other cached views (augmented crops, pre-projection features).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..io.images import Skipped


@dataclass
class Support:
    features: torch.Tensor | None  # [N, D], L2-normalised; None for a text-only fit (zero-shot)
    labels: torch.Tensor | None  # [N] int64 indices into class_names
    class_names: list[str]
    backbone: object | None = None
    paths: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    use_cache: bool = True
    skipped: list[Skipped] = field(default_factory=list)
    additions: bool = False  # images added to a fitted head (partial_fit): not every class needs one
    captions: dict[str, str] = field(default_factory=dict)  # path -> the user's caption (contrastive fine-tuning)

    def __post_init__(self):
        if self.features is not None:
            self.features = torch.as_tensor(np.asarray(self.features), dtype=torch.float32)
            self.labels = torch.as_tensor(np.asarray(self.labels), dtype=torch.long)
            if len(self.features) != len(self.labels):
                raise ValueError(f"{len(self.features)} support features but {len(self.labels)} labels")
            missing = [c for i, c in enumerate(self.class_names) if not bool((self.labels == i).any())]
            if missing and not self.additions:
                raise ValueError(f"no support images for class(es): {', '.join(missing)}")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def shots(self) -> int:
        """Images per class (the smallest class), N in ProLIP's lambda = 1/N."""
        return int(torch.bincount(self.labels, minlength=self.n_classes).min()) if self.labels is not None else 0

    def view_features(self, kind: str = "global", view=None) -> torch.Tensor:
        """Features of the support images for another cached view or kind, in the order of ``paths``."""
        from ..features.cache import open_cache
        from ..features.encode import encode_files

        if self.backbone is None or not self.paths:
            raise ValueError("this support set has no backbone and image paths, so it has no other views")
        cache = open_cache(self.backbone.id, self.cache_dir, enabled=self.use_cache)
        feats = encode_files(self.backbone, self.paths, cache, kind=kind, view=view, progress=False)
        if feats.paths != self.paths:
            raise ValueError("a support image became unreadable between views")
        return feats.tensor

    @classmethod
    def from_files(cls, backbone, paths: Sequence[str | os.PathLike], labels: Sequence[int],
                   class_names: Sequence[str], *, cache_dir: str | None = None, use_cache: bool = True,
                   progress: bool = False, additions: bool = False,
                   captions: dict[str, str] | None = None) -> "Support":
        """Encode (through the cache) and drop unreadable files with their labels, recording the skips."""
        from ..features.cache import open_cache
        from ..features.encode import encode_files

        paths = [str(p) for p in paths]
        label_of = dict(zip(paths, labels))
        cache = open_cache(backbone.id, cache_dir, enabled=use_cache)
        feats = encode_files(backbone, paths, cache, progress=progress, description="support")
        return cls(feats.tensor, torch.tensor([int(label_of[p]) for p in feats.paths]), list(class_names), backbone,
                   feats.paths, cache_dir, use_cache, feats.skipped, additions,
                   {p: captions[p] for p in feats.paths if p in (captions or {})})

    @classmethod
    def text_only(cls, class_names: Sequence[str], backbone, cache_dir: str | None = None,
                  use_cache: bool = True) -> "Support":
        return cls(None, None, list(class_names), backbone, cache_dir=cache_dir, use_cache=use_cache)
