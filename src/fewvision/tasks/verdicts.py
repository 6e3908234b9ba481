"""One verdict per image from a fitted model: ok / ng / review / error, for the service and the station alike.

Both score through here (classification: :func:`fewvision.tasks.fewshot.predict`'s rows; anomaly:
:func:`fewvision.tasks.anomaly.score_files`), so a model judges an image the same way whichever door it came in by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..modelfile import FewVisionModel
from ..runtime import model as runtime
from ..runtime.model import RuntimeModel

OK, NG, REVIEW, ERROR = "ok", "ng", "review", "error"
VERDICTS = (OK, NG, REVIEW, ERROR)
GOOD_NAMES = ("good", "ok", "nominal", "normal", "pass")  # a class with one of these names is the accepted one
REVIEW_BAND_REASON = "the score is within the review band of the threshold"


@dataclass
class Policy:
    """How a model's output becomes a verdict.

    ``review_band``: anomaly scores within this fraction of the threshold go to review. ``abstain``: a
    classification model with conformal thresholds sends images whose prediction set is not one class to review
    (None: when the model has them). ``review_threshold``: a top probability below it goes to review.
    ``accept``: the classes judged ok, the others ng (empty: the classes named good / ok / nominal / normal / pass;
    when there is none of those either, every confident label is ok)."""

    review_band: float = 0.0
    abstain: bool | None = None
    review_threshold: float | None = None
    accept: list[str] = field(default_factory=list)

    def accepted(self, model: FewVisionModel) -> list[str]:
        return list(self.accept) or [c for c in model.class_names if c.lower() in GOOD_NAMES]


@dataclass
class Judged:
    """``rows``: one per image, in input order, each with ``path``, ``verdict``, ``label``, ``score``,
    ``threshold``, ``probabilities`` (classification), ``reason`` (review / error) and, for anomaly models,
    ``x`` / ``y`` (where the map peaks), ``regions`` (the defect regions, largest first) and ``map`` (the anomaly
    map, when asked for)."""

    rows: list[dict]


def judge(model: FewVisionModel | RuntimeModel, paths: Sequence[str], policy: Policy | None = None, *, keep_maps: bool = False,
          cache_dir: str | None = None, use_cache: bool = True) -> Judged:
    """A verdict for every path, unreadable ones included (verdict ``error`` with the reader's reason)."""
    policy = policy or Policy()
    paths = [str(p) for p in paths]
    if not paths:
        return Judged([])
    if model.task == "anomaly":
        by_path = _anomaly(model, paths, policy, keep_maps=keep_maps, cache_dir=cache_dir, use_cache=use_cache)
    else:
        by_path = _classification(model, paths, policy, cache_dir=cache_dir, use_cache=use_cache)
    rows = []
    for p in paths:
        row = by_path.get(p)
        rows.append(row if row is not None else _error(p, "the image could not be scored"))
    return Judged(rows)


def _error(path: str, reason: str) -> dict:
    return {"path": path, "verdict": ERROR, "label": None, "score": None, "threshold": None, "probabilities": None,
            "reason": reason}


def _classification(model: FewVisionModel, paths: list[str], policy: Policy, *, cache_dir: str | None,
                    use_cache: bool) -> dict[str, dict]:
    abstain = bool(model.decision.get("conformal")) if policy.abstain is None else policy.abstain
    if isinstance(model, RuntimeModel):
        preds = runtime.predict(model, paths, abstain=abstain, unknown_threshold=policy.review_threshold)
    else:
        from .fewshot import predict

        preds = predict(model, paths, abstain=abstain, unknown_threshold=policy.review_threshold,
                        cache_dir=cache_dir, use_cache=use_cache)
    accept = policy.accepted(model)
    out = {s.path: _error(s.path, s.reason) for s in preds.skipped}
    for r in preds.rows:
        if r["label"] == "review":
            verdict = REVIEW
        elif accept:
            verdict = OK if r["label"] in accept else NG
        else:
            verdict = OK
        out[r["path"]] = {"path": r["path"], "verdict": verdict, "label": r["label"], "score": r["top_probability"],
                          "threshold": policy.review_threshold, "probabilities": r["probabilities"],
                          "reason": r.get("review_reason")}
    return out


def _anomaly(model: FewVisionModel, paths: list[str], policy: Policy, *, keep_maps: bool, cache_dir: str | None,
             use_cache: bool) -> dict[str, dict]:
    if isinstance(model, RuntimeModel):
        res = runtime.score_files(model, paths, keep_maps=keep_maps, review_band=policy.review_band)
    else:
        from .anomaly import score_files

        res = score_files(model, paths, keep_maps=keep_maps, review_band=policy.review_band, cache_dir=cache_dir,
                          use_cache=use_cache)
    out = {s.path: _error(s.path, s.reason) for s in res.skipped}
    for i, r in enumerate(res.rows):
        verdict = r["verdict"] or REVIEW  # a model without a threshold cannot tell ok from ng
        reason = None
        if verdict == REVIEW:
            reason = REVIEW_BAND_REASON if r["verdict"] else "the model has no threshold"
        out[r["path"]] = {"path": r["path"], "verdict": verdict,
                          "label": {OK: "good", NG: "defect", REVIEW: "review"}[verdict], "score": r["score"],
                          "threshold": r["threshold"], "probabilities": None, "reason": reason, "x": r["x"], "y": r["y"],
                          "regions": r.get("regions"), "map": np.asarray(res.maps[i]) if keep_maps else None}
    return out
