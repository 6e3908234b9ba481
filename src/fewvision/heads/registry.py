"""The classification heads by method name, filled by the package's ``__init__`` (which imports every head module).

A leaf: a head that wraps another one (``with_good``) reads it without importing the package that imports it.
"""

from __future__ import annotations

from .base import ClassifierHead

REGISTRY: dict[str, type[ClassifierHead]] = {}
