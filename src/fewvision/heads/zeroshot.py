"""CLIP zero-shot classification (Radford et al. 2021, section 3.1.4).

Each class's weight vector is the L2-normalised mean of its L2-normalised prompt embeddings (the prompt ensemble
of open_clip's ``build_zero_shot_classifier``); logits are ``logit_scale * <normalised image feature, weight>``
(for an image given as several vectors, BLIP-2's, the largest over them).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from ..backbones.base import BackboneError
from ..features.cache import open_cache
from .base import ClassifierHead
from ..prompts import ClassSpec, resolve_templates
from .support import Support


def encode_prompts(backbone, prompts: Sequence[str], cache=None) -> torch.Tensor:
    """Normalised text embeddings [T, D], read from and written to the feature cache when one is given."""
    if cache is None:
        return backbone.encode_text(prompts)
    keys = [(hashlib.sha256(p.encode()).hexdigest(), TEXT_VIEW) for p in prompts]
    found = cache.get_many(keys)
    todo = [i for i, k in enumerate(keys) if k not in found]
    if todo:
        new = backbone.encode_text([prompts[i] for i in todo]).numpy()
        cache.put_many({keys[i]: vec for i, vec in zip(todo, new)})
        found.update({keys[i]: vec for i, vec in zip(todo, new)})
    return torch.from_numpy(np.stack([found[k] for k in keys]).astype(np.float32))


def text_classifier(backbone, classes: Sequence[ClassSpec], templates: Sequence[str], cache=None) -> torch.Tensor:
    """[D, C] matrix of class embeddings from a backbone's text tower."""
    if not backbone.has_text:
        raise BackboneError(
            f"backbone '{backbone.spec}' has no text tower, so it cannot classify from class names; use a CLIP "
            "backbone (e.g. --backbone openclip:ViT-B-32/laion2b_s34b_b79k) or a few-shot method"
        )
    columns = []
    for spec in classes:
        prompts = spec.prompts(templates)
        emb = encode_prompts(backbone, prompts, cache)  # already L2-normalised per prompt
        columns.append(torch.nn.functional.normalize(emb.mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


TEXT_VIEW = "text"  # cache view of prompt embeddings, keyed by the prompt's sha256
LOGIT_SCALE_KEY = ("logit_scale", TEXT_VIEW)


def cached_logit_scale(backbone, cache) -> float:
    """The backbone's logit scale, kept in its feature cache with the prompt embeddings: with both cached, a
    zero-shot run never needs the model's weights."""
    found = cache.get_many([LOGIT_SCALE_KEY])
    if LOGIT_SCALE_KEY in found:
        return float(found[LOGIT_SCALE_KEY][0])
    scale = float(backbone.logit_scale)
    cache.put_many({LOGIT_SCALE_KEY: np.array([scale], dtype=np.float64)})
    return scale


class ZeroShotHead(ClassifierHead):
    STATE_SHAPES = {"weights_": ("D", "C")}
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
        cache = open_cache(backbone.id, support.cache_dir, enabled=support.use_cache)
        self.weights_ = text_classifier(backbone, self.classes_, self.templates_, cache)
        self.logit_scale_ = cached_logit_scale(backbone, cache)
        self.class_names_ = [c.name for c in self.classes_]
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return class_similarity(features, self.weights_, self.logit_scale_)


def class_similarity(features: torch.Tensor, weights: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """[N, C] ``scale`` x the cosines of normalised image features [N, D] and class embeddings [D, C]; an image given
    as several unit vectors ([N, V * D], BLIP-2's query embeddings) takes its best-matching vector per class, as
    BLIP-2's image-text contrastive similarity does."""
    features, dim = scale * features.float(), weights.shape[0]  # scaled first, as CLIP's logits (and tip's)
    if features.shape[-1] != dim and features.shape[-1] % dim == 0:
        return (features.view(len(features), -1, dim) @ weights.float()).amax(dim=1)
    return features @ weights.float()


def unit_vectors(features: torch.Tensor, dim: int) -> torch.Tensor:
    """``features`` [..., V * dim] with each of its V vectors normalised (V = 1: the usual L2 normalisation)."""
    return torch.nn.functional.normalize(features.unflatten(-1, (-1, dim)), dim=-1).flatten(-2)


def n_vectors(features: torch.Tensor, dim: int) -> int:
    """How many ``dim``-vectors an image's features hold (BLIP-2: its queries; CLIP: 1)."""
    return features.shape[-1] // dim
