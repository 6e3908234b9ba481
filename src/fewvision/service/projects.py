"""Projects (a task, a backbone, a method, classes and settings) and their exemplar images."""

from __future__ import annotations

import shutil
from typing import Sequence

from sqlalchemy import delete, func, select, update

from . import store
from .blobs import UploadError, check_image, clean_filename
from .common import DEFAULT_METHODS, TASKS, ServiceError, check_text, not_found
from .params import check_params
from .store import Exemplar, Job, ModelVersion, Prediction, Project, Review, Token, utcnow

ANOMALY_CLASSES = ({"name": "good", "description": "a good part"}, {"name": "defect", "description": "a defect"})


class Projects:
    """Methods of :class:`~fewvision.service.core.Service` for projects and their exemplars."""

    def create_project(self, name: str, task: str, backbone: str | None = None, method: str | None = None,
                       classes: Sequence[dict] | None = None, params: dict | None = None) -> dict:
        from ..backbones import BackboneError, check_backbone_spec
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
        try:
            check_backbone_spec(backbone)
        except BackboneError as err:
            raise ServiceError(422, "invalid", f"backbone: {err}") from None
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
            classes = list(ANOMALY_CLASSES)
        params = check_params(task, method, classes, {} if params is None else params)
        return self._add_project(name, task, backbone, method, classes, params)

    def _add_project(self, name: str, task: str, backbone: str, method: str, classes: list[dict],
                     params: dict) -> dict:
        """The project row, as checked by :meth:`create_project` (or vouched for by a fitted model's file)."""
        with self.Session.begin() as s:
            if s.scalars(select(Project).where(Project.name == name)).first() is not None:
                raise ServiceError(409, "conflict", f"a project named {name!r} exists")
            row = Project(name=name, task=task, backbone=backbone, method=method, classes=classes,
                          params=dict(params or {}), needs_refit=False)
            s.add(row)
            s.flush()
            return self._project_dict(s, row)

    def update_project(self, project_id: int, name: str | None = None, params: dict | None = None) -> dict:
        """A new name and/or new params (checked as at create; they replace the old ones). New params apply to the
        next prediction at once; those of the fit mark the project for refit."""
        check_text(name, "name")
        check_text(params, "params")
        with self.Session.begin() as s:
            row = s.get(Project, project_id)
            if row is None:
                raise not_found("project", project_id)
            if name is not None:
                name = name.strip()
                if not name or len(name) > 200:
                    raise ServiceError(422, "invalid", "name: a project needs a name of 1 to 200 characters")
                if s.scalars(select(Project).where(Project.name == name, Project.id != project_id)).first():
                    raise ServiceError(409, "conflict", f"a project named {name!r} exists")
                row.name = name
            if params is not None:
                params = check_params(row.task, row.method, list(row.classes), params)
                served = {"review_band", "review_threshold", "abstain", "accept_classes"}
                if {k: v for k, v in params.items() if k not in served} != \
                        {k: v for k, v in dict(row.params).items() if k not in served}:
                    row.needs_refit = True
                row.params = dict(params)
            s.flush()
            return self._project_dict(s, row)

    def delete_project(self, project_id: int) -> dict:
        """The project and everything of it: exemplars, jobs, model versions and files, predictions, reviews, heat
        maps, tokens limited to it, and the images no other project refers to. Refused (409) while a job of the
        project is queued or running."""
        with self._project_lock(project_id), self.Session.begin() as s:
            row = s.get(Project, project_id)
            if row is None:
                raise not_found("project", project_id)
            busy = s.scalars(select(Job.id).where(Job.project_id == project_id,
                                                  Job.state.in_(("queued", "running")))).first()
            if busy is not None:
                raise ServiceError(409, "busy", f"job {busy} of project {project_id} has not finished; wait for it")
            images = set(s.scalars(select(Exemplar.sha256).where(Exemplar.project_id == project_id)).all())
            images |= set(s.scalars(select(Prediction.image_sha256).where(Prediction.project_id == project_id)).all())
            predictions = select(Prediction.id).where(Prediction.project_id == project_id)
            s.execute(delete(Review).where(Review.prediction_id.in_(predictions)))
            for table in (Prediction, ModelVersion, Job, Exemplar):
                s.execute(delete(table).where(table.project_id == project_id))
            s.execute(update(Token).where(Token.project_id == project_id, Token.revoked_at.is_(None))
                      .values(revoked_at=utcnow()))
            s.delete(row)
            s.flush()
            shared = set(s.scalars(select(Exemplar.sha256).where(Exemplar.sha256.in_(images))).all())
            shared |= set(s.scalars(select(Prediction.image_sha256).where(Prediction.image_sha256.in_(images))).all())
        # the rows are gone (committed): now the files, which nothing refers to any more
        for key in [k for k in self._models if k[0] == project_id]:
            self._models.pop(key, None)
        for folder in ("models", "heatmaps"):
            shutil.rmtree(self.blobs.root / folder / str(int(project_id)), ignore_errors=True)
        for sha in images - shared:
            self.blobs.image_path(sha).unlink(missing_ok=True)
        return {"deleted": project_id, "images_removed": len(images - shared)}

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
