"""The review loop: the queue of predictions in the review band, and an inspector's answers."""

from __future__ import annotations

from sqlalchemy import select

from . import store
from .common import ANOMALY_LABELS, ServiceError
from .store import Prediction, Review, Token


class Reviews:
    """Methods of :class:`~fewvision.service.core.Service` for the review loop."""

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
            row = s.get(Prediction, prediction_id, with_for_update=True)  # two inspectors at once: one answer
            repeated = row.reviewed_label == label
            if row.reviewed_label is not None and not repeated:
                first = s.scalars(select(Review).where(Review.prediction_id == prediction_id)
                                  .order_by(Review.id)).first()
                raise ServiceError(409, "already_reviewed", f"prediction {prediction_id} was reviewed as "
                                   f"{row.reviewed_label!r} at {store.as_dict(first, ['created_at'])['created_at']}; "
                                   "an answer is final (its image is an exemplar of that label)")
            if not repeated:
                row.reviewed_label = label
                s.add(Review(prediction_id=prediction_id, label=label, token_id=token.id if token else None))
        if repeated:  # the same answer again (a retried request): recorded already, nothing more to do
            return {"prediction": self.prediction(prediction_id), "exemplar": None, "update_job": None,
                    "needs_refit": project["needs_refit"]}
        exemplar = job = None
        if project["task"] == "classification" or label == "good":
            data = self.blobs.image_path(pred["image_sha256"]).read_bytes()
            exemplar = self.add_exemplar(project["id"], data, pred["filename"], label, source="review")
            if project["active_version"] is not None and self.can_update(project):
                job = self._queue_job(project["id"], "update")
        return {"prediction": self.prediction(prediction_id), "exemplar": exemplar, "update_job": job,
                "needs_refit": self.project(project["id"])["needs_refit"]}

    def reviews(self, prediction_id: int) -> list[dict]:
        """The audit trail of a prediction's review: each answer with who gave it (the token's id and name) and when."""
        self.prediction(prediction_id)
        with self.Session() as s:
            rows = s.execute(select(Review, Token.name).outerjoin(Token, Token.id == Review.token_id)
                             .where(Review.prediction_id == prediction_id).order_by(Review.id)).all()
            return [{**store.as_dict(r, ["label", "token_id", "created_at"]), "token_name": name} for r, name in rows]
