"""On-disk cache of LMM answers: one SQLite database under the cache root, rows keyed by (image sha256, model, prompt).

The pattern of :mod:`fewvision.cache`: a write is one transaction (a kill -9 mid-write rolls back on the next open),
WAL mode lets several processes share the file, a busy timeout waits instead of failing. Only answers that came
back from the model are stored (usable ones and refusals, which are deterministic at temperature 0); transport
failures (timeouts, HTTP errors, malformed responses) are not, so the next run asks again.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from ..paths import cache_dir

BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (sha256, model, prompt)
) WITHOUT ROWID;
"""


def answers_path(root: str | os.PathLike | None = None) -> Path:
    return cache_dir(root) / "lmm" / "answers.sqlite"


class AnswerCache:
    """``get(sha, model, prompt) -> str | None`` and ``put(sha, model, prompt, answer)``; safe across threads."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.path = answers_path(root)
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def get(self, sha256: str, model: str, prompt: str) -> str | None:
        row = self._conn().execute(
            "SELECT answer FROM answers WHERE sha256 = ? AND model = ? AND prompt = ?", (sha256, model, prompt)
        ).fetchone()
        return None if row is None else row[0]

    def put(self, sha256: str, model: str, prompt: str, answer: str) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                         (sha256, model, prompt, answer, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class NullAnswerCache:
    """Used with ``--no-cache``: remembers nothing."""

    def get(self, sha256: str, model: str, prompt: str) -> str | None:
        return None

    def put(self, sha256: str, model: str, prompt: str, answer: str) -> None:
        return None

    def __len__(self) -> int:
        return 0


def open_answer_cache(root: str | os.PathLike | None = None, enabled: bool = True):
    return AnswerCache(root) if enabled else NullAnswerCache()
