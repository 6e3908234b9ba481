"""The station's loop: complete files in, one verdict each, recorded with its outbox messages, then moved.

For each batch of complete files: the ids already in the store are files judged before a crash (their move is
finished, nothing is judged again); the others are scored by :func:`fewvision.tasks.verdicts.judge` (the service's
scoring), and in one transaction each gets its prediction row and its outbox message; only after the commit is
the file moved to its verdict's folder. A crash before the commit leaves the file in the folder to be judged
(under the same id); after it, the file is found judged and moved.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import func, select

from ..service.common import DECISIONS, VERDICT_OF
from ..monitor.watch import LINE_ALARMS, Monitor, nonconformity, reference
from ..service.monitoring import RESET
from ..service.store import Alarm, Outbox, Prediction
from ..tasks.rows import region_columns
from ..tasks.verdicts import ERROR, VERDICTS, judge
from ..runtime.model import scoring_model
from .config import StationConfig
from .metrics import Metrics
from .outbox import Delivery, backlog
from .sinks import create_sink
from .source import Arrival, HotFolder

log = logging.getLogger("fewvision.station")
RESET_CHECK_S = 2.0  # how often the store is asked whether a person reset the monitor
OUTBOX_KEEP = timedelta(days=7)  # delivered messages are kept this long (to look into), then deleted
PRUNE_EVERY_S = 3600.0
ALARM_NAMESPACE = uuid.UUID("9b3f1e52-7a0c-4f5e-8d21-6c4b2a9e7f10")


class StationBusy(RuntimeError):
    """Another station process runs this station on this store."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return hashlib.sha256(b"").hexdigest()
    return h.hexdigest()


def _hold_lock(config: StationConfig):
    """One process per station and store: a lock file beside a SQLite store (gone with the process, however it
    ends); on PostgreSQL an advisory lock on a connection this process keeps."""
    from ..service.store import Locked, hold_lock_file, sqlite_file

    database = sqlite_file(config.store)
    if database is not None:
        try:
            return hold_lock_file(database.with_name(f"{database.name}.station-{config.name}.lock"))
        except Locked as err:
            raise StationBusy(f"station {config.name} already runs on {database} (process {err.owner})") from None
    from sqlalchemy import create_engine, text

    engine = create_engine(config.store.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=None)
    conn = engine.connect()
    key = int.from_bytes(hashlib.sha256(f"fewvision-station:{config.name}".encode()).digest()[:8], "big", signed=True)
    if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
        conn.close()
        raise StationBusy(f"station {config.name} already runs on this database")
    return conn


class Station:
    def __init__(self, config: StationConfig, metrics_port: int | None = None):
        from ..service.common import ServiceError, Settings
        from ..service.core import Service

        self.config = config
        self.name = config.name
        self._lock = _hold_lock(config)
        self.service = Service(Settings(config.data_dir, config.store, worker=False))
        try:
            project, self.version = self.service.install_model(config.model, project_name=config.name)
        except ServiceError as err:
            raise RuntimeError(f"{config.path}: {err.message}") from None
        self.project_id = project["id"]
        # Its ONNX graph where the pack carries one (no torch needed), else the fitted model on torch.
        self.model = scoring_model(config.model, config.engine, cache_dir=self.service.settings.cache_dir)
        self.model_sha256 = file_sha256(config.model)
        self.Session = self.service.Session
        self.folder = HotFolder(config.source, config.name)
        self.metrics = Metrics(config.name)
        self.metrics_port = metrics_port if metrics_port is not None else config.metrics_port
        self._metrics_server = None
        self.deliveries: list[Delivery] = []
        self.stopping = threading.Event()
        self.judged = 0
        self._made: set[Path] = set()  # 'after' folders known to exist
        self._last_reset, self._reset_checked = 0, 0.0
        self._pruned = -PRUNE_EVERY_S
        self.monitor = self._monitor()

    def _monitor(self) -> Monitor | None:
        """The drift monitor of this model version (docs/monitor.md), its state rebuilt by replaying the scores
        the station recorded under this version, in order: the same p-values (seeded), the same martingale; the
        alarms the replay raises again were recorded already. None for a model without reference scores (a
        classification model fitted without a calibration fraction)."""
        calibration, threshold = reference(self.model.task, self.model.decision)
        if self.config.monitor_delta is None or not calibration:
            return None
        monitor = Monitor(calibration, threshold=threshold, delta=self.config.monitor_delta, keep_series=False,
                          kinds=LINE_ALARMS)
        with self.Session() as s:
            scores = s.execute(select(Prediction.id, Prediction.score).where(
                Prediction.station == self.name, Prediction.model_version == self.version,
                Prediction.score.is_not(None), Prediction.decision != "error").order_by(Prediction.id)).all()
            resets = dict(s.execute(select(Alarm.prediction_id, Alarm.id).where(
                Alarm.project_id == self.project_id, Alarm.model_version == self.version, Alarm.kind == RESET)).all())
        for pid, score in scores:
            monitor.add(nonconformity(self.model.task, score))
            if pid in resets:  # a person restarted the monitor here (the service's POST .../monitor/reset)
                monitor.restart()
        monitor.alarms.clear()
        self._last_reset = max(resets.values(), default=0)
        return monitor

    def _follow_resets(self) -> None:
        """A reset made through the service since the last look: the monitor is rebuilt (replayed) so that it
        restarts exactly where the reset was recorded, as every later replay will."""
        now = time.monotonic()
        if self.monitor is None or now - self._reset_checked < RESET_CHECK_S:
            return
        self._reset_checked = now
        with self.Session() as s:
            newer = s.scalar(select(Alarm.id).where(Alarm.project_id == self.project_id, Alarm.kind == RESET,
                                                    Alarm.model_version == self.version,
                                                    Alarm.id > self._last_reset).limit(1))
        if newer is not None:
            self.monitor = self._monitor()

    # --- life cycle ----------------------------------------------------------------------------------------
    def delivered_counts(self, position: int) -> dict[str, int]:
        """Verdicts per verdict among the messages up to ``position`` (what a sink delivered before a restart)."""
        with self.Session() as s:
            counts = dict(s.execute(select(Prediction.decision, func.count(Prediction.id))
                                    .where(Prediction.station == self.name).group_by(Prediction.decision)).all())
            pending = s.scalars(select(Outbox.payload).where(Outbox.station == self.name, Outbox.id > position,
                                                             Outbox.kind == "verdict")).all()
        out = {VERDICT_OF.get(k, k): int(v) for k, v in counts.items()}
        for p in pending:
            out[p["verdict"]] = out.get(p["verdict"], 0) - 1
        return out

    def start(self) -> None:
        from .outbox import cursor

        for sink in self.config.sinks:
            position = cursor(self.Session, self.name, sink.name).position
            context = {"model_sha256": self.model_sha256, "counts": self.delivered_counts(position)}
            delivery = Delivery(create_sink(sink.kind, sink.name, sink.options, self.name, context), sink,
                                self.Session, self.name, on_event=self.metrics.sink_event)
            self.deliveries.append(delivery)
        if self.metrics_port:
            positions = {d.config.name: d for d in self.deliveries}
            self.metrics.watch(list(positions), lambda n: backlog(self.Session, self.name, positions[n].position),
                               lambda: self.folder.waiting)
            self._metrics_server = self.metrics.serve(self.metrics_port, self.config.metrics_address)
        for d in self.deliveries:
            d.start()
        self.folder.start()

    def close(self) -> None:
        self.stopping.set()
        for d in self.deliveries:
            d.stop()
        for d in self.deliveries:
            d.join(timeout=10)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.service.engine.dispose()
        if self._lock is not None:
            self._lock.close()

    def run(self, stop: threading.Event | None = None, until: int | None = None) -> None:
        """Judge files until ``stop`` is set (or, for tests and benchmarks, ``until`` verdicts were recorded)."""
        stop = stop or self.stopping
        while not stop.is_set() and (until is None or self.judged < until):
            self._follow_resets()
            if time.monotonic() - self._pruned >= PRUNE_EVERY_S:
                self.prune_outbox()
            arrivals = self.folder.ready()
            if not arrivals:
                self.folder.wait(1.0)
                continue
            for i in range(0, len(arrivals), self.config.source.batch):
                if stop.is_set():
                    for a in arrivals[i:]:
                        self.folder.again(a)
                    break
                self.process(arrivals[i:i + self.config.source.batch])

    def prune_outbox(self) -> int:
        """Delete the outbox messages every sink of this station has delivered and that are older than a week (the
        verdicts themselves stay in the predictions table); the number deleted."""
        from sqlalchemy import delete

        from ..service.store import SinkCursor

        self._pruned = time.monotonic()
        before = datetime.now(timezone.utc) - OUTBOX_KEEP
        with self.Session.begin() as s:
            positions = dict(s.execute(select(SinkCursor.sink, SinkCursor.position)
                                       .where(SinkCursor.station == self.name)).all())
            upto = min((positions.get(sink.name, 0) for sink in self.config.sinks), default=None)
            q = delete(Outbox).where(Outbox.station == self.name, Outbox.created_at < before)
            if upto is not None:
                q = q.where(Outbox.id <= upto)
            return s.execute(q).rowcount or 0

    # --- one batch -------------------------------------------------------------------------------------------
    def process(self, arrivals: list[Arrival]) -> None:
        # Only a file that was already there when the station started can have been judged (before a crash):
        # the others need no look-up.
        earlier = [a.id for a in arrivals if a.found_at_start]
        known = {}
        if earlier:
            with self.Session() as s:
                known = dict(s.execute(select(Prediction.uid, Prediction.path)
                                       .where(Prediction.uid.in_(earlier))).all())
        for a in [a for a in arrivals if a.id in known]:  # judged before a crash: finish its move
            self._move(a, Path(known[a.id]) if known[a.id] else a.path)
        todo = [a for a in arrivals if a.id not in known and a.path.exists()]
        for a in arrivals:
            if a.id not in known and not a.path.exists():
                self.folder.done(a, still_here=False)
        if not todo:
            return
        rows = judge(self.model, [str(a.path) for a in todo], self.config.policy, use_cache=False).rows
        keep = []
        for a, r in zip(todo, rows):
            if r["verdict"] == ERROR and not a.settled:  # found by its end marker yet unreadable: wait, then judge
                self.folder.again(a)
            else:
                keep.append((a, r))
        if not keep:
            return
        destinations = self._destinations(keep)
        recorded = time.time()
        now = datetime.fromtimestamp(recorded, timezone.utc)
        messages, rows_added = [], []
        with self.Session.begin() as s:
            for (a, r), dest in zip(keep, destinations):
                latency_ms = max(0.0, (recorded - a.complete_at) * 1000.0)
                part = self.folder.part_id(a.name)
                message = {"kind": "verdict", "id": a.id, "station": self.name, "part_id": part, "path": str(dest),
                           "filename": a.name, "verdict": r["verdict"], "score": r["score"],
                           "threshold": r["threshold"], "label": r["label"], "probabilities": r["probabilities"],
                           "reason": r["reason"], **_region_fields(r), "model_sha256": self.model_sha256,
                           "model_version": self.version,
                           "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                           "latency_ms": round(latency_ms, 3)}
                row = Prediction(project_id=self.project_id, model_version=self.version,
                                 image_sha256=file_sha256(a.path), filename=a.name[:255], label=r["label"],
                                 score=r["score"], threshold=r["threshold"], probabilities=r["probabilities"],
                                 decision=DECISIONS[r["verdict"]], reason=r["reason"], uid=a.id, station=self.name,
                                 part_id=part[:200], path=str(dest), latency_ms=latency_ms, created_at=now,
                                 x=r.get("x"), y=r.get("y"), regions=r.get("regions"))
                s.add(row)
                rows_added.append(row)
                messages.append(message)
            s.flush()  # the rows' ids, for the alarms that name them
            for row, message in zip(rows_added, messages):
                s.add(Outbox(station=self.name, kind="verdict", payload=message, created_at=now))
                for alarm in self._watch(row, message):
                    s.add(Alarm(project_id=self.project_id, model_version=self.version, station=self.name,
                                prediction_id=row.id, kind=alarm["alarm"], value=alarm["value"],
                                message=alarm["message"], created_at=now))
                    s.add(Outbox(station=self.name, kind="alarm", payload=alarm, created_at=now))
        for d in self.deliveries:
            d.wake.set()
        for (a, r), dest, m in zip(keep, destinations, messages):
            self.metrics.verdict(r["verdict"], m["latency_ms"] / 1000.0, recorded)
            self._move(a, dest)
        self.judged += len(keep)

    def _watch(self, row: Prediction, verdict: dict) -> list[dict]:
        """The monitor's alarms raised by this verdict's score, as outbox messages."""
        if self.monitor is None or row.score is None or verdict["verdict"] == "error":
            return []
        out = []
        for alarm in self.monitor.add(nonconformity(self.model.task, row.score)):
            out.append({"kind": "alarm", "id": str(uuid.uuid5(ALARM_NAMESPACE, f"{verdict['id']}:{alarm['kind']}")),
                        "station": self.name, "alarm": alarm["kind"], "active": True, "value": alarm["value"],
                        "message": alarm["message"], "verdict_id": verdict["id"], "part_id": verdict["part_id"],
                        "model_sha256": self.model_sha256, "time": verdict["time"]})
        return out

    def _destinations(self, keep: list[tuple[Arrival, dict]]) -> list[Path]:
        out, taken = [], set()
        for a, r in keep:
            folder = self.config.source.after.get(r["verdict"])
            if folder is None:
                out.append(a.path)
                continue
            dest = folder / a.name
            if dest.exists() or dest in taken:  # a name seen before (another part, or a camera's counter reset)
                dest = folder / f"{a.path.stem}.{a.id[:8]}{a.path.suffix}"
            taken.add(dest)
            out.append(dest)
        return out

    def _move(self, a: Arrival, dest: Path) -> None:
        if dest == a.path:
            self.folder.done(a, still_here=True)
            return
        try:
            if dest.parent not in self._made:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(dest.parent)
            try:
                os.replace(a.path, dest)
            except OSError:  # another file system: copy, then remove (a crash in between is finished at restart)
                shutil.move(str(a.path), str(dest))
        except OSError as err:
            log.error("cannot move %s to %s: %s (it stays; its verdict is recorded)", a.path, dest, err)
            self.folder.done(a, still_here=True)
            return
        self.folder.done(a, still_here=False)


def _region_fields(judged: dict) -> dict:
    """An anomaly verdict's peak and defect regions for the message (nothing for classification)."""
    if judged.get("regions") is None:
        return {}
    return {"x": judged.get("x"), "y": judged.get("y"), **region_columns(judged["regions"])}


__all__ = ["Station", "StationBusy", "VERDICTS"]
