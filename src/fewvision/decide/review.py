"""From probabilities to decisions: the label of each image, or ``review`` with a plain reason.

Two rules send an image to review (a person looks at it):

* ``--unknown-threshold P``: the top class's probability is below P (open-set rejection; no guarantee);
* ``--abstain`` with conformal thresholds in the model: the prediction set is not exactly one class - empty (no
  class reached the coverage level) or several classes (ambiguous). With Mondrian thresholds a singleton set can
  hold another class than the most probable one; the set is the decision with the guarantee, so its member wins.

The top class and its probability stay in every row, review or not, so a line system can still see the guess.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

REVIEW = "review"  # the one word for "not sure" in rows, metrics and reports


def check_class_names(class_names: Sequence[str]) -> None:
    if REVIEW in class_names:
        raise ValueError(f"a class is named '{REVIEW}', which fewvision uses for images sent to review")


def decide(proba: np.ndarray, class_names: Sequence[str], *, unknown_threshold: float | None = None,
           sets: np.ndarray | None = None, alpha: float | None = None,
           abstain: bool = False, top: Sequence[int] | None = None) -> list[tuple[str, str | None]]:
    """(label, review reason or None) for every row of ``proba`` [N, C]; ``sets`` [N, C] bool, the conformal sets
    at miscoverage ``alpha`` (used when ``abstain``); ``top``, the chosen class of each row when it is not the most
    probable one (an LMM's choice)."""
    if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:
        raise ValueError(f"unknown threshold must be between 0 and 1, got {unknown_threshold}")
    if unknown_threshold is not None or abstain:
        check_class_names(class_names)
    if abstain and sets is None:
        raise ValueError("--abstain needs conformal thresholds in the model: fit it with --alpha and "
                         "--calibrate-fraction")
    if top is None:
        top = proba.argmax(axis=1) if len(proba) else np.zeros(0, dtype=np.int64)
    level = f"{1 - alpha:.0%}" if alpha is not None else "coverage"
    out: list[tuple[str, str | None]] = []
    for i, c in enumerate(top):
        label, reason = class_names[int(c)], None
        if abstain:
            members = [class_names[j] for j in np.flatnonzero(sets[i])]
            if len(members) == 1:
                label = members[0]
            elif not members:
                label, reason = REVIEW, f"no class reached the {level} coverage level"
            else:
                label, reason = REVIEW, f"{len(members)} classes are in the {level} prediction set: {', '.join(members)}"
        if reason is None and unknown_threshold is not None and proba[i, c] < unknown_threshold:
            label, reason = REVIEW, (f"the top class {class_names[int(c)]} has probability {proba[i, c]:.2f}, below "
                                     f"the review threshold {unknown_threshold:g}")
        out.append((label, reason))
    return out


def apply_unknown_threshold(proba: np.ndarray, class_names: Sequence[str], threshold: float | None) -> list[str]:
    """Top class of each row, or ``review`` where the top probability is below ``threshold``."""
    return [label for label, _ in decide(proba, class_names, unknown_threshold=threshold)]


__all__ = ["REVIEW", "decide", "apply_unknown_threshold", "check_class_names"]
