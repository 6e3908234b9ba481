"""CSV sink: one row per message appended to a file (and flushed to disk before it counts as delivered)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .base import known_options

# the anomaly columns last: a reader of a file begun before they existed still finds every column by its header
COLUMNS = ["id", "time", "station", "part_id", "path", "verdict", "label", "score", "threshold", "reason",
           "latency_ms", "model_sha256", "probabilities", "x", "y", "n_regions", "largest_region_px",
           "largest_region_pct", "regions"]
JSON_COLUMNS = ("probabilities", "regions")


def check_options(options: dict, base: Path) -> dict:
    known_options(options, {"path"})
    value = options.get("path")
    if not isinstance(value, str) or not value.strip():
        raise ValueError("path: expected the CSV file to append to")
    p = Path(os.path.expandvars(value)).expanduser()
    return {"path": p if p.is_absolute() else base / p}


class CsvSink:
    """A row per verdict (other messages, such as alarms, are not rows of this table and are passed over)."""

    def __init__(self, name: str, options: dict, station: str, context: dict):
        self.name, self.path = name, Path(options["path"])
        self._file, self._columns = None, COLUMNS

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def send(self, message: dict) -> None:
        if message.get("kind", "verdict") != "verdict":
            return
        if self._file is not None and not self.path.exists():  # moved away (rotated): a new file, with its header
            self.close()
        buf = io.StringIO()
        writer = csv.writer(buf)
        if self._file is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._columns = COLUMNS if new else self._header()
            if new:
                writer.writerow(COLUMNS)
            self._file = open(self.path, "a", newline="", encoding="utf-8")
        writer.writerow([json.dumps(message.get(c), sort_keys=True) if c in JSON_COLUMNS and message.get(c) is not None
                         else ("" if message.get(c) is None else message.get(c)) for c in self._columns])
        # one write of whole rows (a row may repeat after a restart: delivery is at least once, and the id column
        # tells repeats apart); on disk at the next flush, before the station's cursor moves past it
        self._file.write(buf.getvalue())
        self._file.flush()

    def _header(self) -> list[str]:
        """The columns of the file being appended to: a file begun by an earlier release (fewer columns) keeps its
        own, so every row lines up with its header; a new file gets them all."""
        with open(self.path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
        return header or COLUMNS

    def flush(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
