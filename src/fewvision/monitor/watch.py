"""The monitor of one stream of scores: p-values, the martingale, the chart and the alarms they raise.

A martingale alarm is raised when the capital reaches 1 / delta; the martingale then starts again (a new test with
its own delta), so one drift gives one alarm, not one per image. The EWMA alarm is raised when the EWMA leaves its
limits (again once, until it is back inside); a Nelson rule when a run completes it. Each alarm says how the scores
moved: the median of the recent scores against the calibration scores' median, and the share over the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .martingale import DEFAULT_JUMP, SimpleJumper
from .pvalues import OnlinePValues
from .spc import Chart

DEFAULT_DELTA = 0.01
LINE_ALARMS = ("martingale", "ewma")  # the alarms a station or the service raises
RECENT = 50  # the scores an alarm's description looks back over
NELSON = {1: "a score beyond 3 sigma of the calibration scores", 2: "nine scores in a row on one side of the mean",
          3: "six scores in a row steadily rising or falling", 4: "fourteen scores in a row alternating up and down"}


def reference(task: str, decision: dict) -> tuple[list[float] | None, float | None]:
    """The scores a model's monitor compares new ones with, and the threshold on that scale: an anomaly model's
    calibration scores and threshold; a classification model's non-conformity (1 - top probability) of its held-out
    calibration images (fitted with a calibration fraction), with no threshold. (None, None) when there are none."""
    if task == "anomaly":
        return decision.get("calibration_scores") or None, decision.get("threshold")
    return decision.get("nonconformity_scores") or None, None


def nonconformity(task: str, score: float) -> float:
    """A row's score on the monitor's scale: the anomaly score, or 1 - the top class probability."""
    return float(score) if task == "anomaly" else 1.0 - float(score)


@dataclass
class Monitor:
    calibration: list[float]
    threshold: float | None = None
    delta: float = DEFAULT_DELTA
    jump: float = DEFAULT_JUMP
    seed: int | None = 0
    keep_series: bool = True  # a long-running station keeps no series (its store has the scores)
    # what is raised as an alarm: the service and the station raise the martingale's and the EWMA's only (a Nelson
    # rule 1 would fire on every defect, which the threshold already rejects); the offline report all of them
    kinds: tuple[str, ...] = ("martingale", "ewma", "nelson1", "nelson2", "nelson3", "nelson4")
    alarms: list[dict] = field(default_factory=list)
    series: dict[str, list] = field(default_factory=dict)

    def __post_init__(self):
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        self.calibration = [float(v) for v in self.calibration]
        self.pvalues = OnlinePValues(self.calibration, self.seed)
        self.martingale = SimpleJumper(self.jump)
        self.chart = Chart(self.calibration)
        self._ewma_out = False
        self._rules: set[int] = set()  # the Nelson rules the previous score completed
        self._recent: list[float] = []
        self._row = 0
        for key in ("row", "score", "p_value", "martingale", "ewma", "ewma_lower", "ewma_upper"):
            self.series.setdefault(key, [])
        cal = np.asarray(self.calibration)
        self.cal_median = float(np.median(cal))
        self.cal_over = float(np.mean(cal > self.threshold)) if self.threshold is not None else None

    def restart(self) -> None:
        """Start again from the calibration scores alone (a person reset the monitor after fixing the cause): the
        scores seen so far leave the reference, the martingale and the chart start over; series and alarms stay."""
        self.pvalues = OnlinePValues(self.calibration, self.seed)
        self.martingale = SimpleJumper(self.jump)
        self.chart = Chart(self.calibration)
        self._ewma_out = False
        self._rules = set()
        self._recent = []

    def moved(self) -> str:
        recent = np.asarray(self._recent)
        text = (f"median score {np.median(recent):.4g} over the last {len(recent)} image(s) against "
                f"{self.cal_median:.4g} in calibration")
        if self.threshold is not None:
            text += (f"; {100 * np.mean(recent > self.threshold):.0f}% over the threshold (calibration "
                     f"{100 * self.cal_over:.0f}%)")
        return text

    def _alarm(self, kind: str, value: float, why: str) -> None:
        if kind not in self.kinds:
            return
        self.alarms.append({"row": self._row, "kind": kind, "value": float(value),
                            "message": f"{why}: {self.moved()}"})

    def add(self, score: float, row: int | None = None) -> list[dict]:
        """Take the next score (``row``: its number in the input, default: the next); the alarms it raised."""
        if row is not None:
            self._row = row
        before = len(self.alarms)
        self._recent = (self._recent + [float(score)])[-RECENT:]
        p = self.pvalues(score)
        m = self.martingale.update(p)
        c = self.chart.update(score)
        if self.keep_series:
            for key, value in (("row", self._row), ("score", float(score)), ("p_value", p), ("martingale", m),
                               ("ewma", c["ewma"]), ("ewma_lower", c["lower"]), ("ewma_upper", c["upper"])):
                self.series[key].append(value)
        if m >= 1 / self.delta:
            self._alarm("martingale", m, f"the scores stopped looking like the calibration images (test martingale "
                                         f"{m:.4g} >= 1/delta = {1 / self.delta:.4g})")
            self.martingale.reset()
        if c["out"] and not self._ewma_out:
            self._alarm("ewma", c["ewma"], f"the EWMA of the scores left its control limits [{c['lower']:.4g}, "
                                           f"{c['upper']:.4g}]")
        self._ewma_out = c["out"]
        for rule in c["rules"]:
            if rule not in self._rules:  # a run that goes on is one alarm
                self._alarm(f"nelson{rule}", score, f"Nelson rule {rule} ({NELSON[rule]})")
        self._rules = set(c["rules"])
        self._row += 1
        return self.alarms[before:]

    def run(self, scores: Iterable[float]) -> "Monitor":
        for s in scores:
            self.add(s)
        return self

    def result(self) -> dict:
        return {"alarms": self.alarms, "series": self.series, "delta": self.delta, "threshold": self.threshold,
                "calibration": {"n": len(self.calibration), "median": self.cal_median,
                                "mean": self.chart.mu, "sd": self.chart.sigma,
                                "share_over_threshold": self.cal_over}}
