"""``fewvision station run | status STATION.yaml``: a line station over a hot folder (docs/station.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import CONTEXT, EXIT_CODES_HELP, UserError, info

RUN_EXAMPLE = """

\b
Examples:
  fewvision station run line3-cam1.yaml
  fewvision station run line3-cam1.yaml --metrics-port 9108     (Prometheus: http://127.0.0.1:9108/metrics)
  fewvision station status line3-cam1.yaml
"""


def register(app: typer.Typer) -> None:
    station_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT,
                              help="Judge the images a camera writes into a folder and send the verdicts to MQTT, "
                                   "OPC UA, webhooks and CSV (docs/station.md).")
    app.add_typer(station_app, name="station")
    station_app.command("run", context_settings=CONTEXT, epilog=EXIT_CODES_HELP + RUN_EXAMPLE)(run)
    station_app.command("status", context_settings=CONTEXT, epilog=EXIT_CODES_HELP)(status)


def _config(path: Path):
    from ..station.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as err:
        raise UserError(str(err)) from None


def run(
    station_file: Path = typer.Argument(..., metavar="STATION.yaml", help="the station's configuration"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=1, max=65535, metavar="PORT",
                                               help="serve Prometheus metrics on http://ADDRESS:PORT/metrics "
                                                    "[default: metrics.port in the file, else none]"),
    metrics_address: Optional[str] = typer.Option(None, "--metrics-address", metavar="ADDRESS",
                                                  help="address the metrics listen on [default: metrics.address, "
                                                       "else 127.0.0.1]"),
) -> None:
    """Run a station until stopped (SIGTERM or Ctrl-C finish the image being judged, then stop): every complete
    image in the source folder judged once, recorded in the store, sent to every sink at least once, moved to the
    folder of its verdict."""
    import logging
    import signal
    import threading

    from ..station.run import Station, StationBusy

    config = _config(station_file)
    if metrics_address:
        config.metrics_address = metrics_address
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        station = Station(config, metrics_port=metrics_port)
    except StationBusy as err:
        raise UserError(str(err)) from None
    except RuntimeError as err:
        raise UserError(str(err)) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    station.start()
    sinks = ", ".join(f"{s.name} ({s.kind})" for s in config.sinks) or "none"
    metrics = (f"; metrics on http://{config.metrics_address}:{station.metrics_port}/metrics"
               if station.metrics_port else "")
    info(f"station {config.name}: watching {config.source.folder} with {config.model.name} (sha256 "
         f"{station.model_sha256[:16]}, model version {station.version}); sinks: {sinks}{metrics}")
    try:
        station.run(stop)
    finally:
        station.close()
    info(f"station {config.name}: stopped after {station.judged} verdict(s)")


def status(
    station_file: Path = typer.Argument(..., metavar="STATION.yaml", help="the station's configuration"),
    as_json: bool = typer.Option(False, "--json", help="print the status as one JSON object"),
) -> None:
    """Verdicts per verdict, each sink's backlog, deliveries and last error, the last verdict and the last error,
    the drift alarms nobody acknowledged yet, from the station's store (whether the station runs or not)."""
    from ..station.status import station_status

    config = _config(station_file)
    try:
        st = station_status(config)
    except RuntimeError as err:
        raise UserError(str(err)) from None
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"station {st['station']}  store {st['store']}")
    if st.get("note"):
        typer.echo(st["note"])
        return
    counts = "  ".join(f"{v} {st['verdicts'].get(v, 0)}" for v in ("ok", "ng", "review", "error"))
    typer.echo(f"verdicts  {counts}  (total {st['total']})")
    last = st["last_verdict"]
    if last:
        typer.echo(f"last      {last['time']}  {last['verdict']}  part {last['part_id']}  {last['path']}")
    err = st["last_error"]
    if err:
        typer.echo(f"error     {err['time']}  part {err['part_id']}: {err['reason']}")
    for a in st["open_alarms"][-3:]:
        typer.echo(f"alarm     {a['created_at']}  {a['kind']}: {a['message']}")
    if len(st["open_alarms"]) > 3:
        typer.echo(f"          ({len(st['open_alarms'])} open alarms in all)")
    for s in st["sinks"]:
        line = (f"sink      {s['name']} ({s['kind']}): backlog {s['backlog']}, delivered {s['delivered']}, "
                f"refused {s['rejected']}, failed attempts {s['failures']}")
        if s["last_error"]:
            line += f"; last error {s['last_error_at']}: {s['last_error']}"
        typer.echo(line)
