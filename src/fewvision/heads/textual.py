"""Shared pieces of the heads that combine cached image features with the zero-shot text classifier."""

from __future__ import annotations

from typing import Sequence

import torch

from ..support import Support


def zeroshot_classifier(support: Support, templates: Sequence[str] | None) -> tuple[torch.Tensor, float]:
    """([D, C] text classifier for the support's class names, the backbone's logit scale), via ZeroShotHead."""
    from .zeroshot import ZeroShotHead

    if support.backbone is None:
        raise ValueError("this method needs the backbone's text tower, but the support set carries no backbone")
    text_support = Support(None, None, list(support.class_names), support.backbone, cache_dir=support.cache_dir,
                           use_cache=support.use_cache)
    head = ZeroShotHead(templates=templates).fit(text_support)
    return head.weights_, head.logit_scale_


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), n_classes).float()


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def minibatches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches covering 0..n-1 once (one epoch)."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


