"""The hot folder: which files are complete, in what order, and under what stable id each is judged.

A file is complete when it ends with its format's end marker (PNG's IEND chunk, JPEG's EOI: the writer has
written the last byte) or, for any format, when its size and modification time have not changed for ``settle_s``
as seen by this station (its own clock: a share's clock may differ). Dot-files and temp names (``.tmp``,
``.part``, ``.partial``, ``.crdownload``, ``.filepart``, ``~``) are never read: cameras that write a temp name and
rename it are seen at the rename.

The folder is polled: its names every ``poll_s`` (default 5 ms: an empty folder's listing costs microseconds, and
the wait after a file lands is half that on average), a full look at every file's size and time every ``scan_s``.
Polling works the same on local disks and network shares (SMB, NFS send no change events), and file system events
were no faster in practice: watchdog's inotify reader holds every event for 0.5 s after a file is moved out of the
folder (waiting for the other half of a rename), which a station moving each judged file would hit every time.

A file's id is derived from the station, its name, size and modification time: the same file found again after a
crash gets the same id, which is how the station knows it was already judged.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..io.images import IMAGE_SUFFIXES
from .config import SourceConfig

TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".filepart", "~")
END_MARKERS = {".png": b"IEND\xaeB`\x82", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}
log = logging.getLogger("fewvision.station")
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
    found_at_start: bool  # in the folder when the station started: it may have been judged before a crash

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
        self._last_scan = -1e9
        self._unreachable = False
        self._at_start: set[str] | None = None  # the names of the first scan, until each is handed out

    # --- what counts ----------------------------------------------------------------------------------------
    def wanted(self, name: str) -> bool:
        low = name.lower()
        if name.startswith(".") or low.endswith(TEMP_SUFFIXES):
            return False
        if self._pattern:
            return fnmatch.fnmatchcase(low, self._pattern)
        return os.path.splitext(low)[1] in IMAGE_SUFFIXES

    # --- polling -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def waiting(self) -> int:
        """Files seen and not complete yet."""
        return len(self._waiting)

    def wait(self, timeout: float) -> None:
        """Until the next look at the folder is due (at most ``timeout`` seconds)."""
        time.sleep(max(0.0, min(timeout, self.config.poll_s, self._last_scan + self.config.scan_s - time.monotonic())))

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
        if self._at_start is None:
            self._at_start = present
        self._last_scan = now

    def ready(self) -> list[Arrival]:
        """Complete files not handed out yet, oldest first; each is handed out once (until :meth:`done` or
        :meth:`again`)."""
        now = time.monotonic()
        try:
            if self._at_start is None or now - self._last_scan >= self.config.scan_s:
                self._scan(now)
            else:  # new names only (and the files still waiting): a listing, no stat of the files already known
                with os.scandir(self.folder) as entries:
                    for entry in entries:
                        if entry.name not in self._waiting and entry.name not in self._done:
                            self._look(entry.name, now)
                for name in list(self._waiting):
                    self._look(name, now)
        except OSError as err:  # a share that went away: say so once, look again until it is back
            if not self._unreachable:
                log.error("cannot list %s (%s); looking again every %.1f s", self.folder,
                          err.strerror or err, self.config.scan_s)
            self._unreachable = True
            self._last_scan = now
            return []
        if self._unreachable:
            log.info("%s is readable again", self.folder)
            self._unreachable = False
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
                at_start = name in self._at_start
                if at_start:
                    self._at_start.discard(name)
                out.append(Arrival(path, size, mtime_ns, verdict_id(self.station, name, size, mtime_ns), wall,
                                   settled, at_start))
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
