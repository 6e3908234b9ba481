"""OPC UA sink (asyncua): the station serves its state as variables a PLC, SCADA or MES reads or subscribes to.

Under the object ``<station>`` in the namespace ``namespace``, with string node ids ``<station>.<Variable>`` that
stay the same across restarts: LastVerdict, LastScore, LastPartId, LastId, LastTime, LastLatencyMs,
LastRegionCount and LastLargestRegionPct (an anomaly verdict's defect regions: how many, the largest one's share of
the image in %, NaN without one), OkCount, NgCount, ReviewCount, ErrorCount, Heartbeat (counts up every second while the station runs), ModelSha256, Alarm and
AlarmMessage. Delivering a message is writing it into these variables; the counters start from the verdicts
delivered before a restart.
"""

from __future__ import annotations

import math
import threading
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from .base import known_options

COUNTERS = {"ok": "OkCount", "ng": "NgCount", "review": "ReviewCount", "error": "ErrorCount"}


def check_options(options: dict, base: Path) -> dict:
    known_options(options, {"endpoint", "namespace"})
    endpoint = options.get("endpoint", "opc.tcp://0.0.0.0:4840/fewvision/")
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme != "opc.tcp" or not parts.hostname:
        raise ValueError(f"endpoint: expected opc.tcp://HOST:PORT/PATH, got {endpoint!r}")
    namespace = options.get("namespace", "urn:fewvision:station")
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace: expected a URI, got {namespace!r}")
    return {"endpoint": endpoint, "namespace": namespace}


class OpcUaSink:
    def __init__(self, name: str, options: dict, station: str, context: dict):
        self.name, self.options, self.station = name, options, station
        self.model_sha256 = context.get("model_sha256", "")
        self.counts = {v: int(context.get("counts", {}).get(v, 0)) for v in COUNTERS}
        self.server = None
        self.nodes: dict = {}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def open(self) -> None:
        from asyncua import ua
        from asyncua.sync import Server

        server = Server()
        server.set_endpoint(self.options["endpoint"])
        server.set_server_name(f"fewvision station {self.station}")
        idx = server.register_namespace(self.options["namespace"])
        obj = server.nodes.objects.add_object(ua.NodeId(self.station, idx), self.station)
        variables = {"LastVerdict": ("", ua.VariantType.String), "LastScore": (math.nan, ua.VariantType.Double),
                     "LastPartId": ("", ua.VariantType.String), "LastId": ("", ua.VariantType.String),
                     "LastTime": (datetime(1970, 1, 1, tzinfo=timezone.utc), ua.VariantType.DateTime),
                     "LastLatencyMs": (math.nan, ua.VariantType.Double),
                     "LastRegionCount": (0, ua.VariantType.Int32),
                     "LastLargestRegionPct": (math.nan, ua.VariantType.Double),
                     **{node: (self.counts[v], ua.VariantType.Int64) for v, node in COUNTERS.items()},
                     "Heartbeat": (0, ua.VariantType.Int64),
                     "ModelSha256": (self.model_sha256, ua.VariantType.String),
                     "Alarm": (False, ua.VariantType.Boolean), "AlarmMessage": ("", ua.VariantType.String)}
        for key, (value, vtype) in variables.items():
            self.nodes[key] = (obj.add_variable(ua.NodeId(f"{self.station}.{key}", idx), key,
                                                ua.Variant(value, vtype)), vtype)
        server.start()
        self.server = server
        self._heartbeat = threading.Thread(target=self._beat, name=f"fewvision-opcua-heartbeat-{self.name}",
                                           daemon=True)
        self._heartbeat.start()

    def _write(self, key: str, value) -> None:
        from asyncua import ua

        node, vtype = self.nodes[key]
        node.write_value(ua.DataValue(ua.Variant(value, vtype)))

    def _beat(self) -> None:
        beats = 0
        while not self._stop.wait(1.0):
            beats += 1
            try:
                self._write("Heartbeat", beats)
            except Exception:  # noqa: BLE001 - the server is stopping
                return

    def send(self, message: dict) -> None:
        if message.get("kind") == "alarm":
            self._write("Alarm", bool(message.get("active", True)))
            self._write("AlarmMessage", str(message.get("message", "")))
            return
        verdict = message.get("verdict", "")
        score = message.get("score")
        self._write("LastVerdict", verdict)
        self._write("LastScore", math.nan if score is None else float(score))
        self._write("LastPartId", str(message.get("part_id") or ""))
        self._write("LastTime", datetime.fromisoformat(message["time"].replace("Z", "+00:00"))
                    if message.get("time") else datetime.now(timezone.utc))
        latency = message.get("latency_ms")
        self._write("LastLatencyMs", math.nan if latency is None else float(latency))
        # anomaly models: the defect regions above the map threshold (0 and NaN for classification)
        self._write("LastRegionCount", int(message.get("n_regions") or 0))
        pct = message.get("largest_region_pct")
        self._write("LastLargestRegionPct", math.nan if pct is None or not message.get("n_regions") else float(pct))
        if verdict in self.counts:
            self.counts[verdict] += 1
            self._write(COUNTERS[verdict], self.counts[verdict])
        self._write("LastId", str(message.get("id", "")))  # last: a client that sees a new id sees the rest too

    def close(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()
            self.server = None
