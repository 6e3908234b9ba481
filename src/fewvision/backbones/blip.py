"""BLIP image-text matching (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training") as a zero-shot
backbone: ``hf:Salesforce/blip-itm-base-coco`` (or ``-large-coco``, ``-base-flickr``...) or a local folder saved
with ``save_pretrained``.

BLIP has two ways to score an image against a text:

* **ITC** (image-text contrastive): ``normalize(vision_proj(ViT [CLS]))`` against
  ``normalize(text_proj(text encoder [CLS]))``, the text encoded *without* the image. These are
  :meth:`BlipBackbone.encode_images` and :meth:`BlipBackbone.encode_text`, so every text-based head (zero-shot,
  SLAC/TLAC, the prompt-based few-shot heads) and the feature cache work unchanged. Logits use
  ``logit_scale = exp(config.logit_scale_init_value)`` = 1/0.07, BLIP's initial ITC temperature, because the
  transformers retrieval checkpoints do not carry the learned temperature.
* **ITM** (image-text matching): the text encoder cross-attends to all image tokens and ``itm_head`` classifies the
  pair as matching or not; :meth:`BlipBackbone.itm_scores` returns ``P(match)`` for every (image, text) pair. It costs
  one text-encoder pass per pair, so BLIP's retrieval recipe uses ITC to shortlist and ITM to re-rank; the zero-shot
  path uses ITC, and ``classify --rerank itm`` re-ranks its top classes with ``itm_logits``
  (:mod:`fewvision.heads.rerank`).

Both follow transformers' ``BlipForImageTextRetrieval.forward`` (``use_itm_head=False`` / ``True``) exactly.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import Sequence

import torch

from .base import Backbone, BackboneError, make_id
from .hf import HFPixelTransform, model_folder, portable_folder
from .weights import file_digest

RETRIEVAL_ARCH = "BlipForImageTextRetrieval"


def is_blip_config(config: dict) -> bool:
    return config.get("model_type") == "blip"


def read_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


class RetrievalBackbone(Backbone):
    """The shared part of the BLIP and BLIP-2 image-text retrieval backbones: loading the checkpoint and its
    processor, tokenising, the ViT's tokens, ITM probabilities and patch features. A subclass names its
    transformers class (``arch``), its family for messages, and the config holding its text positions."""

    has_text = True
    arch = RETRIEVAL_ARCH
    family = "BLIP"
    example = "hf:Salesforce/blip-itm-base-coco"
    other_uses = ""
    text_config = "text_config"

    def __init__(self, spec: str, cache_dir: str | None = None, download: bool = True, device: str = "cpu"):
        import transformers  # heavy import, only when this backbone is used

        self.spec = spec
        folder = model_folder(spec, cache_dir, download)
        self.folder = folder
        archs = read_config(folder).get("architectures") or []
        if archs and self.arch not in archs:
            raise BackboneError(
                f"'{spec}' is a {self.family} {', '.join(archs)} model; zero-shot scoring needs an image-text "
                f"retrieval checkpoint ({self.arch}), e.g. {self.example}{self.other_uses}")
        try:
            model = getattr(transformers, self.arch).from_pretrained(str(folder), local_files_only=True)
            self.model = model.eval().to(device)
            self.processor = transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise BackboneError(f"{folder}: cannot load a {self.family} retrieval model from here ({err})") from None
        self.tokenizer = self.processor.tokenizer
        self._preprocess = HFPixelTransform(self.processor.image_processor)
        self._device = torch.device(device)
        self._id = make_id(f"hf-{self.family.lower().replace('-', '')}", file_digest(folder), repr(self._preprocess))
        limit = int(getattr(getattr(self.model.config, self.text_config), "max_position_embeddings", 512))
        self.max_text_tokens = min(int(getattr(self.tokenizer, "model_max_length", limit) or limit), limit)

    def portable(self) -> tuple[dict[str, Path], str]:
        return portable_folder(self.folder)

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.model.config.vision_config.image_size
        return (size, size)

    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixels.to(self._device)).last_hidden_state

    def _tokens(self, texts: Sequence[str]):
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens,
                                return_tensors="pt")
        return tokens["input_ids"].to(self._device), tokens["attention_mask"].to(self._device)

    @abstractmethod
    def itm_logits(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """ITM: the (no-match, match) logits [B, T, 2] for every (image, text) pair."""

    def itm_scores(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """ITM: ``P(match)`` [B, T] for every (image, text) pair (softmax over no-match/match)."""
        return torch.softmax(self.itm_logits(pixels, texts), dim=-1)[..., 1]

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            tokens = self._image_tokens(pixels).float()[:, 1:]  # drop [CLS]
        side = int(tokens.shape[1] ** 0.5)
        if side * side != tokens.shape[1]:
            raise BackboneError(f"'{self.spec}': {tokens.shape[1]} patch tokens do not form a square grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


class BlipBackbone(RetrievalBackbone):
    @property
    def logit_scale(self) -> float:
        return float(torch.tensor(self.model.config.logit_scale_init_value).exp())

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """ITC image embedding (before normalisation): ``vision_proj`` of the ViT's [CLS] token."""
        return self.model.vision_proj(self._image_tokens(pixels)[:, 0, :])

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """ITC text embeddings: ``text_proj`` of the text encoder's [CLS] token (no image), L2-normalised."""
        ids, mask = self._tokens(texts)
        with torch.inference_mode():
            hidden = self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            out = self.model.text_proj(hidden[:, 0, :])
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def itm_logits(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """ITM: ``itm_head``'s (no-match, match) logits [B, T, 2] for every (image, text) pair."""
        ids, mask = self._tokens(texts)
        rows = []
        with torch.inference_mode():
            image_tokens = self._image_tokens(pixels)
            for tokens in image_tokens:
                enc = tokens.unsqueeze(0).expand(len(ids), -1, -1)
                enc_mask = torch.ones(enc.shape[:-1], dtype=torch.long, device=self._device)
                hidden = self.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc,
                                                 encoder_attention_mask=enc_mask).last_hidden_state
                rows.append(self.model.itm_head(hidden[:, 0, :]).float())
        return torch.stack(rows)
