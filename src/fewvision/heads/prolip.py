"""ProLIP (Fahes et al. 2024, arXiv 2410.05270): few-shot CLIP by training only the last visual projection.

    min_W  CE(s * norm(f W + b) T, y) + lambda * ||W - W0||_F^2

``f`` are image features before the projection (cached, one augmented view of every support image per step),
``W0``/``b`` the pretrained projection (the bias stays frozen), ``T`` the fixed zero-shot text classifier, ``s`` the
fixed logit scale, ``lambda = 1/N`` for N shots (the paper's validation-free rule). Adam (eps 1e-4), cosine schedule,
full-batch steps. The test-time variant (TPT recipe on W) is :meth:`ProLIPHead.predict_proba_images` with
``test_time=True``. See docs/methods/prolip.md.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..features.cache import open_cache
from .base import ClassifierHead
from ..prompts import ClassSpec, resolve_templates
from .support import Support
from .textual import single_thread
from .zeroshot import text_classifier

PRE_PROJECTION = "preproj"


def projection_logits(features, weight, bias, text_weights, scale: float) -> torch.Tensor:
    """scale * norm(features @ W + b) @ T for pre-projection features [N, width]."""
    return scale * F.normalize(features @ weight + bias, dim=-1) @ text_weights


def fit_projection(views: torch.Tensor, labels: torch.Tensor, weight0: torch.Tensor, bias: torch.Tensor,
                   text_weights: torch.Tensor, scale: float, regularization: float, steps: int = 300,
                   lr: float = 1e-5) -> tuple[torch.Tensor, list[float]]:
    """ProLIP's training loop on cached views [V, N, width]; step t uses view t mod V. Returns (W, losses)."""
    weight = torch.nn.Parameter(weight0.clone())
    if steps <= 0:
        return weight.detach(), []
    optimizer = torch.optim.Adam([weight], lr=lr, eps=1e-4, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    for step in range(steps):
        logits = projection_logits(views[step % len(views)], weight, bias, text_weights, scale)
        cross_entropy = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        cross_entropy.backward()
        # The regulariser's gradient 2 lambda (W - W0), added directly: one pass instead of autograd's several.
        diff = weight.detach() - weight0
        weight.grad.add_(diff, alpha=2 * regularization)
        losses.append(cross_entropy.item() + regularization * float(diff.reshape(-1).dot(diff.reshape(-1))))
        optimizer.step()
        schedule.step()
    return weight.detach(), losses


def average_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean softmax of several views (TPT's ``avg_entropy``), computed in log space."""
    logp = logits.log_softmax(dim=-1)
    mean_logp = (logp.logsumexp(dim=0) - np.log(len(logits))).clamp(min=torch.finfo(logp.dtype).min)
    return -(mean_logp.exp() * mean_logp).sum()


class ProLIPHead(ClassifierHead):
    """Fits W on pre-projection features; ``logits`` takes pre-projection features (see ``feature_kind``)."""

    method = "prolip"
    needs_text = True

    def __init__(self, classes: Sequence[ClassSpec | str] | None = None, templates: Sequence[str] | None = None,
                 regularization: float | None = None, lr: float = 1e-5, steps: int = 300,
                 n_views: int | None = None, logit_scale: float | None = None, test_time: bool = False,
                 tta_views: int = 64, tta_keep: float = 0.1, tta_lr: float = 1e-4, seed: int = 0):
        self.classes = classes
        self.templates = templates
        self.regularization = regularization
        self.lr = lr
        self.steps = steps
        self.n_views = n_views
        self.logit_scale = logit_scale
        self.test_time = test_time
        self.tta_views = tta_views
        self.tta_keep = tta_keep
        self.tta_lr = tta_lr
        self.seed = seed

    @property
    def feature_kind(self) -> str:
        """What prediction takes: cached pre-projection features ('preproj', see ``fewvision.features.encode.ENCODERS``),
        or PIL images through ``predict_proba_images`` ('images') for test-time ProLIP, which augments them."""
        return "images" if self.test_time else PRE_PROJECTION

    def fit(self, support: Support) -> "ProLIPHead":
        from ..features.encode import AugmentedView

        backbone = support.backbone
        if backbone is None or not hasattr(backbone, "visual_projection"):
            raise ValueError("ProLIP needs an open_clip backbone (its last visual projection is what it trains)")
        classes = self.classes if self.classes is not None else list(support.class_names)
        self.classes_ = [c if isinstance(c, ClassSpec) else ClassSpec(str(c)) for c in classes]
        self.templates_ = resolve_templates(self.templates)
        cache = open_cache(backbone.id, support.cache_dir, enabled=support.use_cache)  # prompt embeddings
        self.text_weights_ = text_classifier(backbone, self.classes_, self.templates_, cache).float()
        self.logit_scale_ = float(self.logit_scale if self.logit_scale is not None else backbone.logit_scale)
        weight0, self.bias_ = backbone.visual_projection()
        shots = support.shots
        if self.regularization is not None:
            self.regularization_ = float(self.regularization)
        else:
            self.regularization_ = 1.0 / shots if shots else 0.0
        steps = int(self.steps) if support.features is not None else 0
        n_views = min(int(self.n_views if self.n_views is not None else steps), steps)
        if steps > 0 and n_views > 0:
            views = torch.stack([support.view_features(PRE_PROJECTION, AugmentedView(i, self.seed))
                                 for i in range(n_views)])
        elif steps > 0:  # no augmentation asked for: every step sees the un-augmented images
            views = support.view_features(PRE_PROJECTION)[None]
        else:
            views = None
        torch.manual_seed(self.seed)
        with single_thread():  # small full-batch matrices: a second thread costs more than it computes
            self.projection_, self.losses_ = fit_projection(
                views, support.labels, weight0, self.bias_, self.text_weights_, self.logit_scale_,
                self.regularization_, steps, self.lr)
        self.class_names_ = [c.name for c in self.classes_]
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        if features.ndim != 2 or features.shape[1] != self.projection_.shape[0]:
            raise ValueError(
                f"ProLIP takes features before the last projection ([N, {self.projection_.shape[0]}], feature kind "
                f"'{PRE_PROJECTION}'), got shape {list(features.shape)}")
        return projection_logits(features, self.projection_, self.bias_, self.text_weights_, self.logit_scale_)

    def n_trainable_parameters(self) -> int:
        return int(self.projection_.numel()) if hasattr(self, "projection_") else 0

    # --- prediction from images (plain, or test-time ProLIP) ------------------------------------------------
    def predict_proba_images(self, backbone, images) -> np.ndarray:
        """Class probabilities for PIL images; with ``test_time=True`` W is tuned on each image, then reset."""
        self._check_fitted()
        images = [im.convert("RGB") for im in images]
        if not self.test_time:
            pixels = torch.stack([backbone.preprocess(im) for im in images]) if images else None
            feats = backbone.encode_pre_projection(pixels) if images else torch.zeros(0, self.projection_.shape[0])
            return self.predict_proba(feats)
        weight0, _ = backbone.visual_projection()
        return np.stack([self._test_time_proba(backbone, im, weight0) for im in images]) if images else \
            np.zeros((0, len(self.class_names_)), dtype=np.float32)

    def _test_time_proba(self, backbone, image, weight0: torch.Tensor) -> np.ndarray:
        """TPT on W (Shu et al. 2022; ProLIP sec. 4.6): the image plus ``tta_views - 1`` random crops, keep the
        ``tta_keep`` fraction with the lowest entropy, one AdamW step on the entropy of their mean prediction
        (+ lambda ||W - W0||^2), then classify the original image with the tuned W."""
        from ..features.encode import AugmentedView

        key = hashlib.sha256(image.tobytes()).hexdigest()
        views = [image] + [AugmentedView(i, self.seed, scale=(0.08, 1.0))(image, key)
                           for i in range(self.tta_views - 1)]
        feats = backbone.encode_pre_projection(torch.stack([backbone.preprocess(v) for v in views])).clone()
        weight = torch.nn.Parameter(self.projection_.clone())
        optimizer = torch.optim.AdamW([weight], lr=self.tta_lr)
        logits = projection_logits(feats, weight, self.bias_, self.text_weights_, self.logit_scale_)
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        keep = entropy.argsort()[: max(1, int(len(views) * self.tta_keep))]
        loss = average_entropy(logits[keep]) + self.regularization_ * (weight - weight0).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            out = projection_logits(feats[:1], weight, self.bias_, self.text_weights_, self.logit_scale_)
        return torch.softmax(out.double(), dim=-1)[0].float().numpy()
