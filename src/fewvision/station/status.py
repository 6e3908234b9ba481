"""What a station's store says about it: verdicts per verdict, the last verdict and error, each sink's backlog."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, inspect, select

from ..service import store
from ..service.common import VERDICT_OF
from ..service.store import Alarm, Outbox, Prediction, SinkCursor
from .config import StationConfig


def station_status(config: StationConfig) -> dict:
    if config.store.startswith("sqlite:///") and not Path(config.store[len("sqlite:///"):]).is_file():
        return {"station": config.name, "store": config.store, "verdicts": {}, "total": 0,
                "last_verdict": None, "last_error": None, "sinks": [], "open_alarms": [],
                "note": "the station has not run yet"}
    engine = store.create(config.store)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("sink_cursors"):
                raise RuntimeError(f"{config.store} is not a station's store (no outbox tables)")
        Session = store.sessions(engine)
        with Session() as s:
            counts = dict(s.execute(select(Prediction.decision, func.count(Prediction.id))
                                    .where(Prediction.station == config.name)
                                    .group_by(Prediction.decision)).all())
            last = s.scalars(select(Prediction).where(Prediction.station == config.name)
                             .order_by(Prediction.id.desc()).limit(1)).first()
            error = s.scalars(select(Prediction).where(Prediction.station == config.name,
                                                       Prediction.decision == "error")
                              .order_by(Prediction.id.desc()).limit(1)).first()
            alarms = s.scalars(select(Alarm).where(Alarm.station == config.name, Alarm.kind != "reset",
                                                   Alarm.acknowledged_at.is_(None)).order_by(Alarm.id)).all()
            open_alarms = [store.as_dict(a, ["kind", "value", "message", "created_at"]) for a in alarms]
            cursors = {c.sink: c for c in s.scalars(select(SinkCursor).where(SinkCursor.station == config.name))}
            sinks = []
            for sink in config.sinks:
                c = cursors.get(sink.name)
                position = c.position if c else 0
                pending = s.scalar(select(func.count(Outbox.id)).where(Outbox.station == config.name,
                                                                      Outbox.id > position)) or 0
                sinks.append({"name": sink.name, "kind": sink.kind, "backlog": int(pending),
                              "delivered": c.delivered if c else 0, "rejected": c.rejected if c else 0,
                              "failures": c.failures if c else 0, "last_error": c.last_error if c else None,
                              "last_error_at": store.as_dict(c, ["last_error_at"])["last_error_at"] if c else None})
        verdicts = {VERDICT_OF.get(k, k): int(v) for k, v in counts.items()}

        def brief(row):
            if row is None:
                return None
            d = store.as_dict(row, ["uid", "part_id", "path", "label", "score", "reason", "created_at"])
            d["verdict"] = VERDICT_OF.get(row.decision, row.decision)
            d["id"], d["time"] = d.pop("uid"), d.pop("created_at")
            return d

        return {"station": config.name, "store": config.store, "verdicts": verdicts, "total": sum(verdicts.values()),
                "last_verdict": brief(last), "last_error": brief(error), "sinks": sinks, "open_alarms": open_alarms}
    finally:
        engine.dispose()
