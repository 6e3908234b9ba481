"""On-disk feature cache: one SQLite database per backbone id, rows keyed by (image sha256, view id).

Why SQLite: it ships with Python, a write is one transaction (a kill -9 mid-write rolls back on the next open, so a
partial entry is never read back), several processes can read and write one file at once (WAL mode, with a busy
timeout instead of errors), and thousands of small rows cost one file instead of thousands. Vectors are stored as
raw little-endian bytes with their dtype and shape, read back with ``numpy.frombuffer``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ..io.paths import features_dir

BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    sha256 TEXT NOT NULL,
    view TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (sha256, view)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

Key = tuple[str, str]  # (image sha256, view id)


class SqliteStore:
    """One SQLite file shared by threads and processes: a connection per thread (and per process after a fork),
    WAL journal, a busy timeout instead of lock errors, and writes that are single transactions."""

    schema = ""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            self._local.conn, self._local.pid = conn, os.getpid()
            self._opened(conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        # Switching to WAL can report "database is locked" at once, without waiting for the busy timeout, while
        # another process creates or recovers the same file (seen with two writers starting together): retry.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(self.schema)
                return conn
            except sqlite3.OperationalError as err:
                conn.close()
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _opened(self, conn: sqlite3.Connection) -> None:
        """Hook for one-off set-up of a new connection."""

    def _write(self, sql: str, rows: list[tuple]) -> None:
        """``executemany`` in one transaction: either every row is written or none is."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class FeatureCache(SqliteStore):
    """Features of one backbone. ``get_many``/``put_many`` work on ``{(sha256, view): array}``."""

    schema = _SCHEMA

    def __init__(self, backbone_id: str, root: str | os.PathLike | None = None):
        super().__init__(features_dir(root) / f"{backbone_id}.sqlite")
        self.backbone_id = backbone_id

    def _opened(self, conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('backbone_id', ?)", (self.backbone_id,))

    def get_many(self, keys: Iterable[Key]) -> dict[Key, np.ndarray]:
        keys = list(keys)
        found: dict[Key, np.ndarray] = {}
        conn = self._conn()
        by_view: dict[str, list[str]] = {}
        for sha, view in keys:
            by_view.setdefault(view, []).append(sha)
        for view, shas in by_view.items():
            for start in range(0, len(shas), 500):
                chunk = shas[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT sha256, dtype, shape, data FROM features WHERE view = ? AND sha256 IN ({marks})",
                    [view, *chunk],
                )
                for sha, dtype, shape, data in rows:
                    dims = tuple(int(d) for d in shape.split(",") if d)
                    found[(sha, view)] = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(dims)
        return found

    def put_many(self, items: Mapping[Key, np.ndarray]) -> None:
        """Store all items in one transaction: either every row is written or none is."""
        if not items:
            return
        rows = []
        for (sha, view), arr in items.items():
            arr = np.ascontiguousarray(arr)
            rows.append((sha, view, arr.dtype.str, ",".join(map(str, arr.shape)), arr.tobytes()))
        self._write("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM features").fetchone()[0]

class NullCache:
    """Used with ``--no-cache``: remembers nothing."""

    backbone_id = ""

    def get_many(self, keys: Iterable[Key]) -> dict[Key, np.ndarray]:
        return {}

    def put_many(self, items: Mapping[Key, np.ndarray]) -> None:
        return None

    def __len__(self) -> int:
        return 0


def open_cache(backbone_id: str, root: str | os.PathLike | None = None, enabled: bool = True):
    return FeatureCache(backbone_id, root) if enabled else NullCache()


def cache_path(backbone_id: str, root: str | os.PathLike | None = None) -> Path:
    return features_dir(root) / f"{backbone_id}.sqlite"
