"""CLIP-Adapter (Gao et al., IJCV 2023, arXiv 2110.04544): a residual bottleneck MLP on the image feature.

    A(f) = ReLU(W2 ReLU(W1 f)),  W1: D -> D/4, W2: D/4 -> D (no biases, as in the official code)
    f' = ratio * A(f) + (1 - ratio) * f                 # residual ratio 0.2 (the paper's choice for generic data)
    logits = s * norm(f') W_text                        # s = the backbone's logit scale

Trained with cross-entropy; we use AdamW (lr 1e-3, weight decay 1e-2, cosine, 200 epochs, batch 32) on the cached
features instead of the paper's SGD on augmented images, see docs/methods/clip-adapter.md. An image given as several
unit vectors (BLIP-2's query embeddings, ``[N, V * D]``) has each adapted by the same MLP and is compared with the
text by its best-matching vector per class (:func:`fewvision.heads.zeroshot.class_similarity`, BLIP-2's own rule).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import ClassifierHead
from .support import Support
from .textual import minibatches, seeded_generator, single_thread, zeroshot_classifier
from .zeroshot import class_similarity, unit_vectors


class ClipAdapterHead(ClassifierHead):
    method = "clip-adapter"
    needs_text = True

    def __init__(self, ratio: float = 0.2, reduction: int = 4, templates: Sequence[str] | None = None,
                 epochs: int = 200, lr: float = 1e-3, weight_decay: float = 1e-2, batch_size: int = 32, seed: int = 0):
        self.ratio = ratio
        self.reduction = reduction
        self.templates = templates
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.seed = seed

    def fit(self, support: Support) -> "ClipAdapterHead":
        self.text_weights_, self.logit_scale_ = zeroshot_classifier(support, self.templates)
        dim = self.text_weights_.shape[0]
        feats = unit_vectors(support.features.float(), dim)
        hidden = max(1, dim // int(self.reduction))
        torch.manual_seed(int(self.seed))
        down = torch.nn.Linear(dim, hidden, bias=False)
        up = torch.nn.Linear(hidden, dim, bias=False)
        params = [down.weight, up.weight]
        generator = seeded_generator(self.seed)
        batches_per_epoch = -(-len(feats) // int(self.batch_size))
        opt = torch.optim.AdamW(params, lr=float(self.lr), weight_decay=float(self.weight_decay))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, int(self.epochs) * batches_per_epoch))
        with single_thread():
            for _ in range(int(self.epochs)):
                for idx in minibatches(len(feats), int(self.batch_size), generator):
                    logits = self._logits(feats[idx], down.weight, up.weight)
                    loss = torch.nn.functional.cross_entropy(logits, support.labels[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    schedule.step()
        self.down_ = down.weight.detach().clone()
        self.up_ = up.weight.detach().clone()
        self.class_names_ = list(support.class_names)
        return self

    def _logits(self, feats: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        vectors = feats.unflatten(-1, (-1, down.shape[1]))  # [N, V, D]
        adapted = torch.relu(torch.relu(vectors @ down.T) @ up.T)
        mixed = float(self.ratio) * adapted + (1 - float(self.ratio)) * vectors
        mixed = torch.nn.functional.normalize(mixed, dim=-1).flatten(-2)
        return class_similarity(mixed, self.text_weights_, self.logit_scale_)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self._logits(unit_vectors(features.float(), self.down_.shape[1]), self.down_, self.up_)

    def n_trainable_parameters(self) -> int:
        return int(self.down_.numel() + self.up_.numel()) if hasattr(self, "down_") else 0
