"""Shared pieces of the heads that combine cached image features with the zero-shot text classifier."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from .support import Support


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




@contextmanager
def single_thread():
    """Run a head's training loop on one intra-op thread, restoring the setting after.

    The matrices are tiny (hundreds of support features), so thread synchronisation costs more than the arithmetic:
    on a busy 2-core machine a CLIP-Adapter step took 116 ms with 2 threads and 6 ms with 1.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
