"""Statistical process control of the scores: an EWMA chart and the Nelson rules 1-4, with the centre line and
sigma taken from the model's calibration scores.

EWMA (Roberts 1959; Montgomery, "Introduction to Statistical Quality Control", sec. 9.2):
z_t = lambda x_t + (1 - lambda) z_{t-1}, z_0 = mu,
limits mu +- L sigma sqrt(lambda / (2 - lambda) (1 - (1 - lambda)^(2t))), with lambda = 0.2 and L = 3.
Nelson rules (Nelson 1984) on the individual scores: 1 - a point beyond 3 sigma; 2 - nine points in a row on
one side of the centre line; 3 - six points in a row steadily increasing or decreasing; 4 - fourteen points in a
row alternating up and down.

These are the charts quality engineers know; their textbook false-alarm rates assume normal, independent scores,
which anomaly scores are not (they are skewed): the guarantee is the martingale's, not the chart's.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

LAMBDA, L = 0.2, 3.0


class Chart:
    def __init__(self, calibration: Iterable[float], lam: float = LAMBDA, width: float = L):
        cal = np.asarray(list(calibration), dtype=float)
        if len(cal) < 2:
            raise ValueError("the control chart needs at least 2 calibration scores")
        self.mu, self.sigma = float(cal.mean()), float(cal.std(ddof=1))
        self.lam, self.width = lam, width
        self.t = 0
        self.z = self.mu
        self._side: list[int] = []  # recent signs of x - mu
        self._steps: list[int] = []  # recent signs of x_t - x_{t-1}
        self._last: float | None = None

    def limits(self) -> tuple[float, float]:
        half = self.width * self.sigma * math.sqrt(self.lam / (2 - self.lam) * (1 - (1 - self.lam) ** (2 * self.t)))
        return self.mu - half, self.mu + half

    def update(self, x: float) -> dict:
        """EWMA value and limits after ``x``, and the Nelson rules (1-4) that ``x`` completes."""
        x = float(x)
        self.t += 1
        self.z = self.lam * x + (1 - self.lam) * self.z
        lo, hi = self.limits()
        rules = []
        if abs(x - self.mu) > 3 * self.sigma:
            rules.append(1)
        self._side = (self._side + [int(np.sign(x - self.mu))])[-9:]
        if len(self._side) == 9 and abs(sum(self._side)) == 9:
            rules.append(2)
        if self._last is not None:
            self._steps = (self._steps + [int(np.sign(x - self._last))])[-13:]
        self._last = x
        if len(self._steps) >= 5 and abs(sum(self._steps[-5:])) == 5:  # six points, five steps one way
            rules.append(3)
        if len(self._steps) == 13 and 0 not in self._steps and all(
                a == -b for a, b in zip(self._steps, self._steps[1:])):  # fourteen points, thirteen alternating steps
            rules.append(4)
        return {"ewma": self.z, "lower": lo, "upper": hi, "out": not lo <= self.z <= hi, "rules": rules}
