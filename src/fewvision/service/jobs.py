"""Fit and update jobs: queued on the store, claimed and run by the background worker, progress on their row."""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from ..io.atomic import pid_alive
from . import store
from .common import ServiceError, not_found
from .store import Exemplar, Job, Project, utcnow


HEARTBEAT_S = 2.0  # a running job's row is touched this often by the process that runs it
STALE_S = 30.0  # a running job not touched for this long lost its process (clocks of replicas kept in sync: NTP)


class Jobs:
    """Methods of :class:`~fewvision.service.core.Service` for its jobs."""

    def start_fit(self, project_id: int) -> dict:
        project = self.project(project_id)
        counts = project["exemplars"]
        if project["task"] == "anomaly" and counts.get("good", 0) < 3:
            raise ServiceError(409, "not_enough_images", "an anomaly fit needs at least 3 good images")
        if project["task"] == "classification":
            missing = [c["name"] for c in project["classes"] if counts.get(c["name"], 0) < 1]
            if missing:
                raise ServiceError(409, "not_enough_images", f"no exemplars yet for class(es) {', '.join(missing)}")
        return self._queue_job(project_id, "fit")

    def _queue_job(self, project_id: int, kind: str) -> dict:
        with self.Session.begin() as s:
            row = Job(id=str(uuid.uuid4()), project_id=project_id, kind=kind, state="queued", progress=0.0)
            s.add(row)
            s.flush()
            out = self._job_dict(row)
        self._wake.set()
        return out

    @staticmethod
    def _job_dict(row: Job) -> dict:
        out = store.as_dict(row, ["id", "project_id", "kind", "state", "progress", "error", "model_version",
                                  "created_at", "started_at", "finished_at"])
        return {"job_id": out["id"], **out}

    def job(self, job_id: str) -> dict:
        try:
            job_id = str(uuid.UUID(job_id))
        except ValueError:
            raise not_found("job", job_id) from None
        with self.Session() as s:
            row = s.get(Job, job_id)
            if row is None:
                raise not_found("job", job_id)
            return self._job_dict(row)

    def _claim(self) -> str | None:
        """The oldest queued job, now running here. With replicas on PostgreSQL each takes a different one: the row
        is locked while it is claimed and the others skip it (``FOR UPDATE SKIP LOCKED``)."""
        with self.Session.begin() as s:
            job_id = s.scalars(select(Job.id).where(Job.state == "queued").order_by(Job.created_at).limit(1)
                               .with_for_update(skip_locked=True)).first()
            if job_id is None:
                return None
            now = utcnow()
            claimed = s.execute(update(Job).where(Job.id == job_id, Job.state == "queued")
                                .values(state="running", started_at=now, owner=self.replica, heartbeat_at=now))
            return job_id if claimed.rowcount == 1 else None

    def _work(self) -> None:
        last_sweep = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_sweep > HEARTBEAT_S:
                self._mark_interrupted(self._abandoned())  # a replica that died with a job
                last_sweep = time.monotonic()
            job_id = self._claim()
            if job_id is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            # a thread per job: its OpenMP team ends with it (see _inference_pool)
            job = threading.Thread(target=self.run_job, args=(job_id,), name=f"fewvision-job-{job_id}", daemon=True)
            self._running_job = job_id
            job.start()
            while job.is_alive():
                job.join(timeout=HEARTBEAT_S)
                with self.Session.begin() as s:  # alive: no other replica takes this job for abandoned
                    s.execute(update(Job).where(Job.id == job_id, Job.state == "running")
                              .values(heartbeat_at=utcnow()))
            self._running_job = None

    def _abandoned(self):
        """Running jobs whose process is gone: on this machine, one whose process id is no longer alive; anywhere,
        one not heard of for STALE_S (its replica stopped or lost the database). A SQLite store has one owner, so
        every running job it finds at start was interrupted."""
        if self.settings.db_url.startswith("sqlite") and not self._started:
            return Job.state == "running"
        host = self.replica.rsplit(":", 1)[0]
        with self.Session() as s:
            owners = s.scalars(select(Job.owner).where(Job.state == "running").distinct()).all()
        dead_here = [o for o in owners if o and o.rsplit(":", 1)[0] == host and o != self.replica
                     and not pid_alive(int(o.rsplit(":", 1)[1]))]
        stale = utcnow() - timedelta(seconds=STALE_S)
        return (Job.state == "running") & (Job.owner.in_(dead_here) | Job.heartbeat_at.is_(None) |
                                           (Job.heartbeat_at < stale))

    def run_job(self, job_id: str) -> None:
        try:
            with self.Session() as s:
                kind = s.get(Job, job_id).kind
            version = self._fit(job_id) if kind == "fit" else self._update(job_id)
        except Exception as err:  # noqa: BLE001 - a failed job is reported on its row, never kills the worker
            message = " ".join(str(err).split()) or type(err).__name__
            with self.Session.begin() as s:
                s.execute(update(Job).where(Job.id == job_id).values(
                    state="failed", error=f"{type(err).__name__}: {message}"[:2000], finished_at=utcnow()))
            traceback.print_exc()
            return
        with self.Session.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(state="done", progress=1.0, model_version=version,
                                                                 finished_at=utcnow()))

    def _fit(self, job_id: str) -> int:
        from .. import progress

        with self.Session() as s:
            job = s.get(Job, job_id)
            project = s.get(Project, job.project_id)
            exemplars = s.scalars(select(Exemplar).where(Exemplar.project_id == project.id)
                                  .order_by(Exemplar.id)).all()
            project_id, task, method = project.id, project.task, project.method
            backbone, params, classes = project.backbone, dict(project.params), list(project.classes)
        paths = [str(self.blobs.image_path(e.sha256)) for e in exemplars]
        labels = [e.label for e in exemplars]
        reporter = _JobProgress(self, job_id)
        bb = self.backbone(backbone)
        with progress.job(f"fit {job_id}", enabled=False) as bar:
            reporter.attach(bar)
            if task == "anomaly":
                from ..tasks.anomaly import fit_anomaly

                fit_params = {k: v for k, v in params.items() if k not in ("review_band",)}
                target = fit_params.pop("target_false_reject", 0.01)
                model = fit_anomaly(paths, method, bb, target_false_reject=float(target),
                                    cache_dir=self.settings.cache_dir, progress=True, **fit_params)
            else:
                from ..prompts import ClassSpec
                from ..tasks.fewshot import fit

                fit_params = {k: v for k, v in params.items()
                              if k not in ("review_threshold", "abstain", "accept_classes")}
                if method == "zeroshot":  # the project's class descriptions are its prompts
                    fit_params["classes"] = [ClassSpec(c["name"], descriptions=[c["description"]] if c["description"]
                                                       else []) for c in classes]
                model = fit(paths, method, bb, labels=labels, cache_dir=self.settings.cache_dir, progress=True,
                            **fit_params)
        return self._save_version(project_id, model, origin=f"fit ({job_id})")

    def _update(self, job_id: str) -> int | None:
        """An update job: the active model with the project's exemplars it has not seen added without a refit (the
        heads of :meth:`can_update`), as a new version; the project still wants a refit to recalibrate."""
        with self.Session() as s:
            project_id = s.get(Job, job_id).project_id
        project = self.project(project_id)
        version = project["active_version"]
        if version is None:
            raise ValueError("the project has no model to update; fit it first")
        model = self.load_model(project["id"], version)
        seen = set(model.info.get("fitted_on_sha256", []))
        new = [e for e in self.exemplars(project["id"]) if e["sha256"] not in seen]
        if project["task"] == "anomaly":
            new = [e for e in new if e["label"] == "good"]
        if not new:
            return version  # a fit or an earlier update took them in already
        paths = [str(self.blobs.image_path(e["sha256"])) for e in new]
        if project["task"] == "anomaly":
            from ..tasks.anomaly import update

            updated = update(model, paths, cache_dir=self.settings.cache_dir)
        else:
            from ..tasks.fewshot import update

            updated = update(model, paths, [e["label"] for e in new], cache_dir=self.settings.cache_dir)
        labels = ", ".join(sorted({e["label"] for e in new}))
        reviewed = sum(e["source"] == "review" for e in new)
        version = self._save_version(project["id"], updated, origin=f"update: +{len(new)} image(s), {reviewed} "
                                                                    f"reviewed, {len(new) - reviewed} uploaded ({labels})")
        with self.Session.begin() as s:
            s.get(Project, project["id"]).needs_refit = True  # a full refit would still recalibrate
        return version

    def _mark_interrupted(self, which) -> None:
        with self.Session.begin() as s:
            s.execute(update(Job).where(which, Job.state == "running").values(
                state="failed", finished_at=utcnow(),
                error="interrupted: the service stopped while this job ran; start the fit again"))


class _JobProgress:
    """Writes a running fit's progress to its job row (at most every half second)."""

    def __init__(self, service: Any, job_id: str):
        self.service, self.job_id, self.last = service, job_id, 0.0

    def attach(self, bar) -> None:
        advance = bar.advance

        def counted(n: int = 1) -> None:
            advance(n)
            now = time.monotonic()
            if bar.total and now - self.last > 0.5:
                self.last = now
                with self.service.Session.begin() as s:
                    s.execute(update(Job).where(Job.id == self.job_id)
                              .values(progress=min(0.99, bar.done / bar.total)))

        bar.advance = counted
