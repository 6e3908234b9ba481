"""SLAC: Single-stage LMM Augmented CLIP ("TLAC: Two-stage LMM Augmented CLIP for Zero-Shot Classification",
arXiv 2503.12206; docs/methods/slac-tlac.md).

A large multimodal model (LMM) is shown the image and asked "Which object is present in the image? Also tell its
attribute."; its free-text answer is embedded with the backbone's text tower and the image gets the class whose
zero-shot weight (the prompt-ensemble embedding of :func:`fewvision.heads.zeroshot.text_classifier`) is nearest by
cosine. Probabilities are ``softmax(logit_scale * cosine(answer, class weights))``. Training-free.

When the LMM gives no usable answer (timeout, HTTP error, malformed response, empty text, refusal) the image falls
back to plain CLIP zero-shot (image features against the same class weights), and the row says so.

The head stays a :class:`ClassifierHead`: ``fit`` builds the zero-shot classifier and ``logits(features)`` is the
CLIP fallback, so it saves, loads and predicts from cached features like the zero-shot head. The LMM path needs the
image files: :meth:`SLACHead.predict_with_lmm` (used by :func:`fewvision.tasks.zeroshot.classify_with_lmm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..prompts import ClassSpec
from .support import Support
from .zeroshot import ZeroShotHead

SLAC_PROMPT = "Which object is present in the image? Also tell its attribute."

# Decision paths recorded per image (row key "decision").
SLAC = "slac"
FALLBACK = "fallback-zeroshot"


def _softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=-1).numpy()


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class LMMDecisions:
    """Per image: probabilities [N, C], the decided class index, the note for reports and the decision path."""

    proba: np.ndarray
    index: np.ndarray
    notes: list[str]
    paths: list[str]
    answers: list[list[str]] = field(default_factory=list)  # the raw LMM texts per image, per stage


class SLACHead(ZeroShotHead):
    needs_text = True
    method = "slac"

    def __init__(self, classes: Sequence[ClassSpec | str] | None = None, templates: Sequence[str] | None = None,
                 prompt: str = SLAC_PROMPT):
        super().__init__(classes, templates)
        self.prompt = prompt

    def fit(self, support: Support) -> "SLACHead":
        if not str(self.prompt or "").strip():
            raise ValueError("the SLAC question to the LMM is empty")
        super().fit(support)
        self._backbone = support.backbone
        return self

    def bind(self, backbone) -> "SLACHead":
        """Attach the backbone whose text tower embeds the answers (after loading a saved head)."""
        self._backbone = backbone
        return self

    def _text_backbone(self, backbone=None):
        bb = backbone if backbone is not None else getattr(self, "_backbone", None)
        if bb is None:
            raise ValueError(f"the {self.method} head needs the backbone's text tower to embed LMM answers: bind() it")
        return bb

    def answer_logits(self, texts: Sequence[str], backbone=None) -> torch.Tensor:
        """LMM answers -> [N, C] logits: ``logit_scale * cosine(text embedding of the answer, class weight)``."""
        self._check_fitted()
        emb = self._text_backbone(backbone).encode_text(list(texts)).float()
        emb = torch.nn.functional.normalize(emb, dim=-1)
        return self.logit_scale_ * emb @ self.weights_.float()

    # --- the LMM path ------------------------------------------------------------------------------------------
    def stage1(self, features: torch.Tensor, paths: Sequence[str], lmm, shas: Sequence[str] | None = None,
               backbone=None):
        """Ask the LMM about every image; returns (answers, CLIP probabilities, SLAC probabilities or None per row)."""
        self._check_fitted()
        feats = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        with torch.inference_mode():
            p_clip = _softmax(self.logits(feats))
        answers = lmm.ask_many([(p, self.prompt) for p in paths], shas)
        usable = [i for i, a in enumerate(answers) if a.usable]
        p_slac: list[np.ndarray | None] = [None] * len(paths)
        if usable:
            with torch.inference_mode():
                probs = _softmax(self.answer_logits([answers[i].text for i in usable], backbone))
            for row, i in enumerate(usable):
                p_slac[i] = probs[row]
        return answers, p_clip, p_slac

    def predict_with_lmm(self, features: torch.Tensor, paths: Sequence[str], lmm, shas: Sequence[str] | None = None,
                         backbone=None) -> LMMDecisions:
        answers, p_clip, p_slac = self.stage1(features, paths, lmm, shas, backbone)
        proba = np.array(p_clip, dtype=np.float64, copy=True)
        notes, decision = [], []
        for i, answer in enumerate(answers):
            if p_slac[i] is not None:
                proba[i] = p_slac[i]
                notes.append(f"LMM: {one_line(answer.text)}")
                decision.append(SLAC)
            else:
                notes.append(f"fallback: {answer.error} (CLIP zero-shot)")
                decision.append(FALLBACK)
        return LMMDecisions(proba, proba.argmax(axis=1), notes, decision, [[a.text] for a in answers])
