"""The Simple Jumper conformal test martingale (Vovk, Petej, Nouretdinov, Ahlberg, Carlsson, Gammerman, "Retrain or
not retrain: conformal test martingales for change-point detection", COPA 2021, Algorithm 1).

Three betting functions f_e(p) = 1 + e (p - 1/2), e in {-1, 0, 1}, bet on small p-values (scores went up), on
nothing, and on large p-values (scores went down); at every step a fraction J of the capital jumps between them, so
the martingale follows a change that comes after a long quiet period. Each f_e integrates to 1 over [0, 1], so with
independent uniform p-values the capital S_t is a non-negative martingale with S_0 = 1, and by Ville's inequality
P(sup_t S_t >= 1 / delta) <= delta: an alarm at 1 / delta is false with probability at most delta over the whole
stream, however long it runs.
"""

from __future__ import annotations

EPSILONS = (-1.0, 0.0, 1.0)
DEFAULT_JUMP = 0.01


class SimpleJumper:
    def __init__(self, jump: float = DEFAULT_JUMP):
        if not 0 <= jump <= 1:
            raise ValueError(f"the jumping rate must be in [0, 1], got {jump}")
        self.jump = jump
        self.reset()

    def reset(self) -> None:
        self.capital = {e: 1 / 3 for e in EPSILONS}

    @property
    def value(self) -> float:
        return sum(self.capital.values())

    def update(self, p: float) -> float:
        """The martingale's value after the p-value ``p``."""
        total = self.value
        for e in EPSILONS:
            self.capital[e] = ((1 - self.jump) * self.capital[e] + self.jump * total / 3) * (1 + e * (p - 0.5))
        return self.value

    def state(self) -> dict:
        return {"jump": self.jump, "capital": [self.capital[e] for e in EPSILONS]}

    @classmethod
    def from_state(cls, state: dict) -> "SimpleJumper":
        m = cls(state["jump"])
        m.capital = dict(zip(EPSILONS, state["capital"]))
        return m
