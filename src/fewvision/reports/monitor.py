"""The monitor's HTML page: the scores with the threshold, the EWMA and its control limits, the test martingale on a
log scale with 1 / delta, alarms marked; one self-contained file."""

from __future__ import annotations

from pathlib import Path

from ..io.atomic import atomic_write_text
from .page import _CSS, _e, _img, _kv_table, _png_data_uri

COLOURS = {"martingale": "#c0392b", "ewma": "#8e44ad"}


def _charts(result: dict) -> str:
    from matplotlib.figure import Figure

    s = result["series"]
    fig = Figure(figsize=(11, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(s["row"], s["score"], ".", ms=3, color="#555", label="score")
    top.plot(s["row"], s["ewma"], color="#8e44ad", lw=1.5, label="EWMA (lambda 0.2)")
    top.plot(s["row"], s["ewma_upper"], "--", color="#8e44ad", lw=0.8, label="control limits")
    top.plot(s["row"], s["ewma_lower"], "--", color="#8e44ad", lw=0.8)
    if result["threshold"] is not None:
        top.axhline(result["threshold"], color="#c0392b", lw=1, label="threshold")
    top.set_ylabel("score")
    top.legend(loc="upper left", fontsize=8)
    bottom.semilogy(s["row"], s["martingale"], color="#2c3e50", lw=1.2, label="test martingale")
    bottom.axhline(1 / result["delta"], color="#c0392b", lw=1, label=f"1/delta = {1 / result['delta']:g}")
    bottom.set_ylabel("martingale")
    bottom.set_xlabel("row")
    bottom.legend(loc="upper left", fontsize=8)
    for a in result["alarms"]:
        if a["kind"] in COLOURS:
            for ax in (top, bottom):
                ax.axvline(a["row"], color=COLOURS[a["kind"]], lw=0.8, alpha=0.6)
    return _img(_png_data_uri(fig), "scores, EWMA and the test martingale")


def write_monitor_report(result: dict, out_dir: str | Path, sources: list[str]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cal = result["calibration"]
    rows = "".join(f"<tr><td class=num>{a['row']}</td><td>{_e(a['kind'])}</td><td class=num>{a['value']:.4g}</td>"
                   f"<td class=note>{_e(a['message'])}</td></tr>" for a in result["alarms"])
    html = (f"<!doctype html><html><head><meta charset=utf-8><title>fewvision monitor</title><style>{_CSS}</style>"
            f"</head><body><h1>Monitor</h1>"
            + _kv_table({"rows read": len(result["series"]["row"]), "from": ", ".join(sources),
                         "delta (false-alarm probability of the martingale)": result["delta"],
                         "threshold": result["threshold"], "calibration scores": cal["n"],
                         "calibration median": f"{cal['median']:.4g}"})
            + "<h2>Charts</h2>" + _charts(result)
            + f"<h2>Alarms ({len(result['alarms'])})</h2>"
            + (f"<table><tr><th>row</th><th>kind</th><th>value</th><th>what moved</th></tr>{rows}</table>"
               if rows else "<p class=muted>none</p>")
            + "<p class=muted>A martingale alarm says the scores stopped being exchangeable with the calibration "
              "images' scores; its chance of being false is at most delta. It cannot tell drift from a rise in "
              "defects: the 'what moved' column says how the scores changed.</p></body></html>")
    path = out / "monitor.html"
    atomic_write_text(path, html)
    return path
