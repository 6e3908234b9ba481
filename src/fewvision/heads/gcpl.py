"""GCPL and CoMPLe (arXiv 2409.01835) as heads: one class token per class learned through a Stable Diffusion
pipeline, and the adaptive diffusion classifier over them (see :mod:`fewvision.diffusion.gcpl` for the equations).

The heads run their own model - the pipeline named by ``pipeline`` (a hub id or a local folder) - and predict from
images (``feature_kind = "images"``); the model file holds the learned token embeddings [C, width] and the
settings, not the pipeline. Probabilities are the softmax of the classifier's logits (minus each class's summed
noise-prediction error), so temperature scaling and conformal sets apply as for every head.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import ClassifierHead
from .support import Support


def token_names(n: int) -> list[str]:
    return [f"<fv-class-{i}>" for i in range(n)]


class GCPLHead(ClassifierHead):
    method = "gcpl"
    needs_text = False
    feature_kind = "images"
    #: The head brings its own model: the backbone only reads the support images (``fit`` defaults it to texture).
    own_model = True
    STATE_SHAPES = {"token_embeddings_": ("C", "W")}

    def __init__(self, pipeline: str = "CompVis/stable-diffusion-v1-4", init_word: str = "object",
                 template: str = "a photo of a {}", steps: int | None = None, steps_per_class: int = 500,
                 batch_size: int = 4, lr: float = 2e-3, weight_decay: float = 1e-2, flip: float = 0.5,
                 contrastive_weight: float = 0.0, margin: float = 0.1, n_samples: Sequence[int] = (50, 500),
                 to_keep: Sequence[int] = (5, 1), seed: int = 0):
        self.pipeline = pipeline
        self.init_word = init_word
        self.template = template
        self.steps = steps
        self.steps_per_class = steps_per_class
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.flip = flip
        self.contrastive_weight = contrastive_weight
        self.margin = margin
        self.n_samples = n_samples
        self.to_keep = to_keep
        self.seed = seed

    def _pipe(self, cache_dir=None):
        from ..diffusion.pipeline import load_pipeline

        return load_pipeline(self.pipeline, cache_dir)

    def _tokens(self, pipe, initial: torch.Tensor):
        from ..diffusion.pipeline import ClassTokens

        return ClassTokens(pipe, token_names(len(initial)), initial.to(pipe.text_encoder.device))

    def fit(self, support: Support) -> "GCPLHead":
        from ..diffusion.gcpl import check_schedule, inference_passes, invert, support_latents, training_pixels
        from ..diffusion.pipeline import word_embedding
        from ..io.images import load_image

        try:  # settings that would only fail after thousands of UNet passes are refused first
            ok = self.template.count("{}") == 1 and self.template.format("x") != self.template
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"the template '{self.template}' needs exactly one {{}}, where the class token goes")
        check_schedule(self.n_samples, self.to_keep)
        if not 0.0 <= float(self.flip) <= 1.0:
            raise ValueError(f"flip is a probability (GCPL: 0.5; 0 for classes a mirror image changes), got "
                             f"{self.flip}")
        if self.contrastive_weight > 0 and len(support.class_names) < 2:
            raise ValueError("CoMPLe's contrastive term needs at least two classes")
        if not support.paths:
            raise ValueError(f"{self.method} learns from the support images: the support set needs image paths")
        pipe = self._pipe(support.cache_dir)
        names = list(support.class_names)
        start = word_embedding(pipe, self.init_word).expand(len(names), -1)
        tokens = self._tokens(pipe, start)
        data = support_latents(pipe, training_pixels(pipe, [load_image(p) for p in support.paths]), self.flip)
        steps = int(self.steps) if self.steps is not None else int(self.steps_per_class) * len(names)
        result = invert(pipe, tokens, data, support.labels, token_names(len(names)), self.template, steps=steps,
                        batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                        contrastive_weight=self.contrastive_weight, margin=self.margin, seed=self.seed)
        self.token_embeddings_ = result.embeddings.float().cpu().contiguous()
        self.losses_ = result.losses
        self.cost_ = {"training_unet_passes": result.unet_passes,
                      "training_unet_passes_per_class": result.unet_passes / len(names),
                      "inference_unet_passes_per_image": inference_passes(len(names), self.n_samples, self.to_keep)}
        self.class_names_ = names
        self._prepared = (tokens, pipe)
        return self

    def _conditioning(self, cache_dir=None) -> tuple[torch.Tensor, object]:
        from ..diffusion.gcpl import prompt_for

        prepared = getattr(self, "_prepared", None)
        if prepared is None:
            pipe = self._pipe(cache_dir)
            prepared = self._prepared = (self._tokens(pipe, self.token_embeddings_), pipe)
        tokens, pipe = prepared
        with torch.no_grad():
            cond = tokens.encode([prompt_for(self.template, n) for n in token_names(len(self.class_names_))])
        return cond, pipe

    def image_logits(self, images) -> np.ndarray:
        """[N, C] classifier logits (minus the summed noise-prediction error) of PIL images."""
        from ..diffusion.gcpl import classify, latents
        from ..diffusion.pipeline import to_pixels

        self._check_fitted()
        cond, pipe = self._conditioning()
        out = []
        for image in images:
            z0 = latents(pipe, to_pixels(pipe, [image]))
            logits, _ = classify(pipe, z0, cond, n_samples=self.n_samples, to_keep=self.to_keep, seed=self.seed)
            out.append(logits)
        return np.asarray(out).reshape(len(out), len(self.class_names_))

    def predict_proba_images(self, backbone, images, batch_size: int = 32) -> np.ndarray:
        if not len(images):
            return np.zeros((0, len(self.class_names_)), dtype=np.float32)
        logits = torch.as_tensor(self.image_logits(images), dtype=torch.float64)
        return torch.softmax(logits, dim=-1).float().numpy()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.method} predicts from images (predict_proba_images), not from features")

    def n_trainable_parameters(self) -> int:
        return int(self.token_embeddings_.numel()) if hasattr(self, "token_embeddings_") else 0


class CoMPLeHead(GCPLHead):
    """GCPL plus the contrastive term (``contrastive_weight``, default 1) that pushes the other classes' tokens
    away from each image (C UNet passes per training image instead of one)."""

    method = "comple"

    def __init__(self, pipeline: str = "CompVis/stable-diffusion-v1-4", init_word: str = "object",
                 template: str = "a photo of a {}", steps: int | None = None, steps_per_class: int = 500,
                 batch_size: int = 4, lr: float = 2e-3, weight_decay: float = 1e-2, flip: float = 0.5,
                 contrastive_weight: float = 1.0, margin: float = 0.1, n_samples: Sequence[int] = (50, 500),
                 to_keep: Sequence[int] = (5, 1), seed: int = 0):
        super().__init__(pipeline, init_word, template, steps, steps_per_class, batch_size, lr, weight_decay, flip,
                         contrastive_weight, margin, n_samples, to_keep, seed)
