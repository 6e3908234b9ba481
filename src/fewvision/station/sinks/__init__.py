"""Where a station's messages go: one small module per kind behind one protocol, created by :func:`create_sink`.

A sink's ``send`` either returns (delivered), raises :class:`Rejected` (the receiver refused this message for good:
logged, counted, and the cursor moves past it) or raises anything else (not delivered: retried with back-off, the
same message first, so the order is kept). Delivery is at least once; every message carries its stable ``id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from . import csv_file, mqtt, opcua, webhook
from .base import Rejected, Sink

__all__ = ["Rejected", "Sink", "check_options", "create_sink"]


KINDS = {"mqtt": mqtt, "opcua": opcua, "webhook": webhook, "csv": csv_file}  # each: check_options and its Sink
SINKS: dict[str, Callable[..., Sink]] = {"mqtt": mqtt.MqttSink, "opcua": opcua.OpcUaSink,
                                         "webhook": webhook.WebhookSink, "csv": csv_file.CsvSink}


def check_options(kind: str, options: dict[str, Any], base: Path) -> dict[str, Any]:
    """The sink's options with defaults filled in; ValueError naming the option when one is wrong."""
    return KINDS[kind].check_options(dict(options), base)


def create_sink(kind: str, name: str, options: dict[str, Any], station: str, context: dict[str, Any]) -> Sink:
    """``context``: what a sink may need from its station (``model_sha256``, ``counts`` - verdicts delivered so
    far, per verdict)."""
    return SINKS[kind](name, options, station, context)
