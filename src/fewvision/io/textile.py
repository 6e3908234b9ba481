"""The textile images installed with the ``conformal-clip-data`` package: 2,000 images in three folders (nominal,
local, global). They are the ``textile`` dataset (:mod:`fewvision.io.datasets`) and the cloth the synthetic
``textile-defects`` are drawn on (:mod:`fewvision.io.generated`)."""

from __future__ import annotations

from pathlib import Path

from .errors import DatasetError
from .images import is_image_path

TEXTILE_CLASSES = ("nominal", "local", "global")


def images_in(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))


def textile_root() -> Path:
    try:
        import conformal_clip_data
    except ImportError:
        raise DatasetError(
            "the textile images come from the 'conformal-clip-data' package: pip install 'fewvision[demo]'"
        ) from None
    return Path(conformal_clip_data.textile_simulated_root())
