"""Progress: one bar per job on a terminal, nothing on a pipe, and the numbers for a closing summary.

A command opens a job (``with job("scoring") as bar``) and says how much work it will do, in image passes
(``expect(n)``; a fit that encodes 200 images and then scores them leave-one-out expects 400). Every stage below -
hashing and cache look-ups, decoding and encoding, scoring, heat maps - advances that one bar, so a run shows one
bar from start to end with its rate and ETA, instead of a bar per batch. Outside a job (the Python API) each
encoding shows its own bar, only on a terminal and only when it lasts more than a second.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from typing import Callable, Iterator

from tqdm.auto import tqdm


def _show_after() -> float:
    """Seconds a bar waits before it appears (short jobs show none): ``FEWVISION_PROGRESS_DELAY``, default 1."""
    try:
        return max(0.0, float(os.environ.get("FEWVISION_PROGRESS_DELAY", "1")))
    except ValueError:
        return 1.0


class Job:
    """The bar of one command (or a silent counter when not on a terminal)."""

    def __init__(self, description: str, enabled: bool = True):
        self.description = description
        self.enabled = enabled
        self.started = time.perf_counter()
        self.total = 0
        self.done = 0
        self._bar = None

    def expect(self, n: int) -> None:
        """Announce ``n`` more image passes."""
        self.total += int(n)
        if self._bar is None and self.enabled:
            # disable=None: tqdm hides the bar when stderr is not a terminal (CI logs, pipes)
            self._bar = tqdm(total=self.total, desc=self.description, unit="img", file=sys.stderr, disable=None,
                             dynamic_ncols=True, leave=False, delay=_show_after())
        elif self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(int(n))

    def stage(self, description: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(description, refresh=False)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


_CURRENT: contextvars.ContextVar[Job | None] = contextvars.ContextVar("fewvision_job", default=None)


@contextlib.contextmanager
def job(description: str, enabled: bool = True) -> Iterator[Job]:
    current = Job(description, enabled)
    token = _CURRENT.set(current)
    try:
        yield current
    finally:
        current.close()
        _CURRENT.reset(token)


def current_job() -> Job | None:
    return _CURRENT.get()


def expect(n: int) -> None:
    """Announce work to the current job, if any (the task functions call this; outside a job it does nothing)."""
    current = _CURRENT.get()
    if current is not None:
        current.expect(n)


def stage(description: str) -> None:
    current = _CURRENT.get()
    if current is not None:
        current.stage(description)


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """``advance(n)`` for ``total`` units of work: the current job's bar when there is one, else a bar of its own."""
    current = _CURRENT.get()
    if current is not None:
        yield current.advance if enabled else (lambda n: None)
        return
    bar = tqdm(total=total, desc=description, unit="img", delay=_show_after(), file=sys.stderr,
               disable=None if enabled else True, dynamic_ncols=True, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
