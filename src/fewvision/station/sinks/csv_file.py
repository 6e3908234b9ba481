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
        self._file = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def send(self, message: dict) -> None:
        if message.get("kind", "verdict") != "verdict":
            return
        buf = io.StringIO()
        writer = csv.writer(buf)
        new = not self.path.exists() or self.path.stat().st_size == 0
        if new:
            writer.writerow(COLUMNS)
        writer.writerow([json.dumps(message.get(c), sort_keys=True) if c in JSON_COLUMNS and message.get(c) is not None
                         else ("" if message.get(c) is None else message.get(c)) for c in COLUMNS])
        # one write of whole rows (a row may repeat after a restart: delivery is at least once, and the id column
        # tells repeats apart); on disk at the next flush, before the station's cursor moves past it
        if self._file is not None and not self.path.exists():  # moved away (rotated): a new file, with its header
            self.close()
        if self._file is None:
            self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._file.write(buf.getvalue())
        self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
