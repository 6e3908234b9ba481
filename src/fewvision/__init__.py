"""fewvision: zero-shot and few-shot image classification and anomaly detection for visual quality inspection."""

from __future__ import annotations

__version__ = "0.1.0"

from .backbones import create_backbone  # noqa: E402
from .tasks.fewshot import evaluate_model, evaluate_prototype, fit, load, predict  # noqa: E402
from .tasks.zeroshot import classify, evaluate_zeroshot  # noqa: E402

__all__ = ["__version__", "classify", "evaluate_zeroshot", "evaluate_prototype", "create_backbone", "fit", "load",
           "predict", "evaluate_model"]
