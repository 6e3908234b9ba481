"""Predictions: uploaded images scored by the active model, every result stored before it is returned."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from sqlalchemy import select

from . import store
from .blobs import UploadError, check_image, clean_filename
from .common import DECISIONS, MAX_BATCH, ServiceError, not_found, policy_of
from .store import Prediction
from ..tasks.rows import region_columns

log = logging.getLogger("fewvision.service")


class Predictions:
    """Methods of :class:`~fewvision.service.core.Service` for predictions and their files."""

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
                                 heatmap=r.get("heatmap"), x=r.get("x"), y=r.get("y"), regions=r.get("regions"))
                s.add(row)
                rows.append(row)
            s.flush()
            out = [self._prediction_dict(row) for row in rows]
        self._watch_after_predict(project_id, version)
        return out

    def _watch_after_predict(self, project_id: int, version: int) -> None:
        """The drift monitor takes the new scores now, so its alarms are recorded without anyone looking (the
        predictions are stored already: a monitor that fails is logged, not answered)."""
        try:
            self._watcher(project_id, version)
        except Exception:  # noqa: BLE001
            log.exception("the drift monitor of project %s could not take the new predictions", project_id)

    def _score(self, project: dict, version: int, paths: list[str]) -> dict[str, dict]:
        from ..reports.anomaly import overlay_on_image, write_png
        from ..tasks.verdicts import ERROR, judge

        model = self.load_model(project["id"], version)
        params = project["params"]
        anomaly = project["task"] == "anomaly"
        judged = judge(model, paths, policy_of(params), keep_maps=anomaly, cache_dir=self.settings.cache_dir)
        out = {}
        for r in judged.rows:
            if r["verdict"] == ERROR:
                raise ServiceError(400, "bad_image", f"cannot score the image: {r['reason']}")
            row = {k: r.get(k) for k in ("label", "score", "threshold", "probabilities", "reason", "x", "y", "regions")}
            row["decision"] = DECISIONS[r["verdict"]]
            if anomaly:
                heat = self.blobs.heatmap_path(project["id"], Path(r["path"]).name, version)
                if not heat.is_file():
                    from ..tasks.anomaly import map_geometry

                    write_png(heat, overlay_on_image(r["path"], r["map"], map_geometry(model),
                                                     model.decision, max_side=self.settings.heatmap_max_side,
                                                     regions=r.get("regions")))
                row["heatmap"] = self.blobs.relative(heat)
            out[r["path"]] = row
        return out

    @staticmethod
    def _prediction_dict(row: Prediction) -> dict:
        out = store.as_dict(row, ["id", "project_id", "model_version", "image_sha256", "filename", "label", "score",
                                  "threshold", "probabilities", "decision", "reason", "reviewed_label", "created_at"])
        out["prediction_id"] = out.pop("id")
        if row.regions is not None:
            out.update(region_columns(row.regions))
            out.update(x=row.x, y=row.y)
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
            if row.uid is not None and row.path:  # a station's verdict: the image stays where the station put it
                if not Path(row.path).is_file():
                    raise not_found("image file (moved or deleted since) of prediction", prediction_id)
                return Path(row.path)
            return self.blobs.image_path(row.image_sha256)
