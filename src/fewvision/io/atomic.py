"""Writing files so that a crash or kill never leaves half a file: write a temp file beside it, then rename.

The temp file is ``.NAME.PID.RANDOM.tmp`` in the target's folder. A process killed mid-write leaves its temp file
behind; the next write of the same target removes those whose process is gone, so they do not pile up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Temp files of ``path`` left by writers that died (their pid is gone); returns what was removed."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def remove_stale_temp_files_under(folder: Path, min_age_s: float = 0.0) -> list[Path]:
    """Temp files anywhere under ``folder`` whose writer's pid is gone and that were last written at least
    ``min_age_s`` ago: those of targets never written again (a heat map is written once) would stay for ever.
    A pid says nothing about a writer on another machine (a shared folder): there the age has to."""
    import time

    removed = []
    for tmp in Path(folder).rglob(".*.tmp"):
        pid = tmp.name[:-len(".tmp")].rsplit(".", 2)[-2] if tmp.name.count(".") >= 4 else ""
        try:
            old = time.time() - tmp.stat().st_mtime >= min_age_s
        except OSError:
            continue
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) and old:
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    The result gets the usual permissions (0666 less the umask) even when the writer replaced the temp file with
    one of its own (safetensors does, with 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open`` for writing, atomically; text mode defaults to UTF-8, and a file name that is not valid UTF-8
    (held by Python as lone surrogates) is written back as its original bytes, not refused."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
        kwargs.setdefault("errors", "surrogateescape")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)
