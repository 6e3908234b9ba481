"""``fewvision batch``: score an archive of images into Parquet, in process or on Ray (being written)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
