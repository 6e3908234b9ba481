"""The error of a dataset that cannot be read, raised by every module that reads or makes one."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the path and the reason."""
