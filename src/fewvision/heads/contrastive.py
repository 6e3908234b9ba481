"""Contrastive fine-tuning of CLIP on (image, caption) pairs: FLYP's recipe (Goyal et al. 2023, "Finetune like you
pretrain") with the positive-pair regulariser of Chen, Deng, Li and Gu (ICLR 2024, arXiv 2310.00927).

Each support image is paired with its caption - the user's own text (a ``caption`` column in the CSV manifest:
an inspection record's finding) or, without one, a prompt of its class - and the towers are trained with CLIP's
symmetric contrastive loss over the batch, as in pre-training (FLYP). Chen et al. show the CLIP loss alone leaves a
temperature-dependent margin between matching and non-matching pairs and add a one-sided term on the positive
pairs only; here that term is the squared distance of each image's and its caption's normalised embeddings,

    L = 1/2 [CE(s I T^T, pairs) + CE(s T I^T, pairs)] + lambda * 1/B sum_i ||I_i - T_t(i)||^2,

``lambda`` = ``margin_weight`` (0 gives plain FLYP). Where the paper's exact form could not be checked (its
regulariser is described as a penalty on the distance of positive pairs; with unit vectors a squared distance and
a negative cosine differ by a constant and a factor 2), this choice is the one documented in
docs/methods/contrastive.md.

Texts repeat when captions are class prompts (two images of one class in a batch): the batch's texts are made
unique, the image->text term takes each image's own text as target, and the text->image term spreads its target
over every image of that text - with distinct captions it is exactly CLIP's loss.

Only what ``train`` names is trained: ``projections`` (the two towers' output projections), ``last-blocks`` (the
last ``blocks`` transformer blocks of both towers, their final layer norms and projections) or ``lora``
(low-rank adapters on the attention projections, as the ``lora`` head). Prediction is zero-shot with the tuned
towers: class prompts through the tuned text tower, images through the tuned image tower.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import BackboneError
from .base import ClassifierHead
from .coop import text_tower
from ..prompts import ClassSpec, resolve_templates
from .support import Support
from .tuned import tuned_from_state, tuned_state

TRAIN = ("projections", "last-blocks", "lora")


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, text_of_image: torch.Tensor, scale: float,
                     margin_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean positive-pair cosine) for normalised image [B, D] and unique text [T, D] embeddings, image i
    matching text ``text_of_image[i]``: CLIP's symmetric loss plus ``margin_weight`` x the mean squared distance of
    the positive pairs."""
    logits = scale * image @ text.T  # [B, T]
    image_to_text = F.cross_entropy(logits, text_of_image)
    matches = F.one_hot(text_of_image, len(text)).T.float()  # [T, B]
    text_to_image = -(matches / matches.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    positive = text[text_of_image]
    cosine = (image * positive).sum(-1)
    loss = 0.5 * (image_to_text + text_to_image) + margin_weight * (image - positive).pow(2).sum(-1).mean()
    return loss, cosine.mean()


def trainable_names(model: nn.Module, train: str, blocks: int = 1) -> list[str]:
    """Names of the parameters ``train`` allows to change, in an open_clip CLIP model."""
    if train not in ("projections", "last-blocks"):
        raise ValueError(f"train must be one of {', '.join(TRAIN)}, not '{train}'")
    names = [n for n, _ in model.named_parameters()]
    projections = [n for n in names if n in ("visual.proj", "text_projection")
                   or n.startswith(("visual.attnpool.c_proj.", "visual.head.proj."))]
    if not any(n.startswith("visual.") for n in projections) or "text_projection" not in projections:
        raise BackboneError("contrastive fine-tuning needs an open_clip CLIP model with image and text projections")
    if train == "projections":
        return projections
    chosen = list(projections)
    for prefix, owner, norm in (("visual.transformer.resblocks.", getattr(model.visual, "transformer", None),
                                 "visual.ln_post."), ("transformer.resblocks.", model.transformer, "ln_final.")):
        n_blocks = len(getattr(owner, "resblocks", []))
        if n_blocks == 0:
            raise BackboneError("train=last-blocks needs transformer towers (a ViT image tower): use "
                                "train=projections or train=lora")
        wanted = tuple(f"{prefix}{i}." for i in range(max(0, n_blocks - int(blocks)), n_blocks))
        chosen += [n for n in names if n.startswith(wanted) or n.startswith(norm)]
    return chosen


class ContrastiveHead(ClassifierHead):
    """CLIP fine-tuned contrastively on the support pairs; predicts from images (see module docstring)."""

    method = "contrastive"
    needs_text = True
    feature_kind = "images"

    def __init__(self, classes: Sequence[ClassSpec | str] | None = None, templates: Sequence[str] | None = None,
                 train: str = "projections", blocks: int = 1, margin_weight: float = 0.1, rank: int = 2,
                 alpha: float = 1.0, steps: int | None = None, iterations_per_shot: int = 50, batch_size: int = 32,
                 lr: float = 1e-5, weight_decay: float = 0.1, seed: int = 0):
        self.classes = classes
        self.templates = templates
        self.train = train
        self.blocks = blocks
        self.margin_weight = margin_weight
        self.rank = rank
        self.alpha = alpha
        self.steps = steps
        self.iterations_per_shot = iterations_per_shot
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed

    # --- the tuned model ------------------------------------------------------------------------------------------
    def _lora(self):
        from .lora import LoRAHead

        return LoRAHead(rank=self.rank, alpha=self.alpha, dropout=0.0, seed=self.seed)

    def _model(self, backbone) -> tuple[nn.Module, list[str]]:
        """A private copy of the backbone's CLIP model, and the names of the parameters that train."""
        if self.train not in TRAIN:
            raise ValueError(f"train must be one of {', '.join(TRAIN)}, not '{self.train}'")
        if self.train == "lora":
            model = self._lora()._adapted_model(backbone)
            return model, [n for n, p in model.named_parameters() if p.requires_grad]
        model = copy.deepcopy(text_tower(backbone)).eval()
        names = trainable_names(model, self.train, self.blocks)
        for name, param in model.named_parameters():
            param.requires_grad_(name in set(names))
        return model, names

    def _tuned_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.train == "lora":
            from peft import get_peft_model_state_dict

            return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone() for n in self.tuned_names_}

    def bind(self, backbone) -> "ContrastiveHead":
        """Rebuild the tuned model from the stored tensors on a fresh copy of ``backbone``'s model."""
        self._check_fitted()
        if backbone.id != self.backbone_id_:
            raise BackboneError(f"this contrastive head was fitted on backbone id {self.backbone_id_}, not "
                                f"{backbone.id}")
        model, _ = self._model(backbone)
        if self.train == "lora":
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, self.tuned_)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"the stored LoRA tensors do not fit this model: {result.unexpected_keys[:3]}")
        else:
            params = dict(model.named_parameters())
            wrong = [n for n, v in self.tuned_.items() if n not in params or params[n].shape != v.shape]
            if wrong:
                raise ValueError(f"the stored tensors do not fit this model: {', '.join(wrong[:3])}")
            with torch.no_grad():
                for name, value in self.tuned_.items():
                    params[name].copy_(value)
        self._tuned = model.eval()
        return self

    def _class_text(self, model, backbone) -> torch.Tensor:
        """[D, C]: per class, the normalised mean of its prompts' normalised embeddings."""
        prompts = [c.prompts(self.templates_) for c in self.classes_]
        with torch.no_grad():
            columns = [F.normalize(F.normalize(model.encode_text(backbone.tokenizer(p)).float(), dim=-1).mean(0),
                                   dim=-1) for p in prompts]
        return torch.stack(columns, dim=1).contiguous()

    # --- training -----------------------------------------------------------------------------------------------
    def fit(self, support: Support) -> "ContrastiveHead":
        from ..features.encode import AugmentedView
        from ..io.images import load_image

        backbone = support.backbone
        if support.features is None or not support.paths:
            raise ValueError("contrastive fine-tuning trains on the support images: the support set needs image "
                             "paths")
        classes = self.classes if self.classes is not None else list(support.class_names)
        self.classes_ = [c if isinstance(c, ClassSpec) else ClassSpec(str(c)) for c in classes]
        self.templates_ = resolve_templates(self.templates if self.templates is not None else ["a photo of a {}."])
        self.logit_scale_ = float(backbone.logit_scale)
        self.backbone_id_ = backbone.id
        captions = getattr(support, "captions", None) or {}
        labels = support.labels.tolist()
        class_prompts = [c.prompts(self.templates_) for c in self.classes_]
        model, self.tuned_names_ = self._model(backbone)
        steps = int(self.steps) if self.steps is not None else self.iterations_per_shot * support.shots
        images = [load_image(p) for p in support.paths]
        generator = torch.Generator().manual_seed(self.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
        order: list[int] = []
        self.losses_, self.positive_similarity_ = [], []
        self.n_captions_ = sum(1 for p in support.paths if captions.get(p))
        for step in range(steps):
            while len(order) < min(self.batch_size, len(images)):
                order += torch.randperm(len(images), generator=generator).tolist()
            batch, order = order[: self.batch_size], order[self.batch_size:]
            # An image's text: its caption, else its class's prompt for this step (the templates take turns by
            # step, so two images of a class in a batch share one text rather than count as each other's negatives).
            texts = [captions.get(support.paths[i]) or
                     class_prompts[labels[i]][step % len(class_prompts[labels[i]])] for i in batch]
            unique = list(dict.fromkeys(texts))
            view = AugmentedView(step, self.seed, scale=(0.5, 1.0))
            pixels = torch.stack([backbone.preprocess(view(images[i], support.paths[i])) for i in batch])
            image = F.normalize(model.encode_image(pixels).float(), dim=-1)
            text = F.normalize(model.encode_text(backbone.tokenizer(unique)).float(), dim=-1)
            loss, cosine = contrastive_loss(image, text, torch.tensor([unique.index(t) for t in texts]),
                                            self.logit_scale_, self.margin_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            self.losses_.append(loss.item())
            self.positive_similarity_.append(cosine.item())
        model.eval()
        self.text_weights_ = self._class_text(model, backbone)
        self.tuned_ = self._tuned_state(model)
        self._tuned = model
        self.class_names_ = [c.name for c in self.classes_]
        return self

    # --- prediction ---------------------------------------------------------------------------------------------
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [N, 3, H, W] -> logits (needs ``bind(backbone)`` after loading)."""
        if getattr(self, "_tuned", None) is None:
            raise ValueError("the contrastive head predicts from images with its tuned towers: call bind(backbone) "
                             "first, or use predict_proba_images(backbone, images)")
        if features.ndim != 4:
            raise ValueError(f"the contrastive head takes preprocessed images [N, 3, H, W] (feature kind 'images'), "
                             f"got shape {list(features.shape)}")
        with torch.no_grad():
            image = F.normalize(self._tuned.encode_image(features.float()).float(), dim=-1)
        return self.logit_scale_ * image @ self.text_weights_

    def image_features(self, backbone, images, batch_size: int = 32) -> torch.Tensor:
        """Normalised image embeddings [N, D] from the tuned image tower."""
        if getattr(self, "_tuned", None) is None:
            self.bind(backbone)
        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                pixels = torch.stack([backbone.preprocess(im.convert("RGB")) for im in chunk])
                out.append(F.normalize(self._tuned.encode_image(pixels).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.text_weights_.shape[0])

    def predict_proba_images(self, backbone, images, batch_size: int = 32) -> np.ndarray:
        if not len(images):
            return np.zeros((0, len(self.class_names_)), dtype=np.float32)
        logits = self.logit_scale_ * self.image_features(backbone, images, batch_size) @ self.text_weights_
        return torch.softmax(logits.double(), dim=-1).float().numpy()

    def n_trainable_parameters(self) -> int:
        return sum(int(v.numel()) for v in getattr(self, "tuned_", {}).values())

    # --- persistence: the tuned tensors and the text classifier, not the model -----------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return tuned_state(self, "tuned")

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "ContrastiveHead":
        return tuned_from_state(cls, tensors, config, "tuned")
