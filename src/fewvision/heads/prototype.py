"""Class prototypes: the mean of each class's L2-normalised support features (Snell et al. 2017, ProtoNet;
Wang et al. 2019, SimpleShot), predicting by cosine similarity to the re-normalised means.

The softmax temperature is fitted on the support set by leave-one-out negative log-likelihood, so probabilities
are not arbitrarily sharp or flat whatever the backbone's feature geometry.

With ``text_weight`` a > 0 the prototype logits are blended with the zero-shot text classifier of a CLIP backbone:
``logits = (1 - a) * proto_logits + a * zeroshot_logits`` (docs/methods/prototype.md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import ClassifierHead
from .support import Support

SCALE_GRID = np.geomspace(1.0, 1000.0, 61)


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    feats = torch.nn.functional.normalize(features.float(), dim=-1)
    means = torch.stack([feats[labels == c].mean(dim=0) for c in range(n_classes)])
    return means


def leave_one_out_scale(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """The cosine-logit scale minimising leave-one-out NLL on the support set (100 if that is undefined)."""
    feats = torch.nn.functional.normalize(features.float(), dim=-1)
    counts = torch.bincount(labels, minlength=n_classes).float()
    if counts.min() < 2:
        return 100.0
    sums = torch.zeros(n_classes, feats.shape[1]).index_add_(0, labels, feats)
    # Each sample's own class mean without itself; other classes keep their full mean.
    means = sums / counts[:, None]
    own = (sums[labels] - feats) / (counts[labels, None] - 1)
    protos = torch.nn.functional.normalize(means, dim=-1)
    sims = feats @ protos.T
    sims[torch.arange(len(labels)), labels] = (feats * torch.nn.functional.normalize(own, dim=-1)).sum(-1)
    # Every grid scale at once: [S, N, C] log-softmax, mean NLL per scale.
    scales = torch.as_tensor(SCALE_GRID, dtype=torch.float32)[:, None, None]
    logp = torch.log_softmax(scales * sims[None], dim=-1)
    nll = -logp[:, torch.arange(len(labels)), labels].mean(dim=1)
    return float(SCALE_GRID[int(torch.argmin(nll))])


class _NeedsTextWhenBlended:
    """``needs_text`` is False for the class (image-only by default) and True for an instance blending with text."""

    def __get__(self, head, owner=None) -> bool:
        return head is not None and float(head.text_weight) > 0


class PrototypeHead(ClassifierHead):
    STATE_SHAPES = {"prototypes_": ("C", "D"), "text_weights_": ("D", "C"), "class_sums_": ("C", "D"),
                    "class_counts_": ("C",)}
    method = "prototype"
    needs_text = _NeedsTextWhenBlended()

    def __init__(self, scale: float | None = None, text_weight: float = 0.0, templates: Sequence[str] | None = None,
                 seed: int = 0):
        self.scale = scale
        self.text_weight = text_weight
        self.templates = templates
        self.seed = seed  # prototypes are deterministic; kept so every head takes a seed

    def fit(self, support: Support) -> "PrototypeHead":
        from .textual import zeroshot_classifier

        if not 0.0 <= float(self.text_weight) <= 1.0:
            raise ValueError(f"text_weight must be in [0, 1], got {self.text_weight}")
        features, labels, class_names = support.features, support.labels, support.class_names
        n = len(class_names)
        feats = torch.nn.functional.normalize(features.float(), dim=-1)
        self.class_sums_ = torch.zeros(n, feats.shape[1]).index_add_(0, labels, feats)
        self.class_counts_ = torch.bincount(labels, minlength=n).float()
        self.prototypes_ = torch.nn.functional.normalize(class_means(features, labels, n), dim=-1)
        self.scale_ = float(self.scale) if self.scale is not None else leave_one_out_scale(features, labels, n)
        if self.needs_text:
            self.text_weights_, self.text_scale_ = zeroshot_classifier(support, self.templates)
        self.class_names_ = list(class_names)
        return self

    def partial_fit(self, support: Support) -> "PrototypeHead":
        """Add labelled images to the class means without refitting: the prototypes a fit on all the images would
        give (the softmax scale, chosen on the first images, is kept)."""
        self._check_fitted()
        feats = torch.nn.functional.normalize(support.features.float(), dim=-1)
        labels = support.labels
        self.class_sums_ = self.class_sums_.index_add(0, labels, feats)
        self.class_counts_ = self.class_counts_ + torch.bincount(labels, minlength=len(self.class_names_)).float()
        means = self.class_sums_ / self.class_counts_.clamp_min(1)[:, None]
        self.prototypes_ = torch.nn.functional.normalize(means, dim=-1).contiguous()
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        feats = torch.nn.functional.normalize(features.float(), dim=-1)
        proto = self.scale_ * feats @ self.prototypes_.T
        if not self.needs_text:
            return proto
        a = float(self.text_weight)
        return (1 - a) * proto + a * self.text_scale_ * feats @ self.text_weights_
