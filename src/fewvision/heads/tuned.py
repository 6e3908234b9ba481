"""Heads that tune small modules inside a private copy of an open_clip CLIP model (LoRA, bottleneck adapters): one
training loop, one way to store the tuned tensors and to rebuild the model from them.

A subclass builds the adapted model (``_adapted_model``: a deep copy of the backbone's model with its modules added
and only their parameters requiring grad) and may override how the tuned tensors are read and loaded (by default:
every parameter that requires grad, by name) and the learning-rate schedule (cosine by default). Training is CE on
seeded augmented views of the support images against the class prompts encoded by the adapted text tower, as
CLIP-LoRA does; prediction runs the adapted image tower (``feature_kind = "images"``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import BackboneError
from .base import ClassifierHead, _from_json, _to_json
from ..prompts import ClassSpec, resolve_templates
from .support import Support


class TunedClipHead(ClassifierHead):
    """The shared part of a head whose tuned modules live inside CLIP's towers. Subclasses set ``method``,
    ``title`` (for messages), ``tensor_prefix`` (the tuned tensors' key prefix in the model file) and the
    hyper-parameters the loop reads: ``classes``, ``templates``, ``steps``, ``batch_size``, ``lr``, ``weight_decay``,
    ``logit_scale``, ``seed`` (and ``iterations_per_shot`` unless ``_n_steps`` is overridden)."""

    needs_text = True
    feature_kind = "images"
    title = "this head"
    tensor_prefix = "tuned"

    # --- what a subclass provides -------------------------------------------------------------------------------
    @abstractmethod
    def _adapted_model(self, backbone) -> nn.Module:
        """A private copy of the backbone's model with freshly initialised tuned modules (eval mode; only their
        parameters require grad)."""

    def _tuned_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def _load_tuned(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        wrong = sorted(set(params) ^ set(tensors)) + [n for n, v in tensors.items()
                                                      if n in params and params[n].shape != v.shape]
        if wrong:
            raise ValueError(f"the stored {self.title} tensors do not fit this model: {', '.join(wrong[:3])}")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

    def _schedule(self, optimizer: torch.optim.Optimizer, steps: int):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=(0.9, 0.999))

    def _n_steps(self, support: Support) -> int:
        return int(self.steps) if self.steps is not None else self.iterations_per_shot * support.shots

    def _train_mode(self, model: nn.Module) -> None:
        """Put the modules that behave differently in training (e.g. LoRA's dropout) in train mode; frozen layers
        stay in eval mode."""

    # --- the adapted model --------------------------------------------------------------------------------------
    def bind(self, backbone) -> "TunedClipHead":
        """Rebuild the adapted model from the stored tensors on a fresh copy of ``backbone``'s model."""
        self._check_fitted()
        if backbone.id != self.backbone_id_:
            raise BackboneError(f"this {self.title} head was fitted on backbone id {self.backbone_id_}, not "
                                f"{backbone.id}")
        model = self._adapted_model(backbone)
        self._load_tuned(model, self.tuned_)
        self._model = model.eval()
        return self

    def _text_features(self, model, tokens: torch.Tensor, n_templates: int) -> torch.Tensor:
        """[C, D]: per class, the normalised mean of its normalised prompt embeddings."""
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
        return F.normalize(emb.view(-1, n_templates, emb.shape[-1]).mean(dim=1), dim=-1)

    # --- training -----------------------------------------------------------------------------------------------
    def fit(self, support: Support) -> "TunedClipHead":
        from ..features.encode import AugmentedView
        from ..io.images import load_image

        backbone = support.backbone
        if support.features is None or not support.paths:
            raise ValueError(f"{self.title} trains on the support images: the support set needs image paths")
        classes = self.classes if self.classes is not None else list(support.class_names)
        self.classes_ = [c if isinstance(c, ClassSpec) else ClassSpec(str(c)) for c in classes]
        self.templates_ = resolve_templates(self.templates if self.templates is not None else ["a photo of a {}."])
        self.logit_scale_ = float(self.logit_scale if self.logit_scale is not None else backbone.logit_scale)
        self.backbone_id_ = backbone.id
        prompts = [p for c in self.classes_ for p in c.prompts(self.templates_)]
        per_class = len(self.classes_[0].prompts(self.templates_))
        if any(len(c.prompts(self.templates_)) != per_class for c in self.classes_):
            raise ValueError(f"{self.title} needs the same number of prompts per class (synonyms/descriptions "
                             "differ)")
        tokens = backbone.tokenizer(prompts)
        model = self._adapted_model(backbone)
        steps = self._n_steps(support)
        images = [load_image(p) for p in support.paths]
        generator = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        optimizer = self._optimizer([p for p in model.parameters() if p.requires_grad])
        schedule = self._schedule(optimizer, steps)
        self._train_mode(model)
        self.losses_ = []
        for step in range(steps):
            while len(order) < min(self.batch_size, len(images)):
                order += torch.randperm(len(images), generator=generator).tolist()
            batch, order = order[: self.batch_size], order[self.batch_size:]
            view = AugmentedView(step, self.seed, scale=(0.08, 1.0))  # RandomResizedCrop + flip, seeded
            pixels = torch.stack([backbone.preprocess(view(images[i], support.paths[i])) for i in batch])
            image = F.normalize(model.encode_image(pixels).float(), dim=-1)
            text = self._text_features(model, tokens, per_class)
            loss = F.cross_entropy(self.logit_scale_ * image @ text.T, support.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            self.losses_.append(loss.item())
        model.eval()
        with torch.no_grad():
            self.text_weights_ = self._text_features(model, tokens, per_class).T.contiguous()
        self.tuned_ = self._tuned_tensors(model)
        self._model = model
        self.class_names_ = [c.name for c in self.classes_]
        return self

    # --- prediction ---------------------------------------------------------------------------------------------
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [N, 3, H, W] -> logits (needs ``bind(backbone)`` after loading)."""
        if getattr(self, "_model", None) is None:
            raise ValueError(f"{self.title} predicts from images with its adapted towers: call bind(backbone) "
                             "first, or use predict_proba_images(backbone, images)")
        if features.ndim != 4:
            raise ValueError(f"{self.title} takes preprocessed images [N, 3, H, W] (feature kind 'images'), "
                             f"got shape {list(features.shape)}")
        image = F.normalize(self._model.encode_image(features.float()).float(), dim=-1)
        return self.logit_scale_ * image @ self.text_weights_

    def predict_proba_images(self, backbone, images, batch_size: int = 32) -> np.ndarray:
        if getattr(self, "_model", None) is None:
            self.bind(backbone)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            out.append(self.predict_proba(torch.stack([backbone.preprocess(im.convert("RGB")) for im in chunk])))
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names_)), dtype=np.float32)

    def n_trainable_parameters(self) -> int:
        return sum(int(v.numel()) for v in getattr(self, "tuned_", {}).values())

    # --- persistence: the tuned tensors and the text classifier, not the model ------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return tuned_state(self, self.tensor_prefix)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "TunedClipHead":
        return tuned_from_state(cls, tensors, config, cls.tensor_prefix)


def tuned_state(head: ClassifierHead, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A tuned head's file state: its ``tuned_`` tensors under ``prefix/``, its text classifier and the rest of its
    fitted attributes as JSON."""
    head._check_fitted()
    tensors = {f"{prefix}/{k}": v.contiguous() for k, v in head.tuned_.items()}
    tensors["text_weights_"] = head.text_weights_.contiguous()
    fitted = {k: _to_json(v) for k, v in vars(head).items()
              if k.endswith("_") and not k.startswith("_") and k not in ("tuned_", "text_weights_")}
    return tensors, {"method": head.method, "params": _to_json(head.get_params()), "fitted": fitted}


def tuned_from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], prefix: str):
    head = cls(**_from_json(config["params"]))
    for key, value in _from_json(config["fitted"]).items():
        setattr(head, key, value)
    head.text_weights_ = tensors["text_weights_"]
    head.tuned_ = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}/")}
    return head


def open_clip_blocks(model: nn.Module, tower: str) -> Sequence[nn.Module] | None:
    """The transformer blocks of an open_clip CLIP tower (``vision`` or ``text``), or None when that tower is not
    an open_clip transformer (e.g. a ModifiedResNet image tower)."""
    owner = getattr(model.visual, "transformer", None) if tower == "vision" else getattr(model, "transformer", None)
    return getattr(owner, "resblocks", None)
