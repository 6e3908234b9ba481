"""What the inspection service does, independent of HTTP: projects, exemplars, fits in a background worker, model
versions, predictions with their audit trail, the review loop and tokens.

It is a thin layer over the task functions the command line uses (``tasks.fewshot.fit`` / ``predict`` / ``update``,
``tasks.anomaly.fit_anomaly`` / ``score_files`` / ``update``): the service adds storage, not a second
implementation. One service process owns a store: jobs it finds running at start were interrupted and are marked
failed.
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..io.atomic import remove_stale_temp_files_under
from . import store
from .blobs import Blobs
from .common import ServiceError, Settings
from .jobs import Jobs
from .models import Models
from .monitoring import Monitoring
from .predictions import Predictions
from .projects import Projects
from .reviews import Reviews
from .store import Job
from .tokens import Tokens

__all__ = ["Service", "ServiceError", "Settings"]  # the settings and the error live in common.py


class Service(Tokens, Projects, Jobs, Models, Predictions, Reviews, Monitoring):
    """The service: its store, worker and caches here; each resource's methods in its own module (tokens.py,
    projects.py, jobs.py, models.py, predictions.py, reviews.py, monitoring.py)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.blobs = Blobs(settings.data_dir)
        store.migrate(settings.db_url)
        self.engine = store.create(settings.db_url)
        self.Session = store.sessions(self.engine)
        self._models: dict[tuple[int, int], Any] = {}
        self._backbones: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._project_locks: dict[int, threading.Lock] = {}
        self._watchers: dict[tuple[int, int], dict] = {}  # the drift monitor per model version (monitoring.py)
        self._watch_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._running_job: str | None = None
        self._started = False
        # who runs a job (jobs.owner): replicas on one PostgreSQL database tell each other's jobs apart by it
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        # Every prediction and incremental update runs on this one thread. OpenMP keeps a team of threads per
        # thread that calls into torch; once the teams hold more threads than there are cores, libgomp stops
        # spinning between parallel regions, and a ViT-B/32 forward took 68 ms from a pool of request threads
        # against 53 ms from one thread (2 cores). Fit and update jobs run on a thread of their own that ends with
        # the job.
        self._inference_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewvision-inference")

    # --- life cycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._mark_interrupted(self._abandoned())
        self._started = True
        # what a killed writer left (a heat map is written once: its temp file would stay); on a shared folder a
        # writer may be another machine's, whose pid says nothing here: there only files an hour old go
        min_age = 0.0 if self.settings.db_url.startswith("sqlite") else 3600.0
        for folder in ("images", "models", "heatmaps"):
            remove_stale_temp_files_under(self.blobs.root / folder, min_age)
        if self.settings.worker and self._worker is None:
            self._worker = threading.Thread(target=self._work, name="fewvision-fit-worker", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            # A fit can run for minutes: the service stops now and says so on the job's row (its model file, written
            # by temp file + rename, is never half there).
            self._worker.join(timeout=5)
            running = self._running_job
            if self._worker.is_alive() and running is not None:
                self._mark_interrupted(Job.id == running)
        self._inference_pool.shutdown(wait=True)
        self.engine.dispose()

    def _on_inference_thread(self, fn, *args):
        if threading.current_thread().name.startswith("fewvision-inference"):
            return fn(*args)
        return self._inference_pool.submit(fn, *args).result()

    def _project_lock(self, project_id: int) -> threading.Lock:
        with self._lock:
            return self._project_locks.setdefault(project_id, threading.Lock())
