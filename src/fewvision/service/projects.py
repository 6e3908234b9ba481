"""Projects (a task, a backbone, a method, classes and settings) and their exemplar images."""

from __future__ import annotations

from typing import Sequence

from sqlalchemy import func, select

from . import store
from .blobs import UploadError, check_image, clean_filename
from .common import DEFAULT_METHODS, TASKS, ServiceError, check_text, not_found
from .store import Exemplar, Project, Token


class Projects:
    """Methods of :class:`~fewvision.service.core.Service` for projects and their exemplars."""

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
