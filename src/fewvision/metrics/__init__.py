"""Metrics of classification (``classification``) and anomaly detection (``anomaly``), and writing them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_text


def save_metrics(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``metrics`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
