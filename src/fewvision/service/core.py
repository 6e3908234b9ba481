"""What the inspection service does, independent of HTTP: projects, exemplars, fits in a background worker, model
versions, predictions with their audit trail, the review loop and tokens.

It is a thin layer over the task functions the command line uses (``tasks.fewshot.fit`` / ``predict`` / ``update``,
``tasks.anomaly.fit_anomaly`` / ``score_files`` / ``update``): the service adds storage, not a second
implementation. One service process owns a store: jobs it finds running at start were interrupted and are marked
failed.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from sqlalchemy import func, select, update

from . import store
from .blobs import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Blobs, UploadError, check_image, clean_filename
from .store import Exemplar, Job, ModelVersion, Prediction, Project, Review, Token, utcnow

TASKS = ("classification", "anomaly")
DEFAULT_METHODS = {"classification": "prototype", "anomaly": "patchcore"}
GOOD_NAMES = ("good", "ok", "nominal", "normal", "pass")
ANOMALY_LABELS = ("good", "defect")
JOB_STATES = ("queued", "running", "done", "failed")
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
    max_pixels: int = DEFAULT_MAX_PIXELS
    cors_origins: list[str] = field(default_factory=list)
    worker: bool = True  # run fits in a background thread (tests of the API alone may turn it off)

    def __post_init__(self):
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db_url = store.database_url(self.data_dir, self.db_url)

    @property
    def cache_dir(self) -> str:
        return str(self.data_dir / "cache")


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


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Service:
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
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._running_job: str | None = None
        # Every prediction and incremental update runs on this one thread. OpenMP keeps a team of threads per
        # thread that calls into torch; once the teams hold more threads than there are cores, libgomp stops
        # spinning between parallel regions, and a ViT-B/32 forward took 68 ms from a pool of request threads
        # against 53 ms from one thread (2 cores). Fit and update jobs run on a thread of their own that ends with
        # the job.
        self._inference_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewvision-inference")

    # --- life cycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._mark_interrupted(Job.state == "running")
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

    def _mark_interrupted(self, which) -> None:
        with self.Session.begin() as s:
            s.execute(update(Job).where(which, Job.state == "running").values(
                state="failed", finished_at=utcnow(),
                error="interrupted: the service stopped while this job ran; start the fit again"))

    def _on_inference_thread(self, fn, *args):
        if threading.current_thread().name.startswith("fewvision-inference"):
            return fn(*args)
        return self._inference_pool.submit(fn, *args).result()

    def _project_lock(self, project_id: int) -> threading.Lock:
        with self._lock:
            return self._project_locks.setdefault(project_id, threading.Lock())

    # --- tokens ----------------------------------------------------------------------------------------------
    def create_token(self, name: str, project_id: int | None = None) -> tuple[dict, str]:
        check_text(name, "the token's name")
        if project_id is not None:
            self.project(project_id)
        token = "fv_" + secrets.token_urlsafe(32)
        with self.Session.begin() as s:
            row = Token(name=name or "token", token_hash=hash_token(token), project_id=project_id)
            s.add(row)
            s.flush()
            out = store.as_dict(row, ["id", "name", "project_id", "created_at", "revoked_at"])
        return out, token

    def tokens(self) -> list[dict]:
        with self.Session() as s:
            rows = s.scalars(select(Token).order_by(Token.id)).all()
            return [store.as_dict(r, ["id", "name", "project_id", "created_at", "revoked_at"]) for r in rows]

    def revoke_token(self, token_id: int) -> dict:
        with self.Session.begin() as s:
            row = s.get(Token, token_id)
            if row is None:
                raise not_found("token", token_id)
            row.revoked_at = row.revoked_at or utcnow()
            return store.as_dict(row, ["id", "name", "project_id", "created_at", "revoked_at"])

    def authenticate(self, token: str | None) -> Token:
        if not token:
            raise ServiceError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>' (create "
                                                   "one with 'fewvision tokens create')")
        with self.Session() as s:
            row = s.scalars(select(Token).where(Token.token_hash == hash_token(token))).first()
        if row is None or row.revoked_at is not None:
            raise ServiceError(401, "unauthorized", "unknown or revoked token")
        return row

    @staticmethod
    def allow(token: Token, project_id: int) -> None:
        if token.project_id is not None and token.project_id != project_id:
            raise ServiceError(403, "forbidden", f"this token is limited to project {token.project_id}")

    # --- projects ----------------------------------------------------------------------------------------------
    def create_project(self, name: str, task: str, backbone: str | None = None, method: str | None = None,
                       classes: Sequence[dict] | None = None, params: dict | None = None) -> dict:
        from ..defaults import default_backbone

        for value, what in ((name, "name"), (backbone, "backbone"), (method, "method"), (classes, "classes"),
                            (params, "params")):
            check_text(value, what)
        name = (name or "").strip()
        if not name or len(name) > 200:
            raise ServiceError(422, "invalid", "a project needs a name of 1 to 200 characters")
        if task not in TASKS:
            raise ServiceError(422, "invalid", f"task must be one of {', '.join(TASKS)}, got {task!r}")
        method = method or DEFAULT_METHODS[task]
        backbone = (backbone or default_backbone(task)).strip()
        classes = [{"name": str(c.get("name", "")).strip(), "description": str(c.get("description") or "")}
                   for c in (classes or [])]
        if task == "classification":
            from ..heads import head_names

            if method not in head_names():
                raise ServiceError(422, "invalid", f"unknown method {method!r}: expected one of "
                                                   f"{', '.join(head_names())}")
            names = [c["name"] for c in classes]
            if len(names) < 2 or len(set(names)) != len(names) or not all(names) or "review" in names:
                raise ServiceError(422, "invalid", "a classification project needs at least two classes with "
                                                   "unique, non-empty names (not 'review')")
        else:
            from ..anomaly import anomaly_head_classes

            if method not in anomaly_head_classes():
                raise ServiceError(422, "invalid", f"unknown anomaly method {method!r}: expected one of "
                                                   f"{', '.join(sorted(anomaly_head_classes()))}")
            classes = [{"name": "good", "description": "a good part"}, {"name": "defect", "description": "a defect"}]
        with self.Session.begin() as s:
            if s.scalars(select(Project).where(Project.name == name)).first() is not None:
                raise ServiceError(409, "conflict", f"a project named {name!r} exists")
            row = Project(name=name, task=task, backbone=backbone, method=method, classes=classes,
                          params=dict(params or {}), needs_refit=False)
            s.add(row)
            s.flush()
            return self._project_dict(s, row)

    def _project_dict(self, s, row: Project, counts: bool = True) -> dict:
        out = store.as_dict(row, ["id", "name", "task", "backbone", "method", "classes", "params", "active_version",
                                  "needs_refit", "created_at"])
        if not counts:
            return out
        counts = dict(s.execute(select(Exemplar.label, func.count()).where(Exemplar.project_id == row.id)
                                .group_by(Exemplar.label)).all())
        out["exemplars"] = {k: int(v) for k, v in counts.items()}
        return out

    def projects(self, token: Token | None = None) -> list[dict]:
        with self.Session() as s:
            q = select(Project).order_by(Project.id)
            if token is not None and token.project_id is not None:
                q = q.where(Project.id == token.project_id)
            return [self._project_dict(s, r) for r in s.scalars(q).all()]

    def project(self, project_id: int, counts: bool = True) -> dict:
        """The project; with ``counts`` its exemplar counts per label (a query that predictions do not need)."""
        with self.Session() as s:
            row = s.get(Project, project_id)
            if row is None:
                raise not_found("project", project_id)
            return self._project_dict(s, row, counts)

    # --- exemplars ----------------------------------------------------------------------------------------------
    def add_exemplar(self, project_id: int, data: bytes, filename: str, label: str, source: str = "upload") -> dict:
        project = self.project(project_id)
        label = (label or "").strip()
        allowed = ["good"] if project["task"] == "anomaly" else [c["name"] for c in project["classes"]]
        if label not in allowed:
            raise ServiceError(422, "invalid", f"label must be one of {', '.join(allowed)}, got {label!r}")
        try:
            check_image(data, filename, self.settings.max_upload_bytes, self.settings.max_pixels)
        except UploadError as err:
            raise ServiceError(err.status, "bad_image", str(err)) from None
        sha = self.blobs.put_image(data)  # on disk (temp + rename) before the row that points at it
        with self.Session.begin() as s:
            existing = s.scalars(select(Exemplar).where(Exemplar.project_id == project_id, Exemplar.sha256 == sha,
                                                        Exemplar.label == label)).first()
            row = existing or Exemplar(project_id=project_id, sha256=sha, label=label,
                                       filename=clean_filename(filename), source=source)
            if existing is None:
                s.add(row)
                s.get(Project, project_id).needs_refit = True
            s.flush()
            return store.as_dict(row, ["id", "project_id", "sha256", "label", "filename", "source", "created_at"])

    def exemplars(self, project_id: int) -> list[dict]:
        self.project(project_id)
        with self.Session() as s:
            rows = s.scalars(select(Exemplar).where(Exemplar.project_id == project_id).order_by(Exemplar.id)).all()
            return [store.as_dict(r, ["id", "project_id", "sha256", "label", "filename", "source", "created_at"])
                    for r in rows]

    # --- fits ---------------------------------------------------------------------------------------------------
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
        with self.Session.begin() as s:
            job_id = s.scalars(select(Job.id).where(Job.state == "queued").order_by(Job.created_at).limit(1)).first()
            if job_id is None:
                return None
            claimed = s.execute(update(Job).where(Job.id == job_id, Job.state == "queued")
                                .values(state="running", started_at=utcnow()))
            return job_id if claimed.rowcount == 1 else None

    def _work(self) -> None:
        while not self._stop.is_set():
            job_id = self._claim()
            if job_id is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            # a thread per job: its OpenMP team ends with it (see _inference_pool)
            job = threading.Thread(target=self.run_job, args=(job_id,), name=f"fewvision-job-{job_id}", daemon=True)
            self._running_job = job_id
            job.start()
            job.join()
            self._running_job = None

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
                from ..heads.prompts import ClassSpec
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
        version = self._save_version(project["id"], updated, origin=f"update: +{len(new)} reviewed image(s) ({labels})")
        with self.Session.begin() as s:
            s.get(Project, project["id"]).needs_refit = True  # a full refit would still recalibrate
        return version

    def _save_version(self, project_id: int, model, origin: str) -> int:
        from ..modelfile import save_model

        with self._project_lock(project_id):
            with self.Session() as s:
                version = (s.scalar(select(func.max(ModelVersion.version))
                                    .where(ModelVersion.project_id == project_id)) or 0) + 1
            path = save_model(self.blobs.model_path(project_id, version), model)  # temp + rename, then the row
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            fitted = model.info.get("n_support", model.info.get("n_fit_images")) or 0
            summary = {"method": model.head.method, "n_images": int(fitted) + int(model.info.get("n_added", 0)),
                       "threshold": model.decision.get("threshold"), "guarantee": model.decision.get("guarantee")}
            with self.Session.begin() as s:
                s.add(ModelVersion(project_id=project_id, version=version, path=self.blobs.relative(path), sha256=sha,
                                   origin=origin, summary=summary))
                project = s.get(Project, project_id)
                project.active_version = version
                project.needs_refit = False
            return version

    def install_model(self, path: str | Path, project_name: str | None = None) -> tuple[dict, int]:
        """A model file (``.fvm``, or a packed ``.fvz`` whose backbone then loads from its own files) as the active
        version of project ``project_name`` (default: the file's stem), created when missing. The same file
        installed again activates the version it gave before instead of adding one."""
        from ..cli.common import file_sha256
        from ..deploy.pack import register_backbone
        from ..modelfile import load

        path = Path(path)
        model = load(path, self.settings.cache_dir)
        origin = f"installed from {path.name} (sha256 {file_sha256(path)[:16]})"
        name = (project_name or path.stem).strip()
        with self.Session() as s:
            row = s.scalars(select(Project).where(Project.name == name)).first()
            project = None if row is None else self._project_dict(s, row, counts=False)
        if project is None:
            classes = [{"name": n, "description": ""} for n in model.class_names] or None
            project = self.create_project(name, model.task, model.backbone_spec, model.head.method, classes)
        elif (project["task"], project["backbone"]) != (model.task, model.backbone_spec):
            raise ServiceError(409, "conflict", f"project {name!r} is a {project['task']} project on "
                                                f"{project['backbone']}; {path} is a {model.task} model on "
                                                f"{model.backbone_spec}")
        if model.offline_spec is not None:  # the service creates backbones by spec: point this one at the archive
            register_backbone(model.backbone_spec, model.offline_spec, model.backbone_id, self.settings.cache_dir)
        with self.Session() as s:
            same = s.scalars(select(ModelVersion.version).where(ModelVersion.project_id == project["id"],
                                                                ModelVersion.origin == origin)).first()
        if same is not None:
            return self.activate(project["id"], same), same
        version = self._save_version(project["id"], model, origin=origin)
        return self.project(project["id"]), version

    # --- model versions ------------------------------------------------------------------------------------------
    def models(self, project_id: int) -> list[dict]:
        project = self.project(project_id)
        with self.Session() as s:
            rows = s.scalars(select(ModelVersion).where(ModelVersion.project_id == project_id)
                             .order_by(ModelVersion.version)).all()
            out = [store.as_dict(r, ["version", "sha256", "origin", "summary", "created_at"]) for r in rows]
        for m in out:
            m["active"] = m["version"] == project["active_version"]
        return out

    def model_detail(self, project_id: int, version: int) -> dict:
        model = self.load_model(project_id, version)
        d = model.decision
        return {"version": version, "task": model.task, "method": model.head.method,
                "backbone": model.backbone_spec, "classes": model.class_names, "threshold": d.get("threshold"),
                "guarantee": d.get("guarantee"), "calibration_scores": d.get("calibration_scores"),
                "target_false_reject": d.get("target_false_reject"), "temperature": d.get("temperature")}

    def activate(self, project_id: int, version: int) -> dict:
        with self.Session.begin() as s:
            project = s.get(Project, project_id)
            if project is None:
                raise not_found("project", project_id)
            if s.scalars(select(ModelVersion).where(ModelVersion.project_id == project_id,
                                                    ModelVersion.version == version)).first() is None:
                raise not_found(f"model version of project {project_id}:", version)
            project.active_version = version
        return self.project(project_id)

    def backbone(self, spec: str):
        from ..backbones import create_backbone

        with self._lock:
            if spec not in self._backbones:
                self._backbones[spec] = create_backbone(spec, cache_dir=self.settings.cache_dir)
            return self._backbones[spec]

    def load_model(self, project_id: int, version: int | None = None):
        from ..modelfile import load

        if version is None:
            version = self.project(project_id)["active_version"]
            if version is None:
                raise ServiceError(409, "no_model", f"project {project_id} has no fitted model yet: POST "
                                                    f"/v1/projects/{project_id}/fit")
        key = (project_id, int(version))
        with self._lock:
            cached = self._models.get(key)
        if cached is not None:
            return cached
        with self.Session() as s:
            row = s.scalars(select(ModelVersion).where(ModelVersion.project_id == project_id,
                                                       ModelVersion.version == version)).first()
        if row is None:
            raise not_found(f"model version of project {project_id}:", version)
        model = load(self.blobs.resolve(row.path))
        model.bind(self.backbone(model.backbone_spec))
        with self._lock:
            self._models[key] = model
        return model

    # --- predictions ---------------------------------------------------------------------------------------------
    def predict(self, project_id: int, files: Sequence[tuple[bytes, str]]) -> list[dict]:
        """Score uploaded images with the active model; every result is stored before it is returned."""
        if not files:
            raise ServiceError(422, "invalid", "no file uploaded")
        if len(files) > MAX_BATCH:
            raise ServiceError(413, "too_many_files", f"at most {MAX_BATCH} images per request, got {len(files)}")
        project = self.project(project_id, counts=False)
        version = project["active_version"]
        if version is None:
            raise ServiceError(409, "no_model", f"project {project_id} has no fitted model yet: POST "
                                                f"/v1/projects/{project_id}/fit")
        images = []
        for data, name in files:
            try:
                check_image(data, name, self.settings.max_upload_bytes, self.settings.max_pixels)
            except UploadError as err:
                raise ServiceError(err.status, "bad_image", str(err)) from None
            images.append((self.blobs.put_image(data), clean_filename(name)))
        paths = [str(self.blobs.image_path(sha)) for sha, _ in images]
        results = self._on_inference_thread(self._score, project, version, paths)
        rows = []
        with self.Session.begin() as s:
            for (sha, name), path in zip(images, paths):
                r = results[path]
                row = Prediction(project_id=project_id, model_version=version, image_sha256=sha, filename=name,
                                 label=r.get("label"), score=r.get("score"), threshold=r.get("threshold"),
                                 probabilities=r.get("probabilities"), decision=r["decision"], reason=r.get("reason"),
                                 heatmap=r.get("heatmap"))
                s.add(row)
                rows.append(row)
            s.flush()
            return [self._prediction_dict(row) for row in rows]

    def _score(self, project: dict, version: int, paths: list[str]) -> dict[str, dict]:
        model = self.load_model(project["id"], version)
        if project["task"] == "anomaly":
            return self._score_anomaly(project, model, version, paths)
        return self._score_classification(project, model, paths)

    def _score_classification(self, project: dict, model, paths: list[str]) -> dict[str, dict]:
        from ..tasks.fewshot import predict

        params = project["params"]
        abstain = bool(params.get("abstain", bool(model.decision.get("conformal"))))
        preds = predict(model, paths, abstain=abstain, unknown_threshold=params.get("review_threshold"),
                        cache_dir=self.settings.cache_dir)
        if preds.skipped:
            raise ServiceError(400, "bad_image", f"cannot score the image: {preds.skipped[0].reason}")
        accept = params.get("accept_classes") or [c for c in model.class_names if c.lower() in GOOD_NAMES]
        out = {}
        for r in preds.rows:
            if r["label"] == "review":
                decision = "review"
            elif accept:
                decision = "accept" if r["label"] in accept else "reject"
            else:
                decision = "accept"
            out[r["path"]] = {"label": r["label"], "probabilities": r["probabilities"], "decision": decision,
                              "reason": r.get("review_reason"), "score": r["top_probability"]}
        return out

    def _score_anomaly(self, project: dict, model, version: int, paths: list[str]) -> dict[str, dict]:
        from ..reports.anomaly import overlay_on_image, write_png
        from ..tasks.anomaly import score_files

        res = score_files(model, paths, keep_maps=True, review_band=float(project["params"].get("review_band", 0)),
                          cache_dir=self.settings.cache_dir)
        if res.skipped:
            raise ServiceError(400, "bad_image", f"cannot score the image: {res.skipped[0].reason}")
        preprocess = model.backbone().preprocess
        out = {}
        for i, r in enumerate(res.rows):
            sha = Path(r["path"]).name
            heat = self.blobs.heatmap_path(project["id"], sha, version)
            if not heat.is_file():
                write_png(heat, overlay_on_image(r["path"], res.maps[i], preprocess, model.decision))
            decision = {"ok": "accept", "ng": "reject", "review": "review"}[r["verdict"]]
            out[r["path"]] = {"label": "good" if r["verdict"] == "ok" else "defect" if r["verdict"] == "ng" else
                              "review", "score": r["score"], "threshold": r["threshold"], "decision": decision,
                              "heatmap": self.blobs.relative(heat),
                              "reason": "the score is within the review band of the threshold"
                              if r["verdict"] == "review" else None}
        return out

    @staticmethod
    def _prediction_dict(row: Prediction) -> dict:
        out = store.as_dict(row, ["id", "project_id", "model_version", "image_sha256", "filename", "label", "score",
                                  "threshold", "probabilities", "decision", "reason", "reviewed_label", "created_at"])
        out["prediction_id"] = out.pop("id")
        out["heatmap_url"] = f"/v1/predictions/{row.id}/heatmap" if row.heatmap else None
        out["image_url"] = f"/v1/predictions/{row.id}/image"
        return out

    def predictions(self, project_id: int, limit: int = 50, before_id: int | None = None,
                    decision: str | None = None) -> dict:
        self.project(project_id)
        limit = max(1, min(int(limit), 500))
        with self.Session() as s:
            q = select(Prediction).where(Prediction.project_id == project_id)
            if before_id is not None:
                q = q.where(Prediction.id < before_id)
            if decision:
                q = q.where(Prediction.decision == decision)
            rows = s.scalars(q.order_by(Prediction.id.desc()).limit(limit + 1)).all()
        items = [self._prediction_dict(r) for r in rows[:limit]]
        return {"items": items, "next_before_id": items[-1]["prediction_id"] if len(rows) > limit else None}

    def prediction(self, prediction_id: int) -> dict:
        with self.Session() as s:
            row = s.get(Prediction, prediction_id)
            if row is None:
                raise not_found("prediction", prediction_id)
            return self._prediction_dict(row)

    def prediction_file(self, prediction_id: int, kind: str) -> Path:
        with self.Session() as s:
            row = s.get(Prediction, prediction_id)
            if row is None:
                raise not_found("prediction", prediction_id)
            if kind == "heatmap":
                if not row.heatmap:
                    raise not_found("heat map for prediction", prediction_id)
                return self.blobs.resolve(row.heatmap)
            return self.blobs.image_path(row.image_sha256)

    # --- the review loop -------------------------------------------------------------------------------------------
    def review_queue(self, project_id: int, limit: int = 50) -> list[dict]:
        self.project(project_id)
        with self.Session() as s:
            rows = s.scalars(select(Prediction).where(Prediction.project_id == project_id,
                                                      Prediction.decision == "review",
                                                      Prediction.reviewed_label.is_(None))
                             .order_by(Prediction.id).limit(max(1, min(int(limit), 500)))).all()
            return [self._prediction_dict(r) for r in rows]

    def review(self, prediction_id: int, label: str, token: Token | None = None) -> dict:
        """An inspector's answer: recorded, the image becomes an exemplar (anomaly: when it is good), the project
        is marked for refit, and heads that can take new images without a refit get a new model version at once."""
        pred = self.prediction(prediction_id)
        project = self.project(pred["project_id"])
        label = (label or "").strip()
        allowed = list(ANOMALY_LABELS) if project["task"] == "anomaly" else [c["name"] for c in project["classes"]]
        if label not in allowed:
            raise ServiceError(422, "invalid", f"label must be one of {', '.join(allowed)}, got {label!r}")
        with self.Session.begin() as s:
            row = s.get(Prediction, prediction_id)
            row.reviewed_label = label
            s.add(Review(prediction_id=prediction_id, label=label, token_id=token.id if token else None))
        exemplar = job = None
        if project["task"] == "classification" or label == "good":
            data = self.blobs.image_path(pred["image_sha256"]).read_bytes()
            exemplar = self.add_exemplar(project["id"], data, pred["filename"], label, source="review")
            if project["active_version"] is not None and self.can_update(project):
                job = self._queue_job(project["id"], "update")
        return {"prediction": self.prediction(prediction_id), "exemplar": exemplar, "update_job": job,
                "needs_refit": self.project(project["id"])["needs_refit"]}

    @staticmethod
    def can_update(project: dict) -> bool:
        """Whether the project's method takes new images without a refit (prototype, tip, patchcore, padim, anomalydino)."""
        if project["task"] == "anomaly":
            from ..anomaly import anomaly_head_classes as classes
        else:
            from ..heads import head_classes as classes
        return callable(getattr(classes().get(project["method"]), "partial_fit", None))


class _JobProgress:
    """Writes a running fit's progress to its job row (at most every half second)."""

    def __init__(self, service: Service, job_id: str):
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


def read_uploads(files: Iterable) -> list[tuple[bytes, str]]:
    return [(f.file.read(), f.filename or "") for f in files]
