"""Files of the service, under its data folder, never named by anything a client sends.

* ``images/ab/abcdef...`` - uploaded images, content-addressed by their sha256 (the same bytes are stored once);
* ``models/<project>/v<version>.fvm`` - model files;
* ``heatmaps/<project>/<sha256>-v<version>.png`` - heat maps of anomaly predictions.

Every file is written to a temp file and renamed (``io.atomic``), before the database row that points at it is
committed: a reader never sees half a file, and a kill between the rename and the commit leaves a file no row
refers to (harmless; the same bytes uploaded again reuse it).

Uploads are checked before they are stored: a size limit in bytes, a size limit in pixels read from the header (a
decompression bomb is refused before it is decoded), and the content itself - decoded fully by ``io.images`` - whatever
the file is called (an HTML page named ``x.png`` is not an image).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..io.atomic import atomic_path

DEFAULT_MAX_BYTES = 25 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "MPO"}


class UploadError(ValueError):
    """An upload the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Blobs:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)
        for sub in ("images", "models", "heatmaps"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def image_path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / "images" / sha256[:2] / sha256

    def put_image(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.image_path(sha)
        if not path.is_file() or path.stat().st_size != len(data):
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        return sha

    def model_path(self, project_id: int, version: int) -> Path:
        return self.root / "models" / str(int(project_id)) / f"v{int(version)}.fvm"

    def heatmap_path(self, project_id: int, sha256: str, version: int) -> Path:
        return self.root / "heatmaps" / str(int(project_id)) / f"{sha256}-v{int(version)}.png"

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"{relative!r} is outside the data folder")
        return path


def clean_filename(name: str | None) -> str:
    """A client's file name, kept for people only: the last path component, printable, at most 200 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip().lstrip(".")
    return base[:200]


def check_image(data: bytes, filename: str, max_bytes: int = DEFAULT_MAX_BYTES,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an upload that is an image within the limits; :class:`UploadError` otherwise."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    name = clean_filename(filename) or "upload"
    if len(data) == 0:
        raise UploadError(f"{name}: empty file")
    if len(data) > max_bytes:
        raise UploadError(f"{name}: {len(data):,} bytes is over the upload limit of {max_bytes:,} bytes", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
                if w * h > max_pixels:
                    raise UploadError(f"{name}: {w}x{h} pixels is over the limit of {max_pixels:,} pixels", 413)
                if fmt not in IMAGE_FORMATS:
                    raise UploadError(f"{name}: {fmt} images are not accepted (JPEG, PNG, BMP, TIFF, WebP)", 415)
                im.load()
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow refused it before we could
        raise UploadError(f"{name}: too many pixels (over the limit of {max_pixels:,} pixels)", 413) from None
    except UnidentifiedImageError:
        raise UploadError(f"{name}: not an image (the content is no JPEG, PNG, BMP, TIFF or WebP, whatever the "
                          "name says)", 415) from None
    except (OSError, ValueError, SyntaxError, IndexError) as err:
        raise UploadError(f"{name}: cannot decode the image ({' '.join(str(err).split())})", 400) from None
    return w, h
