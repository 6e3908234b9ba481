"""What every part of the service shares: its settings, the error a client is answered with, and the checks and
constants of more than one resource."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import store
from .blobs import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

TASKS = ("classification", "anomaly")
DEFAULT_METHODS = {"classification": "prototype", "anomaly": "patchcore"}
# a verdict (tasks.verdicts: ok / ng / review / error) as the store's and the API's decision
DECISIONS = {"ok": "accept", "ng": "reject", "review": "review", "error": "error"}
VERDICT_OF = {decision: verdict for verdict, decision in DECISIONS.items()}
ANOMALY_LABELS = ("good", "defect")
MAX_BATCH = 64


class ServiceError(Exception):
    """An error answered to the client: HTTP ``status``, a stable ``code`` and a one-line ``message``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def not_found(what: str, key: Any) -> ServiceError:
    return ServiceError(404, "not_found", f"no {what} {key}")


@dataclass
class Settings:
    data_dir: Path
    db_url: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_BYTES
    max_request_bytes: int = 100 * 1024 * 1024  # a whole request (a batch of images), refused while it is read
    max_pixels: int = DEFAULT_MAX_PIXELS
    heatmap_max_side: int = 1024  # heat maps are drawn at most this many pixels a side, whatever the image's size
    cors_origins: list[str] = field(default_factory=list)
    worker: bool = True  # run fits in a background thread (tests of the API alone may turn it off)

    def __post_init__(self):
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if self.db_url is None and self.data_dir.is_file():  # a station's store file: its folder holds the data
            self.db_url = f"sqlite:///{self.data_dir}"
            self.data_dir = self.data_dir.parent
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db_url = store.database_url(self.data_dir, self.db_url)

    @property
    def cache_dir(self) -> str:
        return str(self.data_dir / "cache")


def policy_of(params: dict):
    """How the project's parameters decide a prediction (:class:`fewvision.tasks.verdicts.Policy`)."""
    from ..tasks.verdicts import Policy

    return Policy(review_band=float(params.get("review_band", 0)), abstain=params.get("abstain"),
                  review_threshold=params.get("review_threshold"), accept=list(params.get("accept_classes") or []))


def check_text(value: Any, what: str) -> None:
    """Refuse NUL characters anywhere in a client's text or JSON: PostgreSQL cannot store them in text columns."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ServiceError(422, "invalid", f"{what} contains a NUL character")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, what)
            check_text(v, what)
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_text(v, what)


def read_uploads(files: Iterable) -> list[tuple[bytes, str]]:
    return [(f.file.read(), f.filename or "") for f in files]
