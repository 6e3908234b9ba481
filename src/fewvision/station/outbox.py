"""Delivery of the outbox to one sink: a thread per sink, a cursor per sink in the store.

A message is in the outbox from the transaction that recorded its verdict. Each sink's thread reads the messages
after its cursor in order, sends them one by one and moves its cursor (committed) after each batch it delivered:
a crash between a send and the cursor's commit sends that message again (at least once, same ``id``). A failed
send waits (``retry.initial_s``, doubling up to ``retry.max_s``) and tries the same message again, so a sink that
is down never holds up the inspection or the other sinks, and the order is kept. A message the receiver refuses for
good (:class:`~fewvision.station.sinks.Rejected`) is logged, counted and passed.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from ..service.store import Outbox, SinkCursor, utcnow
from .config import SinkConfig
from .sinks import Rejected, Sink

log = logging.getLogger("fewvision.station")
BATCH = 100


def cursor(Session: sessionmaker, station: str, sink: str) -> SinkCursor:
    """The sink's cursor row, created at position 0 the first time."""
    with Session.begin() as s:
        row = s.scalars(select(SinkCursor).where(SinkCursor.station == station, SinkCursor.sink == sink)).first()
        if row is None:
            row = SinkCursor(station=station, sink=sink, position=0, delivered=0, rejected=0, failures=0,
                             updated_at=utcnow())
            s.add(row)
            s.flush()
        return row


def backlog(Session: sessionmaker, station: str, position: int) -> int:
    with Session() as s:
        return int(s.scalar(select(func.count(Outbox.id)).where(Outbox.station == station, Outbox.id > position))
                   or 0)


class Delivery(threading.Thread):
    """Sends the outbox to one sink until :meth:`stop`."""

    def __init__(self, sink: Sink, config: SinkConfig, Session: sessionmaker, station: str,
                 on_event: Callable[[str, str, int], None] | None = None):
        super().__init__(name=f"fewvision-sink-{config.name}", daemon=True)
        self.sink, self.config, self.Session, self.station = sink, config, Session, station
        self.on_event = on_event or (lambda sink, event, n: None)
        self.wake = threading.Event()
        self._halt = threading.Event()
        self.position = cursor(Session, station, config.name).position
        self.opened = False

    def stop(self) -> None:
        self._halt.set()
        self.wake.set()

    def _record(self, position: int, delivered: int, rejected: int, failed: int, error: str | None) -> None:
        with self.Session.begin() as s:
            row = s.scalars(select(SinkCursor).where(SinkCursor.station == self.station,
                                                     SinkCursor.sink == self.config.name)).one()
            row.position = max(row.position, position)
            row.delivered += delivered
            row.rejected += rejected
            row.failures += failed
            row.updated_at = utcnow()
            if error is not None:
                row.last_error, row.last_error_at = error[:1000], utcnow()
        self.position = max(self.position, position)

    def _pause(self, delay: float) -> float:
        self._halt.wait(delay)
        return min(delay * 2, self.config.retry.max_s)

    def run(self) -> None:
        delay = self.config.retry.initial_s
        while not self._halt.is_set():
            if not self.opened:
                try:
                    self.sink.open()
                    self.opened = True
                except Exception as err:  # noqa: BLE001 - a sink that cannot start is retried like a send
                    message = f"cannot open: {type(err).__name__}: {err}"
                    log.warning("sink %s: %s (again in %.1f s)", self.config.name, message, delay)
                    self._record(self.position, 0, 0, 1, message)
                    self.on_event(self.config.name, "failure", 1)
                    delay = self._pause(delay)
                    continue
            with self.Session() as s:
                rows = s.execute(select(Outbox.id, Outbox.payload).where(Outbox.station == self.station,
                                                                         Outbox.id > self.position)
                                 .order_by(Outbox.id).limit(BATCH)).all()
            if not rows:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            done = rejected = 0
            position = self.position
            error = None
            failed = 0
            for row_id, payload in rows:
                if self._halt.is_set():
                    break
                try:
                    self.sink.send(payload)
                    done += 1
                except Rejected as err:
                    log.warning("sink %s: message %s refused: %s (not sent again)", self.config.name,
                                payload.get("id"), err)
                    rejected += 1
                    error = f"message {payload.get('id')} refused: {err}"
                except Exception as err:  # noqa: BLE001 - anything else is a delivery to try again
                    error = f"{type(err).__name__}: {err}"
                    failed = 1
                    break
                position = row_id
            if position != self.position or failed or rejected:
                self._record(position, done, rejected, failed, error)
            if done:
                self.on_event(self.config.name, "delivered", done)
            if rejected:
                self.on_event(self.config.name, "rejected", rejected)
            if failed:
                self.on_event(self.config.name, "failure", 1)
                log.warning("sink %s: %s (again in %.1f s)", self.config.name, error, delay)
                delay = self._pause(delay)
            else:
                delay = self.config.retry.initial_s
        if self.opened:
            try:
                self.sink.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
