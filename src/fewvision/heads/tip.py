"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022, arXiv 2111.03930).

A key-value cache built from the support set: keys F [NK, D] are the support images' features, values L [NK, C]
their one-hot labels. For a normalised test feature f (eq. 4-6 of the paper)::

    A = exp(-beta * (1 - f F^T))                       # affinities, [N, NK]
    logits = s * f W_text + alpha * A L                # s = the backbone's logit scale (100 in CLIP)

As in the official code, each key is the L2-normalised mean of ``n_views`` augmented views of its image (random
resized crop, scale 0.5-1, and horizontal flip; 10 views), cached like every other feature. ``tip`` is
training-free. ``tip-f`` makes the keys trainable (initialised from F) and trains them with cross-entropy on a
different augmented view of every support image each epoch - never on the keys' own features, each of which would
match its key with affinity 1 - with AdamW (lr 1e-3, eps 1e-4), cosine schedule, 20 epochs, batch 256.

``alpha`` and ``beta`` left at None are chosen as the paper chooses them, by a grid search (beta in [0.1, 7] in 200
steps, alpha in [0.1, 3] in 20, the official ImageNet grid) - here on the support set itself, by stratified
cross-validation: each fold's images are classified by a cache (trained, for ``tip-f``) built from the other folds,
and the grid point with the most correct answers over all folds wins (ties: the lower cross-entropy). With one
image in some class there is nothing to cross-validate and the paper's ImageNet values (1, 5.5) are kept.
An image given as several unit vectors (BLIP-2's query embeddings, ``[N, V * D]``) is compared with the text by
its best-matching vector per class (:func:`fewvision.heads.zeroshot.class_similarity`, BLIP-2's own rule) and with
the cache by the mean of its vectors' cosines with the key's (``f F^T / V``; keys normalised vector by vector), so
``1 - f F^T / V`` stays a distance in [0, 2] as in eq. 4. See docs/methods/tip-adapter.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import ClassifierHead
from .support import Support
from .textual import minibatches, one_hot, seeded_generator, single_thread, zeroshot_classifier
from .zeroshot import class_similarity, n_vectors, unit_vectors

DEFAULT_ALPHA, DEFAULT_BETA = 1.0, 5.5  # the paper's ImageNet values
BETA_GRID = 0.1 + (7.0 - 0.1) * np.arange(200) / 200
ALPHA_GRID = 0.1 + (3.0 - 0.1) * np.arange(20) / 20
MAX_FOLDS = 5


def support_views(support: Support, n_views: int, seed: int, dim: int) -> torch.Tensor:
    """[n_views, N, V * D] normalised features of ``n_views`` seeded augmented views of each support image (the
    cached base features when ``n_views`` is 0)."""
    from ..features.encode import GLOBAL, AugmentedView

    if n_views <= 0:
        return unit_vectors(support.features.float(), dim)[None]
    return torch.stack([support.view_features(GLOBAL, AugmentedView(i, seed)) for i in range(n_views)]).float()


def mean_keys(views: torch.Tensor, dim: int) -> torch.Tensor:
    return unit_vectors(views.mean(0), dim).contiguous()


def cache_affinity(feats: torch.Tensor, keys: torch.Tensor, beta: float, dim: int) -> torch.Tensor:
    """Eq. 4's ``exp(-beta (1 - f F^T))``, ``f F^T`` the mean cosine of an image's vectors with the key's."""
    return torch.exp(-float(beta) * (1 - feats @ keys.T / n_vectors(feats, dim)))


class TipAdapterHead(ClassifierHead):
    STATE_SHAPES = {"text_weights_": ("D", "C"), "keys_": ("K", "D"), "values_": ("K", "C")}
    method = "tip"
    needs_text = True

    def __init__(self, alpha: float | None = None, beta: float | None = None, n_views: int = 10,
                 templates: Sequence[str] | None = None, seed: int = 0):
        self.alpha = alpha
        self.beta = beta
        self.n_views = n_views
        self.templates = templates
        self.seed = seed

    def fit(self, support: Support) -> "TipAdapterHead":
        self.text_weights_, self.logit_scale_ = zeroshot_classifier(support, self.templates)
        dim = self.text_weights_.shape[0]
        views = support_views(support, int(self.n_views), int(self.seed), dim)
        labels = support.labels
        self.values_ = one_hot(labels, support.n_classes)
        self.class_names_ = list(support.class_names)
        self.alpha_, self.beta_, self.search_ = self._choose_alpha_beta(support, views)
        self.keys_ = self._train_keys(mean_keys(views, dim), views, labels, self.values_)
        return self

    def _train_keys(self, keys: torch.Tensor, views: torch.Tensor, labels: torch.Tensor,
                    values: torch.Tensor) -> torch.Tensor:
        """The cache keys Tip-Adapter uses: as built (training-free)."""
        return keys

    # --- the alpha / beta search ---------------------------------------------------------------------------
    def _choose_alpha_beta(self, support: Support, views: torch.Tensor) -> tuple[float, float, str]:
        from sklearn.model_selection import StratifiedKFold

        if self.alpha is not None and self.beta is not None:
            return float(self.alpha), float(self.beta), "given"
        labels = support.labels.numpy()
        n_folds = min(MAX_FOLDS, int(np.bincount(labels, minlength=support.n_classes).min()))
        if n_folds < 2:
            alpha = DEFAULT_ALPHA if self.alpha is None else float(self.alpha)
            beta = DEFAULT_BETA if self.beta is None else float(self.beta)
            return alpha, beta, "paper defaults: one support image in some class leaves nothing to cross-validate"
        alphas = ALPHA_GRID if self.alpha is None else np.array([float(self.alpha)])
        betas = BETA_GRID if self.beta is None else np.array([float(self.beta)])
        dim = self.text_weights_.shape[0]
        base = unit_vectors(support.features.float(), dim)  # test images are not augmented
        correct = np.zeros((len(alphas), len(betas)))
        loss = np.zeros((len(alphas), len(betas)))
        folds = StratifiedKFold(n_folds, shuffle=True, random_state=int(self.seed)).split(labels, labels)
        for train, held in folds:
            train_t = torch.as_tensor(train)
            values = one_hot(support.labels[train_t], support.n_classes)
            keys = self._train_keys(mean_keys(views[:, train_t], dim), views[:, train_t], support.labels[train_t],
                                    values)
            c, nll = _grid_scores(base[held], support.labels[held], keys, values, self.text_weights_,
                                  self.logit_scale_, alphas, betas)
            correct += c
            loss += nll
        best = np.flatnonzero(correct == correct.max())
        pick = best[np.argmin(loss.reshape(-1)[best])]
        a, b = np.unravel_index(pick, correct.shape)
        return (float(alphas[a]), float(betas[b]),
                f"{n_folds}-fold cross-validation on the support: {int(correct.max())}/{len(labels)} right")

    def partial_fit(self, support: Support) -> "TipAdapterHead":
        """Add labelled images to the cache without refitting: a key each, built from its augmented views as in
        :meth:`fit`, and its one-hot value; alpha and beta (searched on the first images) are kept."""
        self._check_fitted()
        dim = self.text_weights_.shape[0]
        keys = mean_keys(support_views(support, int(self.n_views), int(self.seed), dim), dim)
        self.keys_ = torch.cat([self.keys_, keys]).contiguous()
        self.values_ = torch.cat([self.values_, one_hot(support.labels, len(self.class_names_))])
        return self

    # --- prediction --------------------------------------------------------------------------------------------
    def _logits(self, feats: torch.Tensor, keys: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        clip_logits = class_similarity(feats, self.text_weights_, self.logit_scale_)
        affinity = cache_affinity(feats, keys, beta, self.text_weights_.shape[0])
        return clip_logits + float(alpha) * affinity @ self.values_

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        # Features arrive L2-normalised (the Backbone contract), exactly as the zero-shot head takes them.
        return self._logits(features.float(), self.keys_, self.alpha_, self.beta_)


def _grid_scores(feats: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 text_weights: torch.Tensor, scale: float, alphas: np.ndarray,
                 betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(number right, summed cross-entropy) of ``feats`` for every (alpha, beta) of the grid: [A, B] each."""
    with torch.no_grad():
        clip_logits = class_similarity(feats, text_weights, scale).double()  # [n, C]
        similarity = (feats @ keys.T / n_vectors(feats, text_weights.shape[0])).double()  # [n, K]
        b = torch.as_tensor(betas, dtype=torch.float64)[:, None, None]
        cache = torch.exp(-b * (1 - similarity)[None]) @ values.double()  # [B, n, C]
        a = torch.as_tensor(alphas, dtype=torch.float64)[:, None, None, None]
        logits = clip_logits[None, None] + a * cache[None]  # [A, B, n, C]
        right = (logits.argmax(-1) == labels[None, None]).sum(-1)
        nll = -torch.log_softmax(logits, -1).gather(-1, labels.view(1, 1, -1, 1).expand(*logits.shape[:3], 1))
        return right.numpy().astype(float), nll.sum((-1, -2)).numpy()


class TipAdapterFHead(TipAdapterHead):
    method = "tip-f"
    partial_fit = None  # its keys are trained together: new images need a refit

    def __init__(self, alpha: float | None = None, beta: float | None = None, n_views: int = 10,
                 templates: Sequence[str] | None = None, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256,
                 seed: int = 0):
        super().__init__(alpha, beta, n_views, templates, seed)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def _train_keys(self, keys: torch.Tensor, views: torch.Tensor, labels: torch.Tensor,
                    values: torch.Tensor) -> torch.Tensor:
        """Keys trained as the official code trains them: at the initial alpha and beta (the given ones, else the
        paper's), each epoch on one augmented view of every image (view ``epoch mod n_views``)."""
        alpha = DEFAULT_ALPHA if self.alpha is None else float(self.alpha)
        beta = DEFAULT_BETA if self.beta is None else float(self.beta)
        trained = torch.nn.Parameter(keys.clone())
        generator = seeded_generator(self.seed)
        n = len(labels)
        batches_per_epoch = -(-n // int(self.batch_size))
        opt = torch.optim.AdamW([trained], lr=float(self.lr), eps=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, int(self.epochs) * batches_per_epoch))

        def logits(feats, k):
            clip_logits = class_similarity(feats, self.text_weights_, self.logit_scale_)
            return clip_logits + alpha * cache_affinity(feats, k, beta, self.text_weights_.shape[0]) @ values

        with single_thread():
            for epoch in range(int(self.epochs)):
                feats = views[epoch % len(views)]
                for idx in minibatches(n, int(self.batch_size), generator):
                    loss = torch.nn.functional.cross_entropy(logits(feats[idx], trained), labels[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    schedule.step()
        return trained.detach().clone()

    def n_trainable_parameters(self) -> int:
        return int(self.keys_.numel()) if hasattr(self, "keys_") else 0
