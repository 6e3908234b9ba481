"""On-disk cache of LMM answers: one SQLite database under the cache root, rows keyed by (image sha256, model, prompt).

The pattern of :mod:`fewvision.features.cache`: a write is one transaction (a kill -9 mid-write rolls back on the next open),
WAL mode lets several processes share the file, a busy timeout waits instead of failing. Only answers that came
back from the model are stored (usable ones and refusals, which are deterministic at temperature 0); transport
failures (timeouts, HTTP errors, malformed responses) are not, so the next run asks again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..features.cache import SqliteStore
from ..io.paths import cache_dir

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


class AnswerCache(SqliteStore):
    """``get(sha, model, prompt) -> str | None`` and ``put(sha, model, prompt, answer)``; safe across threads."""

    schema = _SCHEMA

    def __init__(self, root: str | os.PathLike | None = None):
        super().__init__(answers_path(root))

    def get(self, sha256: str, model: str, prompt: str) -> str | None:
        row = self._conn().execute(
            "SELECT answer FROM answers WHERE sha256 = ? AND model = ? AND prompt = ?", (sha256, model, prompt)
        ).fetchone()
        return None if row is None else row[0]

    def put(self, sha256: str, model: str, prompt: str, answer: str) -> None:
        self._write("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                    [(sha256, model, prompt, answer, time.time())])

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM answers").fetchone()[0]

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
