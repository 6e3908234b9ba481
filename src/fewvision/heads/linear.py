"""Linear probe: multinomial logistic regression on the L2-normalised image features (Radford et al. 2021, sec. 3.2).

``init="random"`` (default) is scikit-learn's L-BFGS ``LogisticRegression`` with L2 penalty ``1/C``, exactly the
CLIP linear-probe protocol. ``init="zeroshot"`` (needs a CLIP backbone) starts the class weights at the zero-shot text
classifier and penalises moving away from it, as in CLAP's zero-shot-initialised linear probe (Silva-Rodriguez et al.
2024) and in the spirit of LP++ (Huang et al. 2024):
``min_V  CE(s * f V^T + b, y) + lambda * ||V - W_text||_F^2``, s = the backbone's logit scale, full-batch L-BFGS.
See docs/methods/linear.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import ClassifierHead
from .support import Support

INITS = ("random", "zeroshot")


class _NeedsTextForZeroshotInit:
    def __get__(self, head, owner=None) -> bool:
        return head is not None and head.init == "zeroshot"


class LinearHead(ClassifierHead):
    STATE_SHAPES = {"weight_": ("C", "D"), "bias_": ("C",)}
    method = "linear"
    needs_text = _NeedsTextForZeroshotInit()

    def __init__(self, C: float = 10.0, init: str = "random", text_reg: float | None = None,
                 templates: Sequence[str] | None = None, max_iter: int = 1000, seed: int = 0):
        self.C = C
        self.init = init
        self.text_reg = text_reg
        self.templates = templates
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, support: Support) -> "LinearHead":
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got '{self.init}'")
        feats = torch.nn.functional.normalize(support.features.float(), dim=-1)
        if self.init == "zeroshot":
            self._fit_from_text(support, feats)
        else:
            self._fit_sklearn(feats, support.labels, support.n_classes)
        self.class_names_ = list(support.class_names)
        return self

    def _fit_sklearn(self, feats: torch.Tensor, labels: torch.Tensor, n_classes: int) -> None:
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=float(self.C), max_iter=int(self.max_iter), random_state=int(self.seed))
        lr.fit(feats.numpy(), labels.numpy())
        coef, bias = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
        if n_classes == 2:  # scikit-learn keeps one binary row; [-z/2, z/2] has the same softmax as sigmoid(z)
            coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
        # scikit-learn's coef_ is column-major; a model file stores it row-major, and the matrix product takes
        # another BLAS path for each layout (results differ in the last bits on some CPUs). Row-major here too, so
        # a loaded model runs the same arithmetic as the fitted one.
        self.weight_ = torch.from_numpy(np.ascontiguousarray(coef))
        self.bias_ = torch.from_numpy(np.ascontiguousarray(bias))

    def _fit_from_text(self, support: Support, feats: torch.Tensor) -> None:
        from .textual import single_thread, zeroshot_classifier

        text, scale = zeroshot_classifier(support, self.templates)
        # ProLIP's validation-free rule lambda = 1/N (N shots per class) unless given.
        lam = float(self.text_reg) if self.text_reg is not None else 1.0 / max(support.shots, 1)
        torch.manual_seed(int(self.seed))
        anchor = text.T.contiguous()
        v = anchor.clone().requires_grad_(True)
        b = torch.zeros(anchor.shape[0], requires_grad=True)
        opt = torch.optim.LBFGS([v, b], lr=1.0, max_iter=int(self.max_iter), line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(scale * feats @ v.T + b, support.labels)
            loss = loss + lam * (v - anchor).pow(2).sum()
            loss.backward()
            return loss

        with single_thread():
            opt.step(closure)
        self.weight_ = (scale * v).detach().clone()
        self.bias_ = b.detach().clone()
        self.text_reg_ = lam

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        feats = torch.nn.functional.normalize(features.float(), dim=-1)
        return feats @ self.weight_.T + self.bias_

    def n_trainable_parameters(self) -> int:
        return int(self.weight_.numel() + self.bias_.numel()) if hasattr(self, "weight_") else 0
