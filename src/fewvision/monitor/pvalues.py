"""Conformal p-values of a stream of scores, online: each new score is ranked against the model's calibration
scores and every score seen before it.

With non-conformity scores a_1 ... a_n (the calibration scores) followed by the stream a_{n+1}, a_{n+2}, ..., the
smoothed p-value of a_t is

    p_t = (#{i < t : a_i > a_t} + theta_t * (#{i < t : a_i = a_t} + 1)) / t,      theta_t ~ U(0, 1)

(Vovk, Gammerman, Shafer, "Algorithmic Learning in a Random World", 2005, sec. 2.5 and 7.1; Vovk, Nouretdinov,
Gammerman 2003). If the whole sequence is exchangeable, the p-values of the stream are independent and uniform on
[0, 1] - the property the test martingale's guarantee rests on. A score over the calibration scores gets a small
p-value; a stream whose scores all went up (or down) gets p-values piled at one end.
"""

from __future__ import annotations

import bisect
from typing import Iterable

import numpy as np


class OnlinePValues:
    def __init__(self, calibration: Iterable[float], seed: int | None = 0):
        self._bag = sorted(float(v) for v in calibration)
        if not self._bag:
            raise ValueError("no calibration scores: the model was fitted without a calibration set")
        self._rng = np.random.default_rng(seed)

    @property
    def seen(self) -> int:
        return len(self._bag)

    def __call__(self, score: float) -> float:
        """The p-value of ``score``; the score then joins the bag."""
        score = float(score)
        lo = bisect.bisect_left(self._bag, score)
        hi = bisect.bisect_right(self._bag, score)
        greater, equal = len(self._bag) - hi, hi - lo
        p = (greater + self._rng.random() * (equal + 1)) / (len(self._bag) + 1)
        self._bag.insert(hi, score)
        return p
