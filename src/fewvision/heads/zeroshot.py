"""CLIP zero-shot classification (Radford et al. 2021, section 3.1.4).

Each class's weight vector is the L2-normalised mean of its L2-normalised prompt embeddings (the prompt ensemble
of open_clip's ``build_zero_shot_classifier``); logits are ``logit_scale * <normalised image feature, weight>``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..backbones.base import BackboneError
from ..prompts import ClassSpec, resolve_templates
from ..support import Support
from .base import ClassifierHead


def text_classifier(backbone, classes: Sequence[ClassSpec], templates: Sequence[str]) -> torch.Tensor:
    """[D, C] matrix of class embeddings from a backbone's text tower."""
    if not backbone.has_text:
        raise BackboneError(
            f"backbone '{backbone.spec}' has no text tower, so it cannot classify from class names; use a CLIP "
            "backbone (e.g. --backbone openclip:ViT-B-32/laion2b_s34b_b79k) or a few-shot method"
        )
    columns = []
    for spec in classes:
        prompts = spec.prompts(templates)
        emb = backbone.encode_text(prompts)  # already L2-normalised per prompt
        columns.append(torch.nn.functional.normalize(emb.mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


class ZeroShotHead(ClassifierHead):
    needs_text = True
    method = "zeroshot"

    def __init__(self, classes: Sequence[ClassSpec | str] | None = None, templates: Sequence[str] | None = None):
        self.classes = classes
        self.templates = templates

    def fit(self, support: Support) -> "ZeroShotHead":
        backbone = support.backbone
        if backbone is None:
            raise ValueError("ZeroShotHead.fit needs the backbone (its text tower builds the classifier)")
        classes = self.classes if self.classes is not None else list(support.class_names)
        self.classes_ = [c if isinstance(c, ClassSpec) else ClassSpec(str(c)) for c in classes]
        self.templates_ = resolve_templates(self.templates)
        self.weights_ = text_classifier(backbone, self.classes_, self.templates_)
        self.logit_scale_ = float(backbone.logit_scale)
        self.class_names_ = [c.name for c in self.classes_]
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale_ * features.float() @ self.weights_
