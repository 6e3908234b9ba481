"""A project's line, watched (docs/monitor.md): verdicts per hour, yield, throughput, latency, and the drift
monitor of its active model version over its predictions, with the alarms it raised and who acknowledged them.

The monitor is a function of the model version's predictions in the order they were recorded (seeded p-values):
it is replayed from the store once per process and then fed the new predictions, so it survives restarts without a
state of its own, and every replica (and a station writing the same store) computes the same alarms. Alarms are
recorded once each (a prediction and a kind).
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from . import store
from .common import VERDICT_OF, ServiceError, not_found
from .store import Alarm, Prediction, Token

RESET = "reset"  # an alarms row: a person restarted the monitor after this prediction
SINCE = re.compile(r"^(\d+(?:\.\d+)?)([mhd])$")
ALARM_FIELDS = ["id", "project_id", "model_version", "station", "prediction_id", "kind", "value", "message",
                "created_at", "acknowledged_at", "acknowledged_by"]


def parse_since(value: str | None, now: datetime) -> datetime | None:
    """``8h``, ``30m``, ``2d`` (before now) or an ISO 8601 time; None or ``all``: everything."""
    if value is None or value in ("", "all"):
        return None
    m = SINCE.match(value.strip())
    if m:
        n, unit = float(m.group(1)), m.group(2)
        return now - timedelta(**{{"m": "minutes", "h": "hours", "d": "days"}[unit]: n})
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ServiceError(422, "invalid", f"since: expected e.g. 8h, 30m, 2d or an ISO 8601 time, got {value!r}")
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class Monitoring:
    """Methods of :class:`~fewvision.service.core.Service` for the monitor."""

    def _watcher(self, project_id: int, version: int):
        """(monitor, the last prediction id it took, its rows) for a model version, brought up to date."""
        from ..monitor.watch import LINE_ALARMS, Monitor, nonconformity, reference

        with self._watch_lock:
            entry = self._watchers.get((project_id, version))
            if entry is None:
                model = self.load_model(project_id, version)
                calibration, threshold = reference(model.task, model.decision)
                monitor = Monitor(calibration, threshold=threshold, kinds=LINE_ALARMS) if calibration else None
                entry = self._watchers[(project_id, version)] = {"monitor": monitor, "last": 0, "times": [],
                                                                 "task": model.task}
            monitor = entry["monitor"]
            if monitor is None:
                return entry
            with self.Session() as s:
                rows = s.execute(select(Prediction.id, Prediction.score, Prediction.created_at, Prediction.station)
                                 .where(Prediction.project_id == project_id, Prediction.model_version == version,
                                        Prediction.id > entry["last"], Prediction.score.is_not(None),
                                        Prediction.decision != "error")
                                 .order_by(Prediction.id)).all()
                resets = set(s.scalars(select(Alarm.prediction_id).where(
                    Alarm.project_id == project_id, Alarm.model_version == version, Alarm.kind == RESET)))
            raised = []
            for pid, score, created, station in rows:
                for alarm in monitor.add(nonconformity(entry["task"], score), row=pid):
                    raised.append((alarm, pid, station, created))
                entry["times"].append(_utc(created))
                entry["last"] = pid
                if pid in resets:
                    monitor.restart()
            for alarm, pid, station, created in raised:  # once each: another process may have recorded it
                try:
                    with self.Session.begin() as s:
                        if s.scalars(select(Alarm.id).where(Alarm.prediction_id == pid,
                                                            Alarm.kind == alarm["kind"])).first() is None:
                            s.add(Alarm(project_id=project_id, model_version=version, station=station,
                                        prediction_id=pid, kind=alarm["kind"], value=alarm["value"],
                                        message=alarm["message"], created_at=_utc(created)))
                except IntegrityError:
                    pass
            return entry

    def monitor(self, project_id: int, since: str | None = None) -> dict:
        project = self.project(project_id, counts=False)
        now = datetime.now(timezone.utc)
        start = parse_since(since, now)
        version = project["active_version"]
        with self.Session() as s:
            q = select(Prediction.decision, Prediction.created_at, Prediction.latency_ms).where(
                Prediction.project_id == project_id)
            if start is not None:
                q = q.where(Prediction.created_at >= start)
            rows = s.execute(q.order_by(Prediction.id)).all()
        hours: dict[str, Counter] = {}
        for decision, created, _ in rows:
            hour = _utc(created).replace(minute=0, second=0, microsecond=0).isoformat()
            hours.setdefault(hour, Counter())[decision] += 1
        total = Counter(d for d, _, _ in rows)
        judged = sum(total[d] for d in ("accept", "reject", "review"))
        latencies = [v for _, _, v in rows if v is not None]
        span_h = ((_utc(rows[-1][1]) - _utc(rows[0][1])).total_seconds() / 3600) if len(rows) > 1 else 0.0
        out = {"project_id": project_id, "model_version": version, "since": start.isoformat() if start else None,
               "counts": dict(total), "yield": total["accept"] / judged if judged else None,
               "per_hour": [{"hour": h, **dict(c), "yield": c["accept"] / max(1, sum(c[d] for d in
                                                                                     ("accept", "reject", "review")))}
                            for h, c in sorted(hours.items())],
               "throughput_per_hour": len(rows) / span_h if span_h > 0 else None,
               "latency_ms": ({"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95))}
                              if latencies else None),
               "monitor": None, "alarms": []}
        if version is not None:
            entry = self._watcher(project_id, version)
            monitor = entry["monitor"]
            if monitor is not None:
                series = monitor.series
                keep = [i for i, t in enumerate(entry["times"]) if start is None or t >= start]
                out["monitor"] = {"delta": monitor.delta, "threshold": monitor.threshold,
                                  "calibration": monitor.result()["calibration"],
                                  "series": {"prediction_id": [series["row"][i] for i in keep],
                                             "time": [entry["times"][i].isoformat() for i in keep],
                                             **{k: [series[k][i] for i in keep] for k in
                                                ("score", "p_value", "martingale", "ewma", "ewma_lower",
                                                 "ewma_upper")}}}
        with self.Session() as s:
            q = select(Alarm).where(Alarm.project_id == project_id)
            if start is not None:
                q = q.where(Alarm.created_at >= start)
            out["alarms"] = [store.as_dict(a, ALARM_FIELDS) for a in s.scalars(q.order_by(Alarm.id))]
        return out

    def reset_monitor(self, project_id: int, token: Token | None = None) -> dict:
        """A person restarts the active version's monitor from its calibration scores (after fixing what an alarm
        showed): recorded as a ``reset`` row after the latest prediction, so every replay restarts there too."""
        project = self.project(project_id, counts=False)
        version = project["active_version"]
        if version is None:
            raise ServiceError(409, "no_model", f"project {project_id} has no fitted model yet")
        entry = self._watcher(project_id, version)
        if entry["monitor"] is None:
            raise ServiceError(409, "conflict", f"the model of project {project_id} has no reference scores to "
                                                "monitor with")
        if not entry["last"]:
            raise ServiceError(409, "conflict", "nothing to reset: the model has no predictions yet")
        now = datetime.now(timezone.utc)
        name = getattr(token, "name", None)
        with self._watch_lock, self.Session.begin() as s:
            if s.scalars(select(Alarm.id).where(Alarm.prediction_id == entry["last"], Alarm.kind == RESET)).first():
                raise ServiceError(409, "conflict", "the monitor was reset after this prediction already")
            row = Alarm(project_id=project_id, model_version=version, station=None, prediction_id=entry["last"],
                        kind=RESET, value=0.0, message=f"monitor reset by {name or 'a person'}", created_at=now,
                        acknowledged_at=now, acknowledged_by=token.id if token else None)
            s.add(row)
            s.flush()
            entry["monitor"].restart()
            return store.as_dict(row, ALARM_FIELDS)

    def acknowledge_alarm(self, alarm_id: int, token: Token | None = None) -> dict:
        with self.Session.begin() as s:
            alarm = s.get(Alarm, alarm_id)
            if alarm is None:
                raise not_found("alarm", alarm_id)
            if alarm.acknowledged_at is None:
                alarm.acknowledged_at = datetime.now(timezone.utc)
                alarm.acknowledged_by = token.id if token else None
            return store.as_dict(alarm, ALARM_FIELDS)

    def alarm(self, alarm_id: int) -> dict:
        with self.Session() as s:
            alarm = s.get(Alarm, alarm_id)
            if alarm is None:
                raise not_found("alarm", alarm_id)
            return store.as_dict(alarm, ALARM_FIELDS)

    def shift(self, project_id: int, since: str | None = None, gallery: int = 60) -> dict:  # 60: the newest shown
        """What the shift report shows (:func:`fewvision.reports.shift.shift_report`): the project, its monitor
        since ``since``, the newest ``gallery`` flagged predictions (reject, review, error) with their image files,
        and the model versions its predictions used."""
        from sqlalchemy import func

        project = self.project(project_id, counts=False)
        m = self.monitor(project_id, since)
        flagged_q = select(Prediction).where(Prediction.project_id == project_id,
                                             Prediction.decision.in_(("reject", "review", "error")))
        if m["since"]:
            flagged_q = flagged_q.where(Prediction.created_at >= datetime.fromisoformat(m["since"]))
        with self.Session() as s:
            n_flagged = s.scalar(select(func.count()).select_from(flagged_q.subquery()))
            rows = s.scalars(flagged_q.order_by(Prediction.id.desc()).limit(gallery)).all()
            used = {v for (v,) in s.execute(select(Prediction.model_version).where(
                Prediction.project_id == project_id).distinct())}
        flagged = []
        for p in rows:
            try:
                image = self.prediction_file(p.id, "image")
            except ServiceError:
                image = None
            flagged.append({"id": p.id, "verdict": VERDICT_OF.get(p.decision, p.decision), "score": p.score,
                            "part_id": p.part_id, "filename": p.filename, "reason": p.reason,
                            "image": image if image is not None and image.is_file() else None})
        versions = [v for v in self.models(project_id) if v["version"] in used]
        return {"project": project, "monitor": m, "flagged": flagged, "n_flagged": int(n_flagged or 0),
                "versions": versions, "verdict_of": VERDICT_OF}
