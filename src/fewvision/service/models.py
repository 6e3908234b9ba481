"""Model versions of a project: saved by a fit, an update or an install, listed, activated, loaded (and kept)."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from sqlalchemy import func, select

from ..runtime.engines import installed
from . import store
from .common import ServiceError, check_text, not_found
from .projects import ANOMALY_CLASSES
from .store import ModelVersion, Project


class Models:
    """Methods of :class:`~fewvision.service.core.Service` for model versions."""

    def _save_version(self, project_id: int, model, origin: str, source: Path | None = None) -> int:
        """Store ``model`` as the project's next version (``source``: copy this model file's bytes instead of
        writing the model, which needs no torch; ``model`` then only gives the summary)."""
        from ..modelfile import save_model

        # The file first, under a name of its own; then, in one transaction holding the project's row (replicas on
        # PostgreSQL number their versions one after another: SELECT ... FOR UPDATE), the next number, the file
        # renamed to it and the row. A crash before the commit leaves a file no row names, which the next version
        # of the project replaces.
        # named as a temp file of this process (io.atomic): a start-up sweep removes it if a kill -9 leaves it
        pending = self.blobs.model_path(project_id, 0).with_name(
            f".pending.fvm.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
        if source is None:
            save_model(pending, model)
        else:
            pending.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, pending)
        try:
            sha = hashlib.sha256(pending.read_bytes()).hexdigest()
            fitted = model.info.get("n_support", model.info.get("n_fit_images")) or 0
            summary = {"method": model.method, "n_images": int(fitted) + int(model.info.get("n_added", 0)),
                       "threshold": model.decision.get("threshold"), "guarantee": model.decision.get("guarantee")}
            with self._project_lock(project_id), self.Session.begin() as s:
                project = s.scalars(select(Project).where(Project.id == project_id).with_for_update()).one()
                version = (s.scalar(select(func.max(ModelVersion.version))
                                    .where(ModelVersion.project_id == project_id)) or 0) + 1
                path = self.blobs.model_path(project_id, version)
                os.replace(pending, path)
                s.add(ModelVersion(project_id=project_id, version=version, path=self.blobs.relative(path), sha256=sha,
                                   origin=origin, summary=summary))
                project.active_version = version
                project.needs_refit = False
            return version
        finally:
            pending.unlink(missing_ok=True)

    def install_model(self, path: str | Path, project_name: str | None = None) -> tuple[dict, int]:
        """A model file (``.fvm``, or a packed ``.fvz`` whose backbone then loads from its own files) as the active
        version of project ``project_name`` (default: the file's stem), created when missing. The same file
        installed again activates the version it gave before instead of adding one."""
        from ..cli.common import file_sha256
        from ..modelfile import described, is_pack, open_pack

        path = Path(path)
        model = described(path, self.settings.cache_dir)  # the file's metadata: no torch, no backbone
        if installed("torch"):
            from ..modelfile import load

            load(path, self.settings.cache_dir)  # its head rebuilds from the file (checked shapes and values)
        origin = f"installed from {path.name} (sha256 {file_sha256(path)[:16]})"
        name = (project_name or path.stem).strip()
        with self.Session() as s:
            row = s.scalars(select(Project).where(Project.name == name)).first()
            project = None if row is None else self._project_dict(s, row, counts=False)
        if project is None:  # the fitted model vouches for its task, backbone, method and classes
            classes = [{"name": n, "description": ""} for n in model.class_names] if model.task == "classification" \
                else [dict(c) for c in ANOMALY_CLASSES]
            check_text(name, "name")
            if not name or len(name) > 200:
                raise ServiceError(422, "invalid", "a project needs a name of 1 to 200 characters")
            project = self._add_project(name, model.task, model.backbone_spec, model.method, classes, {})
        elif (project["task"], project["backbone"]) != (model.task, model.backbone_spec):
            raise ServiceError(409, "conflict", f"project {name!r} is a {project['task']} project on "
                                                f"{project['backbone']}; {path} is a {model.task} model on "
                                                f"{model.backbone_spec}")
        if is_pack(path) and installed("torch"):
            # the service creates backbones by spec: point this one at the archive's files (unpacked now)
            from ..deploy.pack import register_backbone

            unpacked = open_pack(path, self.settings.cache_dir)
            register_backbone(model.backbone_spec, unpacked.spec, model.backbone_id, self.settings.cache_dir)
        with self.Session() as s:
            same = s.scalars(select(ModelVersion.version).where(ModelVersion.project_id == project["id"],
                                                                ModelVersion.origin == origin)).first()
        if same is not None:
            return self.activate(project["id"], same), same
        version = self._save_version(project["id"], model, origin=origin, source=model.file)
        return self.project(project["id"]), version

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

    @staticmethod
    def can_update(project: dict) -> bool:
        """Whether the project's method takes new images without a refit (prototype, tip, patchcore, padim, anomalydino)."""
        if project["task"] == "anomaly":
            from ..anomaly import anomaly_head_classes as classes
        else:
            from ..heads import head_classes as classes
        return callable(getattr(classes().get(project["method"]), "partial_fit", None))
