"""The protocol every classification head follows (scikit-learn style).

Parameters go in ``__init__`` and nothing is computed there. ``fit`` learns from L2-normalised image features
(and, for text-based heads, the backbone's text tower); fitted attributes end in ``_``. ``predict_proba`` returns
an ``[N, C]`` array of class probabilities in the order of ``class_names_``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch


class NotFitted(RuntimeError):
    pass


class ClassifierHead(ABC):
    #: True when fit() needs the backbone's text tower.
    needs_text: bool = False
    #: The method name in the registry and in saved files.
    method: str = ""

    class_names_: list[str]

    @abstractmethod
    def fit(self, features: torch.Tensor | None, labels: Sequence[int] | None, class_names: Sequence[str],
            backbone=None) -> "ClassifierHead":
        """Learn from support features [N, D] with integer labels; text heads may get features=None."""

    @abstractmethod
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Image features [N, D] -> class logits [N, C] (softmax gives predict_proba)."""

    def predict_proba(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        self._check_fitted()
        feats = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        with torch.inference_mode():
            return torch.softmax(self.logits(feats).double(), dim=-1).float().numpy()

    def predict(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.predict_proba(features).argmax(axis=1)

    def _check_fitted(self) -> None:
        if not hasattr(self, "class_names_"):
            raise NotFitted(f"{type(self).__name__} is not fitted yet: call fit() first")
