"""The hot folder: which files are complete, in what order, and under what stable id each is judged.

A file is complete when it ends with its format's end marker (PNG's IEND chunk, JPEG's EOI: the writer has
written the last byte) or, for any format, when its size and modification time have not changed for ``settle_s``
as seen by this station (its own clock: a share's clock may differ). Dot-files and temp names (``.tmp``,
``.part``, ``.partial``, ``.crdownload``, ``.filepart``, ``~``) are never read: cameras that write a temp name and
rename it are seen at the rename.

The file system's events (watchdog: inotify on Linux, ReadDirectoryChanges on Windows) wake the station as soon as
a file lands; a full scan every ``scan_s`` catches what events miss (network shares send none).

A file's id is derived from the station, its name, size and modification time: the same file found again after a
crash gets the same id, which is how the station knows it was already judged.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..io.images import IMAGE_SUFFIXES
from .config import SourceConfig

TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".filepart", "~")
END_MARKERS = {".png": b"IEND\xaeB`\x82", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}
ID_NAMESPACE = uuid.UUID("5f0c2a8e-6c55-4d1b-9a63-0d7f3c1e9b21")


def verdict_id(station: str, name: str, size: int, mtime_ns: int) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"{station}\x00{name}\x00{size}\x00{mtime_ns}"))


@dataclass
class Arrival:
    """A complete file handed to the station: ``complete_at`` (time.time()) is when the station found it so."""

    path: Path
    size: int
    mtime_ns: int
    id: str
    complete_at: float
    settled: bool  # complete by the quiet interval, not only by its end marker

    @property
    def name(self) -> str:
        return self.path.name


def has_end_marker(path: Path) -> bool:
    marker = END_MARKERS.get(path.suffix.lower())
    if marker is None:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < len(marker) + 8:
                return False
            f.seek(size - 16)
            tail = f.read(16)
    except OSError:
        return False
    # a JPEG may carry a few padding bytes after EOI
    return tail.endswith(marker) or (marker == b"\xff\xd9" and marker in tail[-6:])


class HotFolder:
    def __init__(self, config: SourceConfig, station: str):
        self.config, self.station = config, station
        self.folder = config.folder
        self._pattern = config.pattern.lower() if config.pattern else None
        # name -> (size, mtime_ns, when this station last saw it change, whether its end marker may be trusted)
        self._waiting: dict[str, tuple[int, int, float, bool]] = {}
        self._handed: set[str] = set()  # handed out, not yet done or given back
        self._done: dict[str, tuple[int, int]] = {}  # judged files still in the folder (no 'after' move)
        self._touched: set[str] = set()
        self._touched_lock = threading.Lock()
        self._wake = threading.Event()
        self._last_scan = -1e9
        self._observer = None

    # --- what counts ----------------------------------------------------------------------------------------
    def wanted(self, name: str) -> bool:
        low = name.lower()
        if name.startswith(".") or low.endswith(TEMP_SUFFIXES):
            return False
        if self._pattern:
            return fnmatch.fnmatchcase(low, self._pattern)
        return os.path.splitext(low)[1] in IMAGE_SUFFIXES

    # --- events ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            folder = self

            class _Handler(FileSystemEventHandler):
                def on_any_event(self, event):
                    for p in (getattr(event, "src_path", None), getattr(event, "dest_path", None)):
                        if p:
                            folder._touch(os.path.basename(os.fsdecode(p)))

            observer = Observer()
            observer.schedule(_Handler(), str(self.folder), recursive=False)
            observer.daemon = True
            observer.start()
            self._observer = observer
        except Exception:  # noqa: BLE001 - no events on this file system: the periodic scan does the work
            self._observer = None

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _touch(self, name: str) -> None:
        with self._touched_lock:
            self._touched.add(name)
        self._wake.set()

    def wait(self, timeout: float) -> None:
        """Until a file event, or ``timeout`` seconds (capped by the next scan or settle check due)."""
        if self._waiting:
            timeout = min(timeout, self.config.settle_s / 4)
        timeout = max(0.0, min(timeout, self._last_scan + self.config.scan_s - time.monotonic()))
        self._wake.wait(timeout)
        self._wake.clear()

    # --- the folder ------------------------------------------------------------------------------------------
    def _look(self, name: str, now: float) -> None:
        """Update what is known of one file from its current stat."""
        if name in self._handed or not self.wanted(name):
            return
        path = self.folder / name
        try:
            st = path.stat()
        except OSError:
            self._waiting.pop(name, None)
            self._done.pop(name, None)
            return
        if not os.path.isfile(path):
            return
        key = (st.st_size, st.st_mtime_ns)
        if self._done.get(name) == key:
            return
        self._done.pop(name, None)
        seen = self._waiting.get(name)
        if seen is None or seen[:2] != key:
            self._waiting[name] = (*key, now, True)

    def _scan(self, now: float) -> None:
        present = set()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                present.add(entry.name)
                self._look(entry.name, now)
        for gone in [n for n in self._waiting if n not in present]:
            del self._waiting[gone]
        for gone in [n for n in self._done if n not in present]:
            del self._done[gone]
        self._last_scan = now

    def ready(self) -> list[Arrival]:
        """Complete files not handed out yet, oldest first; each is handed out once (until :meth:`done` or
        :meth:`again`)."""
        now = time.monotonic()
        with self._touched_lock:
            touched, self._touched = self._touched, set()
        if now - self._last_scan >= self.config.scan_s:
            self._scan(now)
        else:
            for name in touched:
                self._look(name, now)
        out = []
        wall = time.time()
        for name, (size, mtime_ns, changed, marker) in list(self._waiting.items()):
            path = self.folder / name
            settled = now - changed >= self.config.settle_s
            if settled or (marker and has_end_marker(path)):
                if not settled:  # the marker may be read before the stat moved: look once more
                    try:
                        st = path.stat()
                    except OSError:
                        continue
                    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                        self._waiting[name] = (st.st_size, st.st_mtime_ns, now, True)
                        continue
                del self._waiting[name]
                self._handed.add(name)
                out.append(Arrival(path, size, mtime_ns, verdict_id(self.station, name, size, mtime_ns), wall,
                                   settled))
        out.sort(key=lambda a: (a.mtime_ns, a.name))
        return out

    def done(self, arrival: Arrival, still_here: bool) -> None:
        """The file is judged; ``still_here``: it stays in the folder (no 'after' folder for its verdict)."""
        self._handed.discard(arrival.name)
        if still_here:
            self._done[arrival.name] = (arrival.size, arrival.mtime_ns)

    def again(self, arrival: Arrival) -> None:
        """Not judged now (it ended with its marker yet did not decode): judged once it has settled, whatever its
        end says (a change to the file makes it new again)."""
        self._handed.discard(arrival.name)
        self._waiting[arrival.name] = (arrival.size, arrival.mtime_ns, time.monotonic(), False)

    def part_id(self, name: str) -> str:
        stem = os.path.splitext(name)[0]
        regex = self.config.part_id
        if regex is None:
            return stem
        m = regex.search(name)
        if m is None:
            return stem
        if "part" in regex.groupindex and m.group("part") is not None:
            return m.group("part")
        return m.group(1) if regex.groups else m.group(0)
