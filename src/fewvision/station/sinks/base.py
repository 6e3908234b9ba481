"""What every sink shares: the protocol, the refusal a receiver gives, option checks."""

from __future__ import annotations

from typing import Protocol


class Rejected(Exception):
    """The receiver refused the message itself (e.g. HTTP 4xx): sending it again would not help."""


class Sink(Protocol):
    name: str

    def open(self) -> None: ...

    def send(self, message: dict) -> None: ...

    def close(self) -> None: ...


def known_options(options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def positive(options: dict, key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key}: expected a number > 0, got {value!r}")
    return float(value)
