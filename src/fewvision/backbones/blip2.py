"""BLIP-2 image-text retrieval (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models") as a zero-shot backbone: ``hf:Salesforce/blip2-itm-vit-g`` or a local folder
saved with ``save_pretrained`` (transformers' ``Blip2ForImageTextRetrieval``).

* **ITC**: the Q-Former's 32 learned queries cross-attend to the frozen ViT's tokens; each query's output, through
  ``vision_projection`` and L2-normalised, is one image vector. A text is the Q-Former's [CLS] output (text only)
  through ``text_projection``, normalised. The image-text similarity is the *largest* cosine over the queries
  (``forward(use_image_text_matching_head=False)``). So an image's features here are its Q unit vectors, flattened
  ([N, Q * D]; :attr:`image_vectors` = Q), and the zero-shot head scores each class by its best-matching vector.
  Heads that combine image features with text features linearly (tip, prolip, coop, clip-adapter...) need one
  vector per image and refuse these features in one line; image-only heads (prototype, linear...) use them flat.
* **ITM**: queries and text tokens go through the Q-Former together, cross-attending to the image; ``itm_head`` on
  each query's output, averaged over the queries, gives (no-match, match) logits
  (``forward(use_image_text_matching_head=True)``); ``classify --rerank itm`` uses them as for BLIP.

Both follow ``Blip2ForImageTextRetrieval.forward`` (tested equal on a tiny random configuration).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .base import Backbone, BackboneError, make_id
from .blip import read_config
from .hf import HFPixelTransform, model_folder, portable_folder
from .weights import file_digest

RETRIEVAL_ARCH = "Blip2ForImageTextRetrieval"


class Blip2Backbone(Backbone):
    has_text = True

    def __init__(self, spec: str, cache_dir: str | None = None, download: bool = True, device: str = "cpu"):
        from transformers import AutoProcessor, Blip2ForImageTextRetrieval  # heavy import, only when used

        self.spec = spec
        folder = model_folder(spec, cache_dir, download)
        self.folder = folder
        archs = read_config(folder).get("architectures") or []
        if archs and RETRIEVAL_ARCH not in archs:
            raise BackboneError(
                f"'{spec}' is a BLIP-2 {', '.join(archs)} model; zero-shot scoring needs an image-text retrieval "
                f"checkpoint ({RETRIEVAL_ARCH}), e.g. hf:Salesforce/blip2-itm-vit-g (a captioning BLIP-2 answers "
                "SLAC/TLAC as --lmm-url local --lmm-model FOLDER)")
        try:
            self.model = Blip2ForImageTextRetrieval.from_pretrained(str(folder), local_files_only=True).eval()
            self.model.to(device)
            self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise BackboneError(f"{folder}: cannot load a BLIP-2 retrieval model from here ({err})") from None
        self.tokenizer = self.processor.tokenizer
        self._preprocess = HFPixelTransform(self.processor.image_processor)
        self._device = torch.device(device)
        self._id = make_id("hf-blip2", file_digest(folder), repr(self._preprocess))
        cfg = self.model.config
        self.image_vectors = int(cfg.num_query_tokens)
        limit = int(getattr(cfg.qformer_config, "max_position_embeddings", 512))
        self.max_text_tokens = min(int(getattr(self.tokenizer, "model_max_length", limit) or limit), limit)

    def portable(self) -> tuple[dict[str, Path], str]:
        return portable_folder(self.folder)

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.model.config.vision_config.image_size
        return (size, size)

    @property
    def logit_scale(self) -> float:
        # BLIP-2's ITC temperature is learned (initialised at 0.07) but not kept by transformers' retrieval
        # checkpoints: its initial value, as for BLIP
        return 1.0 / 0.07

    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixels.to(self._device)).last_hidden_state

    def _tokens(self, texts: Sequence[str]):
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens,
                                return_tensors="pt")
        return tokens["input_ids"].to(self._device), tokens["attention_mask"].to(self._device)

    def _queries(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[N, Q, D]: the projected query outputs, each L2-normalised."""
        mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        queries = self.model.query_tokens.expand(image_tokens.shape[0], -1, -1)
        out = self.model.qformer(query_embeds=queries, encoder_hidden_states=image_tokens,
                                 encoder_attention_mask=mask).last_hidden_state
        return torch.nn.functional.normalize(self.model.vision_projection(out).float(), dim=-1)

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._queries(self._image_tokens(pixels)).flatten(1)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, Q * D]: each query vector unit length (not the flattened whole), as the ITC similarity takes them."""
        with torch.inference_mode():
            return self.forward_images(pixels).float()

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """ITC text embeddings [T, D]: ``text_projection`` of the Q-Former's [CLS] output (text only), normalised."""
        ids, mask = self._tokens(texts)
        with torch.inference_mode():
            hidden = self.model.qformer(query_embeds=self.model.embeddings(input_ids=ids), query_length=0,
                                        attention_mask=mask).last_hidden_state
            out = self.model.text_projection(hidden[:, 0, :])
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def itm_logits(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """ITM: (no-match, match) logits [B, T, 2], ``itm_head`` averaged over the query outputs."""
        ids, mask = self._tokens(texts)
        q = self.image_vectors
        rows = []
        with torch.inference_mode():
            for tokens in self._image_tokens(pixels):
                image = tokens.unsqueeze(0).expand(len(ids), -1, -1)
                image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=self._device)
                queries = self.model.query_tokens.expand(len(ids), -1, -1)
                joint_mask = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long, device=self._device), mask],
                                       dim=1)
                hidden = self.model.qformer(query_embeds=self.model.embeddings(input_ids=ids, query_embeds=queries),
                                            query_length=q, attention_mask=joint_mask, encoder_hidden_states=image,
                                            encoder_attention_mask=image_mask).last_hidden_state
                rows.append(self.model.itm_head(hidden[:, :q, :]).float().mean(dim=1))
        return torch.stack(rows)

    def itm_scores(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return torch.softmax(self.itm_logits(pixels, texts), dim=-1)[..., 1]

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            tokens = self._image_tokens(pixels).float()[:, 1:]  # drop [CLS]
        side = int(tokens.shape[1] ** 0.5)
        if side * side != tokens.shape[1]:
            raise BackboneError(f"'{self.spec}': {tokens.shape[1]} patch tokens do not form a square grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
