"""``fewvision monitor SCORES.csv ... --model MODEL``: drift alarms and control charts over scores already written;
``fewvision report``: a shift report of a project or a station from its store."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from .common import CONTEXT, EXIT_CODES_HELP, EXIT_FLAGGED, UserError, check_report, info

EXAMPLE = """

\b
Examples:
  fewvision anomaly predict line3.fvm monday/ -o monday.csv
  fewvision monitor monday.csv tuesday.csv --model line3.fvm -o monitor.json --report monitor/ --exit-code
  fewvision monitor /data/cam1/verdicts.csv --model line3.fvz -o monitor.json      (a station's CSV)
"""


REPORT_EXAMPLE = """

\b
Examples:
  fewvision report --data-dir /srv/fewvision --project "line 3 fabric" --since 8h -o shift.html
  fewvision report --data-dir /data/cam1/station.sqlite --project line3-cam1 --since 12h -o shift.html
"""


def register(app: typer.Typer) -> None:
    app.command("monitor", context_settings=CONTEXT, epilog=EXIT_CODES_HELP + EXAMPLE)(monitor)
    app.command("report", context_settings=CONTEXT, epilog=EXIT_CODES_HELP + REPORT_EXAMPLE)(report)


def read_scores(paths: List[Path], column: str = "score") -> list[float | None]:
    """The ``column`` of every row of the files (``score`` where a file has no such column: a station's CSV), in
    order (None where a row has none: a skipped file)."""
    out: list[float | None] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as err:
            raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
        if path.suffix.lower() == ".jsonl":
            rows = []
            for i, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        raise UserError(f"{path}: line {i} is not JSON") from None
        else:
            rows = list(csv.DictReader(text.splitlines()))
            if rows and column not in rows[0] and "score" in rows[0]:
                rows = [{**r, column: r["score"]} for r in rows]
            if rows and column not in rows[0]:
                raise UserError(f"{path}: no '{column}' column (the rows 'predict', 'anomaly predict' or a station "
                                "writes)")
        for i, row in enumerate(rows, start=1):
            value = row.get(column, row.get("score"))
            if value in (None, ""):
                out.append(None)
                continue
            try:
                score = float(value)
            except (TypeError, ValueError):
                raise UserError(f"{path}: row {i}: {column} {value!r} is not a number") from None
            out.append(score if math.isfinite(score) else None)
    return out


def monitor(
    scores: List[Path] = typer.Argument(..., metavar="SCORES.csv [MORE ...]",
                                        help="rows written by 'anomaly predict' or a station (CSV or JSONL), read "
                                             "in the order given"),
    model: Path = typer.Option(..., "--model", metavar="MODEL", help="the .fvm / .fvz that scored them"),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="monitor.json: alarms and series"),
    report: Optional[Path] = typer.Option(None, "--report", metavar="DIR", help="write DIR/monitor.html"),
    delta: float = typer.Option(0.01, "--delta", min=1e-9, max=0.5, metavar="P",
                                help="the martingale's false-alarm probability"),
    seed: int = typer.Option(0, "--seed", help="seed of the p-values' tie-breaking"),
    exit_code: bool = typer.Option(False, "--exit-code", help="exit 1 when there is an alarm"),
) -> None:
    """Drift alarms over scores already written: each score's conformal p-value against the model's calibration
    scores (a classification model: 1 - the top probability, against its held-out calibration images), a conformal
    test martingale (an alarm when it reaches 1/delta: false with probability at most delta while the images are
    like the calibration images), an EWMA chart with its control limits and the Nelson rules 1-4. Rows are numbered
    from 0 over all the files; rows without a score (skipped files) are passed over."""
    from ..io.atomic import atomic_write_text
    from ..modelfile import ModelFileError, read_metadata
    from ..monitor.watch import Monitor, nonconformity, reference

    check_report(report)
    try:
        meta = read_metadata(model)
    except ModelFileError as err:
        raise UserError(str(err)) from None
    task = meta.get("task", "?")
    calibration, threshold = reference(task, meta.get("decision") or {})
    if not calibration:
        raise UserError(f"{model}: a {task} model without reference scores for the monitor: an anomaly model keeps "
                        "the scores its threshold was set on; a classification model needs held-out calibration "
                        "images (fit with --calibrate-fraction)")
    values = read_scores(scores, "score" if task == "anomaly" else "top_probability")
    mon = Monitor(calibration, threshold=threshold, delta=delta, seed=seed)
    for row, score in enumerate(values):
        if score is not None:
            mon.add(nonconformity(task, score), row=row)
    result = mon.result()
    atomic_write_text(out, json.dumps(result))
    if report is not None:
        from ..reports.monitor import write_monitor_report

        info(f"report: {write_monitor_report(result, report, [str(p) for p in scores])}")
    kinds = sorted({a["kind"] for a in result["alarms"]})
    info(f"{sum(v is not None for v in values)} score(s) of {len(values)} row(s) watched; "
         f"{len(result['alarms'])} alarm(s){' (' + ', '.join(kinds) + ')' if kinds else ''} -> {out}")
    for a in result["alarms"][:5]:
        info(f"  row {a['row']}: {a['kind']}: {a['message']}")
    if exit_code and result["alarms"]:
        raise typer.Exit(EXIT_FLAGGED)


def report(
    project: str = typer.Option(..., "--project", metavar="NAME", help="the project (a station: its name)"),
    data_dir: Path = typer.Option(Path("fewvision-data"), "--data-dir", metavar="DIR",
                                  help="the service's data folder, or a station's store file (station.sqlite)"),
    db: Optional[str] = typer.Option(None, "--db", metavar="URL", help="the database URL [default: SQLite in DIR]"),
    since: str = typer.Option("8h", "--since", metavar="SPAN", help="8h, 30m, 2d or an ISO 8601 time; 'all'"),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="the report, shift.html"),
) -> None:
    """A shift report of a project or a station (docs/monitor.md): counts and yield, the scores with the drift
    monitor, the alarms, the flagged images as a gallery and the model versions in use; one self-contained HTML file
    (the page's Monitor tab links the same report)."""
    from ..io.atomic import atomic_write_text
    from ..reports.shift import shift_report
    from ..service.common import ServiceError
    from .service import _offline_service

    service = _offline_service(data_dir, db)
    try:
        match = [p for p in service.projects() if p["name"] == project or str(p["id"]) == project]
        if not match:
            raise UserError(f"no project {project!r} in {data_dir} (projects: "
                            f"{', '.join(p['name'] for p in service.projects()) or 'none'})")
        try:
            data = service.shift(match[0]["id"], None if since == "all" else since)
        except ServiceError as err:
            raise UserError(err.message) from None
        atomic_write_text(out, shift_report(data))
    finally:
        service.stop()
    m = data["monitor"]
    info(f"{sum(m['counts'].values())} prediction(s) since {m['since'] or 'the beginning'}, "
         f"{data['n_flagged']} flagged, {len(m['alarms'])} alarm(s) -> {out}")
