"""Reading images safely: every format a camera or a tool may write, and a clear reason when a file is unusable.

All decoding goes through :func:`load_image`; it returns an RGB PIL image or raises :class:`BadImage` whose message
names the file and the reason. Callers that process batches catch it, record the skip and go on.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

# Refuse decompression bombs: above this many pixels a file is reported, not decoded (PIL's default warns at 89M).
MAX_PIXELS = 64_000_000


class BadImage(ValueError):
    """A file that cannot be used as an image. ``str(err)`` is one line: '<path>: <reason>'."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` must not be opened (a FIFO would block forever, a device or socket is no image), or None.

    Checked before every open: reading a FIFO named on the command line would hang the run for good."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return f"cannot read file ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not an image file"
    kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"not a regular file ({kind})"


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a regular file's bytes; OSError (with a reason) for anything else."""
    why = not_a_regular_file(path)
    if why is not None:
        raise OSError(why)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



def hash_files(paths: Sequence[str]) -> tuple[list[str | None], dict[int, str]]:
    """sha256 of each file (None where it cannot be read, with the reason), in threads (hashing releases the GIL)."""

    def one(p):
        try:
            return sha256_file(p), None
        except OSError as err:  # sha256_file's own reasons (not a regular file) carry no strerror
            return None, f"cannot read file ({err.strerror})" if err.strerror else str(err)

    if len(paths) <= 2:  # a station's or a service's one image: threads would cost more than they save
        results = [one(p) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(one, paths))
    return [sha for sha, _ in results], {i: why for i, (_, why) in enumerate(results) if why is not None}

def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and float images are rescaled by their own range, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            arr = arr / 65535.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        gray = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on white: transparent pixels of a product photo are background, and black would look like a defect.
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB
    return im


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``path`` fully into an RGB image, applying its EXIF orientation. Raises :class:`BadImage`."""
    path = Path(path)
    why = not_a_regular_file(path)  # before the size: some file systems report 0 bytes for a directory
    if why is not None:
        raise BadImage(path, why)
    if path.stat().st_size == 0:
        raise BadImage(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise BadImage(path, f"{w}x{h} pixels is over the limit of {max_pixels:,}")
                if w == 0 or h == 0:
                    raise BadImage(path, "image has zero width or height")
                im.load()  # forces a full decode, so truncation is caught here and not later
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(path, "not an image (unknown or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(path, f"too many pixels ({err})") from None
    except OSError as err:
        msg = str(err)
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            raise BadImage(path, f"truncated or corrupt image data ({msg})") from None
        raise BadImage(path, f"cannot decode ({msg})") from None
    except (ValueError, SyntaxError, TypeError, MemoryError, IndexError, struct.error) as err:
        raise BadImage(path, f"corrupt image ({type(err).__name__}: {err})") from None


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def iter_image_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (recursively) into a sorted, de-duplicated list of image paths.

    A path given explicitly is kept whatever it is (so a bad file, a FIFO or a symlink loop named by the user is
    reported as a skip with its reason, not ignored and not opened); so is every entry with an image suffix found
    by walking a directory, regular file or not, so that nothing vanishes from a batch without a skip line. Only a
    path that does not exist at all stops the run, before any work.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if is_image_path(q)))
        elif os.path.lexists(p):
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    seen: set[str] = set()
    unique = []
    for p in found:
        try:
            key = str(p.resolve())
        except (OSError, RuntimeError):  # a symlink loop: keep it, load_image reports it
            key = str(p.absolute())
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def describe_skips(skipped: Sequence[Skipped]) -> str:
    if not skipped:
        return "no files skipped"
    return f"{len(skipped)} file(s) skipped"
