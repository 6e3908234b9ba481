"""TLAC: Two-stage LMM Augmented CLIP (arXiv 2503.12206), as implemented here.

Stage 1 is SLAC (:mod:`fewvision.heads.slac`): the LMM describes the object and its attribute, the CLIP text tower
maps the answer to the nearest class. Stage 2 shows the LMM the image again with a short list of candidate classes -
the union of CLIP zero-shot's top-k and SLAC's top-k (k = 3 by default), ordered by the stage-1 score below, each
with its name and first description from the class file - and asks it to pick one or answer "none".

Decision rule (per image)::

    base = (p_clip + p_slac) / 2      if stage 1 gave a usable answer, else p_clip
    LMM picked candidate c:            p = (1 - w) * base + w * onehot(c),  label = c      (w = choice_weight = 0.5)
    "none", unusable or unparseable:   p = base,                            label = argmax(base)

With w >= 0.5 the chosen class always has the largest probability, so the stage-2 choice decides; the remaining mass
keeps CLIP's and SLAC's ranking of the other classes. The path taken is recorded per row (``decision``):
``tlac-choice``, ``tlac-none``, ``tlac-unparsed``, ``tlac-unusable`` (stage 2 failed), each noted with whether stage 1
was usable.

The paper's exact second-stage prompt is not published in a form we could verify; ours is :data:`CHOICE_PROMPT`.
Answers are parsed by :func:`parse_choice`: an exact class name (case-insensitive, ``_``/``-`` as spaces), an
option number ("2", "option 2", "2. scratch"), "none"/"none of them"/"neither", or a sentence that names exactly one
candidate; anything else is unparseable.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..prompts import ClassSpec
from .slac import SLAC_PROMPT, LMMDecisions, SLACHead, one_line

CHOICE_PROMPT = (
    "Look at the image. Which one of these options describes it best?\n{options}\n"
    'Answer with the name of one option exactly as written, or with "none" if none of them fits.'
)

CHOICE, NONE, UNPARSED, UNUSABLE = "tlac-choice", "tlac-none", "tlac-unparsed", "tlac-unusable"

_NONE = re.compile(r"^(?:none|neither)\b|^(?:no|nothing|no match)$")


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower().replace("_", " ").replace("-", " ")).split())


def parse_choice(answer: str, names: Sequence[str]) -> tuple[str, int | None]:
    """The stage-2 answer -> ``("choice", i)`` (index into ``names``), ``("none", None)`` or ``("unparsed", None)``."""
    a = _norm(answer)
    normed = [_norm(n) for n in names]
    if not a:
        return "unparsed", None
    if a in normed:
        return "choice", normed.index(a)
    if _NONE.match(a):
        return "none", None
    # Names mentioned as whole words; a match inside a longer matched name ("defect" in "local defect") is dropped.
    spans = []
    for i, n in enumerate(normed):
        if n:
            spans += [(m.start(), m.end(), i) for m in re.finditer(rf"(?<![0-9a-z]){re.escape(n)}(?![0-9a-z])", a)]
    named = {i for s, e, i in spans if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)}
    numbers = {int(m.group(1)) - 1 for m in re.finditer(r"(?:^|option |number |choice |no |answer (?:is )?)(\d+)\b",
                                                          a)}
    numbers = {k for k in numbers if 0 <= k < len(names)}
    lead = re.match(r"^(?:(?:the )?answer (?:is )?|option |number |choice )?(\d+)\b", a)
    if lead and 0 <= int(lead.group(1)) - 1 < len(names):
        k = int(lead.group(1)) - 1
        if named <= {k}:
            return "choice", k
        return "unparsed", None
    if len(named) == 1 and numbers <= named:
        return "choice", next(iter(named))
    if not named and len(numbers) == 1:
        return "choice", next(iter(numbers))
    if not named and re.search(r"\bnone\b", a):
        return "none", None
    return "unparsed", None


def options_text(classes: Sequence[ClassSpec], candidates: Sequence[int]) -> str:
    lines = []
    for n, i in enumerate(candidates, 1):
        spec = classes[i]
        desc = f": {one_line(spec.descriptions[0], 160)}" if spec.descriptions else ""
        lines.append(f"{n}. {spec.name}{desc}")
    return "\n".join(lines)


class TLACHead(SLACHead):
    method = "tlac"

    def __init__(self, classes: Sequence[ClassSpec | str] | None = None, templates: Sequence[str] | None = None,
                 prompt: str = SLAC_PROMPT, choice_prompt: str = CHOICE_PROMPT, top_k: int = 3,
                 choice_weight: float = 0.5):
        super().__init__(classes, templates, prompt)
        self.choice_prompt = choice_prompt
        self.top_k = top_k
        self.choice_weight = choice_weight

    def fit(self, support) -> "TLACHead":
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if not 0.5 <= self.choice_weight <= 1.0:
            raise ValueError(f"choice_weight must be between 0.5 and 1 (so the LMM's choice decides), got "
                             f"{self.choice_weight}")
        if "{options}" not in self.choice_prompt:
            raise ValueError("the TLAC choice prompt must contain '{options}' where the candidate list goes")
        super().fit(support)
        return self

    def candidates(self, p_clip: np.ndarray, p_slac: np.ndarray | None, base: np.ndarray) -> list[int]:
        """Union of CLIP's and SLAC's top-k, ordered by ``base`` (highest first, ties by class order)."""
        k = min(self.top_k, len(p_clip))
        pool = set(np.argsort(-p_clip, kind="stable")[:k].tolist())
        if p_slac is not None:
            pool |= set(np.argsort(-p_slac, kind="stable")[:k].tolist())
        return sorted(pool, key=lambda i: (-base[i], i))

    def choice_question(self, candidates: Sequence[int]) -> str:
        return self.choice_prompt.replace("{options}", options_text(self.classes_, candidates))

    def predict_with_lmm(self, features, paths: Sequence[str], lmm, shas: Sequence[str] | None = None,
                         backbone=None) -> LMMDecisions:
        answers1, p_clip, p_slac = self.stage1(features, paths, lmm, shas, backbone)
        bases = [p_clip[i] if p_slac[i] is None else (p_clip[i] + p_slac[i]) / 2 for i in range(len(paths))]
        cands = [self.candidates(p_clip[i], p_slac[i], bases[i]) for i in range(len(paths))]
        answers2 = lmm.ask_many([(p, self.choice_question(c)) for p, c in zip(paths, cands)], shas)
        n_classes = len(self.class_names_)
        proba = np.zeros((len(paths), n_classes), dtype=np.float64)
        index = np.zeros(len(paths), dtype=np.int64)
        notes, decision = [], []
        for i, (a1, a2) in enumerate(zip(answers1, answers2)):
            base = bases[i]
            s1 = f"stage 1: {one_line(a1.text, 200)}" if a1.usable else f"stage 1 fallback: {a1.error}"
            if not a2.usable:
                kind, pick, s2 = UNUSABLE, None, f"stage 2 fallback: {a2.error}"
            else:
                kind, pick = parse_choice(a2.text, [self.class_names_[c] for c in cands[i]])
                s2 = f"stage 2: {one_line(a2.text, 120)}"
                kind = {"choice": CHOICE, "none": NONE}.get(kind, UNPARSED)
            combined = "CLIP+SLAC" if a1.usable else "CLIP"
            if kind == CHOICE:
                c = cands[i][pick]
                proba[i] = (1 - self.choice_weight) * base
                proba[i, c] += self.choice_weight
                index[i] = c
                outcome = f"LMM chose {self.class_names_[c]}"
            else:
                proba[i] = base
                index[i] = int(np.argmax(base))
                why = {NONE: "LMM said none", UNPARSED: "answer not one of the options",
                       UNUSABLE: "no usable answer"}[kind]
                outcome = f"{why} -> {combined}"
            notes.append(f"{s1} | {s2} | {outcome}")
            decision.append(kind if a1.usable else f"{kind}/stage1-fallback")
        return LMMDecisions(proba, index, notes, decision, [[a1.text, a2.text] for a1, a2 in zip(answers1, answers2)])
