"""The protocol every classification head follows (scikit-learn style).

Parameters go in ``__init__`` and nothing is computed there. ``fit(support)`` learns from a
:class:`fewvision.heads.support.Support` (L2-normalised cached image features, labels, class names, and the backbone for
heads that need its towers); fitted attributes end in ``_``. ``predict_proba`` returns
an ``[N, C]`` array of class probabilities in the order of ``class_names_``.

Saving is generic: ``state()`` returns the fitted tensors (every ``*_`` attribute that is a tensor) and a JSON
config (the ``__init__`` parameters and every other ``*_`` attribute); ``from_state`` rebuilds the head. A head with
state that is neither (a sub-module, say) overrides both.
"""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..prompts import ClassSpec

if TYPE_CHECKING:
    from .support import Support


class NotFitted(RuntimeError):
    pass


def _to_json(value: Any) -> Any:
    if isinstance(value, ClassSpec):
        return {"__classspec__": value.to_dict()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if dataclasses.is_dataclass(value) or torch.is_tensor(value) or isinstance(value, np.ndarray):
        raise TypeError(f"cannot store {type(value).__name__} in a model file's JSON")
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__classspec__"}:
            return ClassSpec(**value["__classspec__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


class ClassifierHead(ABC):
    #: True when fit() needs the backbone's text tower.
    needs_text: bool = False
    #: The method name in the registry and in saved files.
    method: str = ""

    class_names_: list[str]

    @abstractmethod
    def fit(self, support: "Support") -> "ClassifierHead":
        """Learn from the support set (features [N, D], labels, class names, backbone)."""

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

    # --- persistence ---------------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self._check_fitted()
        tensors, fitted = {}, {}
        for key, value in vars(self).items():
            if not key.endswith("_") or key.startswith("_"):
                continue
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                fitted[key] = _to_json(value)
        return tensors, {"method": self.method, "params": _to_json(self.get_params()), "fitted": fitted}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "ClassifierHead":
        missing = [n for n in getattr(cls, "NETWORK", ()) if n not in tensors]
        if missing:  # e.g. a file from before a network gained a layer
            raise ValueError(f"the file lacks the trained tensor(s) {', '.join(missing)}: fit (or meta-train) the "
                             "model again with this version")
        head = cls(**_from_json(config["params"]))
        for key, value in _from_json(config["fitted"]).items():
            setattr(head, key, value)
        for key, value in tensors.items():
            setattr(head, key, value)
        return head

    def n_trainable_parameters(self) -> int:
        """Parameters learned by fit (for the method comparison tables)."""
        return 0

    #: Fitted tensors and their dimensions as symbols (e.g. ``{"weight_": ("C", "D")}``): a loaded model whose
    #: tensors disagree is refused (``modelfile.state_shape_problem``).
    STATE_SHAPES: dict[str, tuple[str, ...]] = {}

    def state_symbols(self) -> dict[str, int]:
        """Dimensions known before looking at the tensors: C, the number of classes."""
        return {"C": len(getattr(self, "class_names_", []))}
