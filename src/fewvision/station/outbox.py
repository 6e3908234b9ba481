"""Delivery of the outbox to one sink: a thread per sink, a cursor per sink in the store.

A message is in the outbox from the transaction that recorded its verdict. Each sink's thread reads the messages
after its cursor in order and sends them one by one; its cursor is saved every second (after the sink's ``flush``,
which makes what it delivered durable), when a send fails and when it stops. A crash sends again what was delivered
since the last save (at least once, same ``id``), and the inspection's own writes do not queue behind a cursor
update per message. A failed
send waits (``retry.initial_s``, doubling up to ``retry.max_s``) and tries the same message again, so a sink that
is down never holds up the inspection or the other sinks, and the order is kept. A message the receiver refuses for
good (:class:`~fewvision.station.sinks.Rejected`) is logged, counted and passed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from ..service.store import Outbox, SinkCursor, utcnow
from .config import SinkConfig
from .sinks import Rejected, Sink

log = logging.getLogger("fewvision.station")
BATCH = 100
SAVE_EVERY_S = 1.0  # the cursor is saved this often (and when a sink fails or stops): a crash resends at most this


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
        self.position = cursor(Session, station, config.name).position  # delivered up to here (in memory)
        self._saved = self.position
        self._tally = {"delivered": 0, "rejected": 0, "failures": 0}
        self._error: str | None = None
        self._saved_at = time.monotonic()
        self.opened = False

    def stop(self) -> None:
        self._halt.set()
        self.wake.set()

    def _save(self) -> None:
        """The cursor and the counts into the store, once the sink made what it delivered durable (its flush)."""
        if self.position == self._saved and not any(self._tally.values()) and self._error is None:
            return
        flush = getattr(self.sink, "flush", None)
        if flush is not None and self.opened:
            flush()
        with self.Session.begin() as s:
            row = s.scalars(select(SinkCursor).where(SinkCursor.station == self.station,
                                                     SinkCursor.sink == self.config.name)).one()
            row.position = max(row.position, self.position)
            row.delivered += self._tally["delivered"]
            row.rejected += self._tally["rejected"]
            row.failures += self._tally["failures"]
            row.updated_at = utcnow()
            if self._error is not None:
                row.last_error, row.last_error_at = self._error[:1000], utcnow()
        self._saved = self.position
        self._tally = dict.fromkeys(self._tally, 0)
        self._error = None
        self._saved_at = time.monotonic()

    def _count(self, event: str, n: int, error: str | None = None) -> None:
        self._tally[event] += n
        if error is not None:
            self._error = error
        self.on_event(self.config.name, event, n)

    def _pause(self, delay: float) -> float:
        self._save()
        self._halt.wait(delay)
        return min(delay * 2, self.config.retry.max_s)

    def run(self) -> None:
        try:
            delay = self.config.retry.initial_s
            while not self._halt.is_set():
                try:
                    self._deliver()
                except Exception as err:  # noqa: BLE001 - the store itself failed (locked, disk full): try again
                    log.error("sink %s: %s: %s (again in %.1f s)", self.config.name, type(err).__name__, err, delay)
                    self._halt.wait(delay)
                    delay = min(delay * 2, self.config.retry.max_s)
        finally:
            try:
                self._save()
            finally:
                if self.opened:
                    try:
                        self.sink.close()
                    except Exception:  # noqa: BLE001 - closing is best effort
                        pass

    def _deliver(self) -> None:
        delay = self.config.retry.initial_s
        while not self._halt.is_set():
            if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
                self._save()
            if not self.opened:
                try:
                    self.sink.open()
                    self.opened = True
                except Exception as err:  # noqa: BLE001 - a sink that cannot start is retried like a send
                    message = f"cannot open: {type(err).__name__}: {err}"
                    log.warning("sink %s: %s (again in %.1f s)", self.config.name, message, delay)
                    self._count("failures", 1, message)
                    delay = self._pause(delay)
                    continue
            with self.Session() as s:
                rows = s.execute(select(Outbox.id, Outbox.payload).where(Outbox.station == self.station,
                                                                         Outbox.id > self.position)
                                 .order_by(Outbox.id).limit(BATCH)).all()
            if not rows:
                self.wake.wait(SAVE_EVERY_S)
                self.wake.clear()
                continue
            done = 0
            for row_id, payload in rows:
                if self._halt.is_set():
                    break
                try:
                    self.sink.send(payload)
                    done += 1
                except Rejected as err:
                    log.warning("sink %s: message %s refused: %s (not sent again)", self.config.name,
                                payload.get("id"), err)
                    self._count("rejected", 1, f"message {payload.get('id')} refused: {err}")
                except Exception as err:  # noqa: BLE001 - anything else is a delivery to try again
                    if done:
                        self._count("delivered", done)
                    self._count("failures", 1, f"{type(err).__name__}: {err}")
                    log.warning("sink %s: %s (again in %.1f s)", self.config.name, self._error, delay)
                    delay = self._pause(delay)
                    break
                self.position = row_id
            else:
                if done:
                    self._count("delivered", done)
                delay = self.config.retry.initial_s
