"""The station's Prometheus metrics (prometheus_client, its own registry, served from a thread on ``/metrics``)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, station: str):
        self.station = station
        self.registry = CollectorRegistry()
        r = self.registry
        self.verdicts = Counter("fewvision_station_verdicts", "Verdicts recorded, by verdict",
                                ["station", "verdict"], registry=r)
        self.latency = Histogram("fewvision_station_latency_seconds",
                                 "From the file found complete to its verdict recorded", ["station"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.delivered = Counter("fewvision_station_sink_delivered", "Messages a sink delivered",
                                 ["station", "sink"], registry=r)
        self.rejected = Counter("fewvision_station_sink_rejected", "Messages a sink's receiver refused for good",
                                ["station", "sink"], registry=r)
        self.failures = Counter("fewvision_station_sink_failures", "Failed deliveries (each is retried)",
                                ["station", "sink"], registry=r)
        self.backlog = Gauge("fewvision_station_sink_backlog", "Messages recorded and not yet delivered by a sink",
                             ["station", "sink"], registry=r)
        self.waiting = Gauge("fewvision_station_files_waiting", "Files in the folder not complete yet",
                             ["station"], registry=r)
        self.last_verdict = Gauge("fewvision_station_last_verdict_timestamp_seconds",
                                  "When the last verdict was recorded (Unix time)", ["station"], registry=r)

    def verdict(self, verdict: str, latency_s: float, at: float) -> None:
        self.verdicts.labels(self.station, verdict).inc()
        self.latency.labels(self.station).observe(latency_s)
        self.last_verdict.labels(self.station).set(at)

    def sink_event(self, sink: str, event: str, n: int) -> None:
        {"delivered": self.delivered, "rejected": self.rejected, "failures": self.failures,
         "failure": self.failures}[event].labels(self.station, sink).inc(n)

    def watch(self, sinks: list[str], backlog: Callable[[str], int], waiting: Callable[[], int]) -> None:
        for name in sinks:
            self.delivered.labels(self.station, name)
            self.rejected.labels(self.station, name)
            self.failures.labels(self.station, name)
            self.backlog.labels(self.station, name).set_function(lambda name=name: backlog(name))
        self.waiting.labels(self.station).set_function(waiting)

    def serve(self, port: int, address: str = "127.0.0.1"):
        server, thread = start_http_server(port, addr=address, registry=self.registry)
        return server
