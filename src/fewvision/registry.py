"""Which class implements a saved method, for every task (used when a model file is loaded)."""

from __future__ import annotations


def head_class(task: str, method: str) -> type:
    """The head class for (task, method); KeyError if unknown."""
    if task == "classification":
        from .heads import head_classes

        return head_classes()[method]
    if task == "anomaly":
        from .anomaly import anomaly_head_classes

        return anomaly_head_classes()[method]
    raise KeyError(task)
