"""A self-contained HTML report: one .html file, plots and thumbnails embedded as base64 data URIs, no external assets.

With metrics (a labelled test set) it shows the summary with confidence intervals, the confusion matrix, the per-class
table and the misclassified images, most confident mistakes first. Without metrics (prediction only) it lists the
predictions and a bar chart of predicted label counts. All user-provided text goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import io
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io.atomic import atomic_write_text
from ..io.images import BadImage, load_image
from .page import _CSS, _e, _img, _kv_table, _mpl_text, _png_data_uri

THUMB_PX = 128
MAX_MISTAKES = 60
MAX_PREDICTIONS = 200

def confusion_matrix_png(matrix: Sequence[Sequence[int]], row_labels: Sequence[str], col_labels: Sequence[str]) -> str:
    """Confusion-matrix heat map (rows true, columns predicted) with counts in the cells, as a PNG data URI."""
    import numpy as np
    from matplotlib.figure import Figure  # Figure + savefig uses the Agg canvas; no pyplot, no global backend state

    cm = np.asarray(matrix, dtype=float).reshape(len(row_labels), len(col_labels))
    size = 1.5 + 0.55 * max(len(row_labels), len(col_labels), 2)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    from matplotlib.ticker import MaxNLocator

    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, ticks=MaxNLocator(integer=True))  # counts: whole images
    ax.set_xticks(range(len(col_labels)), [_mpl_text(c) for c in col_labels], rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), [_mpl_text(r) for r in row_labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size and cm.max() > 0 else 1
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=9, color="white" if v > threshold else "black")
    return _png_data_uri(fig)


def label_counts_png(labels: Sequence[str]) -> str:
    """Horizontal bar chart of how often each label was predicted, as a PNG data URI."""
    from matplotlib.figure import Figure

    counts = Counter(labels).most_common()
    fig = Figure(figsize=(6, 1 + 0.35 * max(len(counts), 1)))
    ax = fig.add_subplot()
    names = [_mpl_text(k) for k, _ in counts][::-1]
    values = [v for _, v in counts][::-1]
    bars = ax.barh(range(len(values)), values, color="#4a7fb5")
    ax.set_yticks(range(len(values)), names)
    ax.bar_label(bars, padding=2, fontsize=9)
    ax.set_xlabel("images")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("predicted labels")
    return _png_data_uri(fig)


def thumbnail_html(path: str | os.PathLike, size: int = THUMB_PX) -> str:
    """An <img> with an embedded JPEG thumbnail, or the reason the file could not be loaded."""
    try:
        im = load_image(path)
    except BadImage as err:
        return f'<div class="bad">cannot show image: {_e(err.reason)}</div>'
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return _img(uri, Path(path).name)


def _top(row: Mapping[str, Any]) -> float | None:
    """Confidence of a row: the probability of its predicted label, else the highest probability."""
    probs = row.get("probabilities") or {}
    if row.get("label") in probs:
        return float(probs[row["label"]])
    return float(max(probs.values())) if probs else None


def _fmt_p(p: float | None) -> str:
    return "–" if p is None else f"{p:.3f}"


def _image_table(rows: Sequence[Mapping[str, Any]], with_true: bool) -> str:
    head = "<tr><th>image</th><th>file</th>" + ("<th>true</th>" if with_true else "")
    head += "<th>decision</th><th>top class</th><th>probability</th><th>set / reason / note</th></tr>"
    body = []
    for r in rows:
        cells = [f'<td class="thumb">{thumbnail_html(r["path"])}</td>', f'<td class="path">{_e(r["path"])}</td>']
        if with_true:
            cells.append(f"<td>{_e(r.get('true'))}</td>")
        notes = [("set: " + " | ".join(r["set"])) if "set" in r else "", r.get("review_reason") or "",
                 r.get("note") or ""]
        cells += [f"<td>{_e(r.get('label'))}</td>", f"<td>{_e(r.get('top_label', r.get('label')))}</td>",
                  f'<td class="num">{_fmt_p(r.get("top_probability", _top(r)))}</td>',
                  f'<td class="note">{"<br>".join(_e(n) for n in notes if n)}</td>']
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + head + "".join(body) + "</table>"


def _summary(metrics: Mapping[str, Any]) -> str:
    ci = metrics.get("ci", {})
    level = metrics.get("ci_method", {}).get("confidence", 0.95)
    lines = [("test images", str(metrics["n"]))]
    for key, name in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1")):
        text = f"{metrics[key]:.3f}"
        if key in ci:
            text += f" ({level:.0%} CI {ci[key][0]:.3f} – {ci[key][1]:.3f})"
        lines.append((name, text))
    if metrics.get("ece") is not None:
        lines.append(("expected calibration error", f"{metrics['ece']:.3f} (0 = probabilities match the hit rate)"))
    if metrics.get("coverage") is not None:
        alpha = metrics.get("conformal_alpha")
        target = f", target at least {1 - alpha:.0%}" if alpha is not None else ""
        lines.append(("prediction-set coverage", f"{metrics['coverage']:.3f}{target}"))
        lines.append(("mean prediction-set size", f"{metrics['mean_set_size']:.2f} classes"))
    if metrics.get("n_review"):
        rate = f" ({metrics['review_rate']:.1%})" if metrics.get("review_rate") is not None else ""
        lines.append(("sent to review", f"{metrics['n_review']}{rate}"))
    return _kv_table(dict(lines))


def _per_class(metrics: Mapping[str, Any]) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    body = "".join(
        f"<tr><td>{_e(name)}</td><td class='num'>{m['precision']:.3f}</td><td class='num'>{m['recall']:.3f}</td>"
        f"<td class='num'>{m['f1']:.3f}</td><td class='num'>{int(m['support'])}</td></tr>"
        for name, m in metrics["per_class"].items()
    )
    return "<table>" + head + body + "</table>"


def _mistakes(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    wrong = [r for r in rows if r.get("true") is not None and r.get("label") != r.get("true")]
    return sorted(wrong, key=lambda r: -(_top(r) or 0.0))  # stable: ties keep input order


def write_classification_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    metrics: Mapping[str, Any] | None,
    rows: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (atomically) and return its path.

    ``rows``: dicts with ``path``, ``label`` (predicted name), ``true`` (name or None), ``probabilities``
    (name -> float) and optionally ``note``. ``metrics``: from :func:`fewvision.metrics.classification.classification_metrics`,
    or None for a prediction-only report.
    """
    parts = [f"<h1>{_e(title)}</h1>"]
    if metrics is not None:
        parts += ["<h2>Summary</h2>", _summary(metrics)]
        if extra:
            parts += ["<h2>Run</h2>", _kv_table(extra)]
        labels = metrics.get("confusion_labels", list(class_names))
        matrix = metrics["confusion_matrix"]
        rows_lab = metrics.get("class_names", list(class_names))
        parts += ["<h2>Confusion matrix</h2>", _img(confusion_matrix_png(matrix, rows_lab, labels), "confusion matrix")]
        parts += ["<h2>Per-class metrics</h2>", _per_class(metrics)]
        wrong = _mistakes(rows)
        shown = wrong[:MAX_MISTAKES]
        parts.append("<h2>Misclassified images</h2>")
        if not wrong:
            parts.append('<p class="muted">No misclassified images.</p>')
        else:
            parts.append(f"<p>{len(wrong)} misclassified; showing {len(shown)}, most confident mistakes first.</p>")
            parts.append(_image_table(shown, with_true=True))
    else:
        parts += ["<h2>Summary</h2>", _kv_table({"images": len(rows), "classes": ", ".join(map(str, class_names))})]
        if extra:
            parts += ["<h2>Run</h2>", _kv_table(extra)]
        if rows:
            parts += ["<h2>Predicted labels</h2>",
                      _img(label_counts_png([str(r.get("label")) for r in rows]), "predicted label counts")]
        shown = list(rows[:MAX_PREDICTIONS])
        parts.append("<h2>Predictions</h2>")
        if len(rows) > len(shown):
            parts.append(f"<p>Showing the first {len(shown)} of {len(rows)} images.</p>")
        parts.append(_image_table(shown, with_true=False) if shown else '<p class="muted">No predictions.</p>')

    html = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    return atomic_write_text(Path(out_dir) / "report.html", html)
