"""Progress bars: shown on stderr only for work that lasts more than a second."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from tqdm.auto import tqdm

SHOW_AFTER_S = 1.0


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    # disable=None: tqdm hides the bar when stderr is not a terminal (CI logs, pipes)
    bar = tqdm(total=total, desc=description, unit="img", delay=SHOW_AFTER_S, file=sys.stderr,
               disable=None if enabled else True, dynamic_ncols=True, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
