"""From probabilities to decisions."""

from __future__ import annotations

from typing import Sequence

import numpy as np

UNKNOWN = "unknown"


def apply_unknown_threshold(proba: np.ndarray, class_names: Sequence[str], threshold: float | None) -> list[str]:
    """Top class of each row, or ``unknown`` where the top probability is below ``threshold`` (open-set rejection)."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"unknown threshold must be between 0 and 1, got {threshold}")
    if threshold is not None and UNKNOWN in class_names:
        raise ValueError(f"a class is named '{UNKNOWN}', which --unknown-threshold uses for rejected images")
    top = proba.argmax(axis=1)
    labels = [class_names[i] for i in top]
    if threshold is None:
        return labels
    return [UNKNOWN if proba[r, i] < threshold else lab for r, (i, lab) in enumerate(zip(top, labels))]
