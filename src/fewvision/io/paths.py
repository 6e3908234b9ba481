"""Where fewvision keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$FEWVISION_CACHE_DIR``, else ``$XDG_CACHE_HOME/fewvision`` (~/.cache)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("FEWVISION_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fewvision"


def weights_dir(root: str | os.PathLike | None = None) -> Path:
    """Downloaded model weights (a Hugging Face hub cache layout)."""
    return cache_dir(root) / "weights"


def features_dir(root: str | os.PathLike | None = None) -> Path:
    return cache_dir(root) / "features"
