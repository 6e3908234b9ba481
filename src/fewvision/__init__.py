"""fewvision: zero-shot and few-shot image classification and anomaly detection for visual quality inspection.

The public API is imported on first use, so ``import fewvision`` (and ``fewvision --help``) stays fast.
"""

from __future__ import annotations

__version__ = "0.2.0"

_API = {
    "classify": "tasks.zeroshot",
    "evaluate_zeroshot": "tasks.zeroshot",
    "evaluate_prototype": "tasks.fewshot",
    "fit": "tasks.fewshot",
    "load": "tasks.fewshot",
    "predict": "tasks.fewshot",
    "evaluate_model": "tasks.fewshot",
    "create_backbone": "backbones",
    "fit_anomaly": "tasks.anomaly",
    "score_files": "tasks.anomaly",
    "evaluate_anomaly": "tasks.anomaly",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fewvision' has no attribute '{name}'")


__all__ = ["__version__", *_API]
