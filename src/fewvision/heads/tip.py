"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022, arXiv 2111.03930).

A key-value cache built from the support set: keys F [NK, D] are the L2-normalised support features, values L
[NK, C] their one-hot labels. For a normalised test feature f (eq. 4-6 of the paper)::

    A = exp(-beta * (1 - f F^T))                       # affinities, [N, NK]
    logits = s * f W_text + alpha * A L                # s = the backbone's logit scale (100 in CLIP)

``tip`` is training-free. ``tip-f`` makes the keys trainable (initialised from F) and trains them with
cross-entropy, AdamW (lr 1e-3, eps 1e-4), cosine schedule, 20 epochs, batch 256, as in the paper's code.
See docs/methods/tip-adapter.md.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import ClassifierHead
from .support import Support
from .textual import minibatches, one_hot, seeded_generator, single_thread, zeroshot_classifier


class TipAdapterHead(ClassifierHead):
    method = "tip"
    needs_text = True

    def __init__(self, alpha: float = 1.0, beta: float = 5.5, templates: Sequence[str] | None = None, seed: int = 0):
        self.alpha = alpha
        self.beta = beta
        self.templates = templates
        self.seed = seed

    def fit(self, support: Support) -> "TipAdapterHead":
        self.text_weights_, self.logit_scale_ = zeroshot_classifier(support, self.templates)
        self.keys_ = torch.nn.functional.normalize(support.features.float(), dim=-1).clone()
        self.values_ = one_hot(support.labels, support.n_classes)
        self.class_names_ = list(support.class_names)
        return self

    def _logits(self, feats: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        clip_logits = self.logit_scale_ * feats @ self.text_weights_
        affinity = torch.exp(-float(self.beta) * (1 - feats @ keys.T))
        return clip_logits + float(self.alpha) * affinity @ self.values_

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        # Features arrive L2-normalised (the Backbone contract), exactly as the zero-shot head takes them.
        return self._logits(features.float(), self.keys_)


class TipAdapterFHead(TipAdapterHead):
    method = "tip-f"

    def __init__(self, alpha: float = 1.0, beta: float = 5.5, templates: Sequence[str] | None = None,
                 epochs: int = 20, lr: float = 1e-3, batch_size: int = 256, seed: int = 0):
        super().__init__(alpha, beta, templates, seed)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def fit(self, support: Support) -> "TipAdapterFHead":
        super().fit(support)
        feats = self.keys_.clone()
        keys = torch.nn.Parameter(self.keys_.clone())
        generator = seeded_generator(self.seed)
        batches_per_epoch = -(-len(feats) // int(self.batch_size))
        opt = torch.optim.AdamW([keys], lr=float(self.lr), eps=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, int(self.epochs) * batches_per_epoch))
        with single_thread():
            for _ in range(int(self.epochs)):
                for idx in minibatches(len(feats), int(self.batch_size), generator):
                    loss = torch.nn.functional.cross_entropy(self._logits(feats[idx], keys), support.labels[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    schedule.step()
        self.keys_ = keys.detach().clone()
        return self

    def n_trainable_parameters(self) -> int:
        return int(self.keys_.numel()) if hasattr(self, "keys_") else 0
