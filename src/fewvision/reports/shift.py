"""The shift report: one self-contained HTML page for a project (or a station) over a time span - counts, yield, the
images flagged (reject, review, error) as a gallery, the alarms and the model versions in use."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from .monitor import _charts
from .page import _CSS, _e, _kv_table


def _thumbnail(path: Path, side: int = 160) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a moved or unreadable image: the gallery says so
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def shift_report(data: dict) -> str:
    """The HTML page (a string) of what :meth:`fewvision.service.core.Service.shift` gathered."""
    project, m, flagged, versions = data["project"], data["monitor"], data["flagged"], data["versions"]
    total = sum(m["counts"].values())
    cells = []
    for p in flagged:
        uri = _thumbnail(p["image"]) if p["image"] else None
        img = f'<img src="{uri}" alt="{_e(p["filename"])}">' if uri else '<span class="muted">(image gone)</span>'
        score = "" if p["score"] is None else f"score {p['score']:.4g}"
        cells.append(f'<td class="thumb">{img}<br><b>{_e(p["verdict"])}</b> {score}<br>'
                     f'<span class="path">{_e(p["part_id"] or p["filename"])}</span><br>'
                     f'<span class="bad">{_e(p["reason"] or "")}</span></td>')
    gallery = "".join(f"<tr>{''.join(cells[i:i + 6])}</tr>" for i in range(0, len(cells), 6))
    model_rows = "".join(f"<tr><td class=num>{v['version']}</td><td>{_e(v['origin'])}</td>"
                         f"<td class=path>{_e(v['sha256'])}</td></tr>" for v in versions)
    alarms = "".join(f"<tr><td>{_e(a['created_at'])}</td><td>{_e(a['kind'])}</td><td class=note>{_e(a['message'])}"
                     f"</td><td>{'acknowledged ' + _e(a['acknowledged_at']) if a['acknowledged_at'] else 'open'}"
                     "</td></tr>" for a in m["alarms"])
    charts = ""
    if m["monitor"] and m["monitor"]["series"]["score"]:
        s = m["monitor"]["series"]
        charts = "<h2>Scores and drift</h2>" + _charts({
            "series": {"row": s["prediction_id"], **{k: s[k] for k in ("score", "ewma", "ewma_lower", "ewma_upper",
                                                                         "martingale")}},
            "threshold": m["monitor"]["threshold"], "delta": m["monitor"]["delta"],
            "alarms": [{"row": a["prediction_id"], "kind": a["kind"]} for a in m["alarms"]]})
    shown = f", the newest {len(flagged)} shown" if data["n_flagged"] > len(flagged) else ""
    summary = {"project": project["name"], "since": m["since"] or "the beginning", "predictions": total,
               **{data["verdict_of"].get(k, k): v for k, v in sorted(m["counts"].items())},
               "yield": "-" if m["yield"] is None else f"{100 * m['yield']:.1f}%",
               "latency p50 / p95 (ms)": "-" if not m["latency_ms"] else
               f"{m['latency_ms']['p50']:.0f} / {m['latency_ms']['p95']:.0f}",
               "alarms": f"{len(m['alarms'])} ({sum(not a['acknowledged_at'] for a in m['alarms'])} open)"}
    return (f"<!doctype html><html><head><meta charset=utf-8><title>Shift report: {_e(project['name'])}</title>"
            f"<style>{_CSS}</style></head><body><h1>Shift report: {_e(project['name'])}</h1>" + _kv_table(summary)
            + charts
            + f"<h2>Alarms ({len(m['alarms'])})</h2>"
            + (f"<table><tr><th>time</th><th>kind</th><th>what moved</th><th></th></tr>{alarms}</table>" if alarms
               else "<p class=muted>none</p>")
            + f"<h2>Flagged images ({data['n_flagged']}{shown})</h2>"
            + (f"<table>{gallery}</table>" if gallery else "<p class=muted>none</p>")
            + "<h2>Model versions in use</h2><table><tr><th>version</th><th>origin</th><th>sha256</th></tr>"
            + model_rows + "</table></body></html>")
