"""Anomaly detection from good images only: heads behind one create function."""

from __future__ import annotations

from .base import AnomalyHead

_REGISTRY: dict[str, type[AnomalyHead]] = {}


def register(cls: type[AnomalyHead]) -> type[AnomalyHead]:
    """Class decorator: make a head available by its ``method`` name."""
    _REGISTRY[cls.method] = cls
    return cls


def _load_all() -> None:
    # Importing a head module registers it; listed here so the registry is complete before any look-up.
    import importlib

    for module in MODULES:
        importlib.import_module(f"fewvision.anomaly.{module}")


MODULES: list[str] = ["patchcore", "padim", "winclip", "autoencoder", "stpm", "anomalydino", "ganomaly"]


def anomaly_head_classes() -> dict[str, type[AnomalyHead]]:
    _load_all()
    return dict(_REGISTRY)


def create_anomaly_head(method: str, **params) -> AnomalyHead:
    heads = anomaly_head_classes()
    if method not in heads:
        raise ValueError(f"unknown anomaly method '{method}': expected one of {', '.join(sorted(heads)) or 'none'}")
    return heads[method](**params)


__all__ = ["AnomalyHead", "create_anomaly_head", "anomaly_head_classes", "register"]
