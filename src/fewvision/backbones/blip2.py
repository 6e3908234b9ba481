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

from typing import Sequence

import torch

from .blip import RetrievalBackbone


class Blip2Backbone(RetrievalBackbone):
    arch = "Blip2ForImageTextRetrieval"
    family = "BLIP-2"
    example = "hf:Salesforce/blip2-itm-vit-g"
    other_uses = " (a captioning BLIP-2 answers SLAC/TLAC as --lmm-url local --lmm-model FOLDER)"
    text_config = "qformer_config"

    def __init__(self, spec: str, cache_dir: str | None = None, download: bool = True, device: str = "cpu"):
        super().__init__(spec, cache_dir, download, device)
        self.image_vectors = int(self.model.config.num_query_tokens)

    @property
    def logit_scale(self) -> float:
        # BLIP-2's ITC temperature is learned (initialised at 0.07) but not kept by transformers' retrieval
        # checkpoints: its initial value, as for BLIP
        return 1.0 / 0.07

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
