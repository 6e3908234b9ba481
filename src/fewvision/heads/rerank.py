"""Image-text matching re-ranking of a zero-shot head's top classes (BLIP's retrieval recipe, Li et al. 2022).

The contrastive (ITC) probabilities shortlist each image's ``k`` most likely classes; each shortlisted class ``c`` is
then scored as BLIP's retrieval evaluation scores a shortlisted text,

    r_c = mean over the class's prompts p of itm_match_logit(image, p)  +  cos(image embedding, class embedding),

(the ITM head's "match" logit, with the image's tokens cross-attended by the prompt, plus the ITC similarity), and
the probability mass the ITC gave the shortlist is shared among its classes by ``softmax(r)``: the shortlist is
re-ordered as the ITM scores say, classes outside it keep their ITC probabilities, the row still sums to 1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..backbones.base import BackboneError
from ..prompts import ClassSpec
from .zeroshot import class_similarity

RERANKERS = ("itm",)
DEFAULT_K = 3


def check_reranker(rerank: str | None, backbone, k: int) -> None:
    """Refuse an unknown re-ranker, a backbone without an ITM head, or a k below 1, in one line each."""
    if rerank is None:
        return
    if rerank not in RERANKERS:
        raise ValueError(f"unknown re-ranker '{rerank}': expected one of {', '.join(RERANKERS)}")
    if not hasattr(backbone, "itm_logits"):
        raise BackboneError(f"--rerank itm needs a backbone with an image-text matching head (BLIP: "
                            f"hf:Salesforce/blip-itm-base-coco or a local folder), not '{backbone.spec}'")
    if k < 1:
        raise ValueError(f"the re-ranking shortlist needs at least 1 class, got k={k}")


def itm_rerank(proba: np.ndarray, features: torch.Tensor, class_weights: torch.Tensor, backbone,
               pixels: torch.Tensor, classes: Sequence[ClassSpec], templates: Sequence[str],
               k: int = DEFAULT_K) -> np.ndarray:
    """Re-ranked probabilities [N, C] (see the module doc). ``proba`` [N, C]: the ITC probabilities; ``features``
    [N, D]: the normalised ITC image embeddings; ``class_weights`` [D, C]: the normalised class embeddings;
    ``pixels`` [N, 3, H, W]: the same images preprocessed for the backbone."""
    proba = np.asarray(proba, dtype=np.float64)
    k = min(k, proba.shape[1])
    prompts = [c.prompts(templates) for c in classes]
    out = proba.copy()
    cosine = class_similarity(features, class_weights).numpy()
    for i in range(len(proba)):
        short = np.argsort(-proba[i], kind="stable")[:k]
        texts = [t for c in short for t in prompts[c]]
        logits = backbone.itm_logits(pixels[i:i + 1], texts)[0, :, 1].numpy()
        starts = np.cumsum([0] + [len(prompts[c]) for c in short])
        score = np.array([logits[a:b].mean() for a, b in zip(starts[:-1], starts[1:])]) + cosine[i, short]
        share = np.exp(score - score.max())
        out[i, short] = proba[i, short].sum() * share / share.sum()
    return out.astype(np.float32)
