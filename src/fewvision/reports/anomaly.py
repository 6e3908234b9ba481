"""The anomaly-detection HTML report and heat-map images.

One self-contained ``report.html`` (PNG plots and overlays embedded as data URIs): the metrics, histograms of the
scores of good and defective images with the threshold, the ROC curve, and heat-map overlays (matplotlib ``jet``
with alpha over the image, in the geometry the model saw) of the highest- and lowest-scored images.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..anomaly.postprocess import input_view
from ..io.atomic import atomic_path, atomic_write_text
from ..io.images import BadImage, load_image
from .page import _CSS, _e, _img, _kv_table, _png_data_uri

N_EXTREMES = 8
OVERLAY_ALPHA = 0.5


def overlay_rgb(image: np.ndarray, heat: np.ndarray, vrange: Sequence[float], alpha: float = OVERLAY_ALPHA,
                mask: np.ndarray | None = None) -> np.ndarray:
    """``image`` [H, W, 3] in 0..1 blended with ``heat`` [H, W] through ``jet`` over ``vrange``; uint8 RGB.

    With a ground-truth ``mask`` its outline is drawn in white.
    """
    from matplotlib import colormaps

    lo, hi = float(vrange[0]), float(vrange[1])
    norm = np.clip((np.asarray(heat, dtype=np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
    colour = colormaps["jet"](norm)[..., :3]
    out = (1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * colour
    if mask is not None and mask.any():
        m = mask.astype(bool)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 1.0
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def overlay_for(path: str, heat: np.ndarray, preprocess, vrange: Sequence[float],
                mask: np.ndarray | None = None) -> np.ndarray:
    """Heat-map overlay of an image file (raises :class:`BadImage` if it cannot be read)."""
    view = input_view(load_image(path), preprocess, heat.shape)
    return overlay_rgb(view, heat, vrange, mask=mask)


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB array as PNG atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return Path(path)


def _png_uri(rgb: np.ndarray, max_px: int = 256) -> str:
    from PIL import Image

    im = Image.fromarray(rgb)
    im.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histogram_png(scores: np.ndarray, is_defect: np.ndarray | None, threshold: float | None) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.2))
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(scores, bins=40) if len(scores) else 10
    if is_defect is None:
        ax.hist(scores, bins=bins, color="#4a7fb5", alpha=0.8, label="images")
    else:
        ax.hist(scores[~is_defect], bins=bins, color="#3a9a4a", alpha=0.6, label=f"good ({int((~is_defect).sum())})")
        ax.hist(scores[is_defect], bins=bins, color="#c0392b", alpha=0.6, label=f"defective ({int(is_defect.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return _png_data_uri(fig)


def roc_png(scores: np.ndarray, is_defect: np.ndarray, auroc: float | None) -> str:
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(is_defect, scores)
    fig = Figure(figsize=(3.8, 3.6))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="#4a7fb5", label=f"AUROC {auroc:.3f}" if auroc is not None else None)
    ax.plot([0, 1], [0, 1], color="#aaa", linestyle=":")
    ax.set_xlabel("false-positive rate (good flagged)")
    ax.set_ylabel("true-positive rate (defects caught)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    if auroc is not None:
        ax.legend(loc="lower right", fontsize=8)
    return _png_data_uri(fig)


def _overlay_table(rows: Sequence[Mapping[str, Any]], indices: Sequence[int], maps: np.ndarray, preprocess,
                   vrange: Sequence[float], masks: Sequence[np.ndarray | None] | None) -> str:
    cells = []
    for i in indices:
        r = rows[i]
        try:
            rgb = overlay_for(r["path"], maps[i], preprocess, vrange, None if masks is None else masks[i])
            pic = _img(_png_uri(rgb), Path(r["path"]).name)
        except BadImage as err:
            pic = f'<div class="bad">cannot show image: {_e(err.reason)}</div>'
        flag = {True: "anomalous", False: "ok", None: ""}[r.get("is_anomalous")]
        true = f"<br>true: {_e(r['true'])}" if r.get("true") is not None else ""
        cells.append(f'<td class="thumb" style="width:260px">{pic}<div class="path">{_e(Path(r["path"]).name)}</div>'
                     f"score {r['score']:.4g} {flag}{true}</td>")
    rows_html = ["<tr>" + "".join(cells[k : k + 4]) + "</tr>" for k in range(0, len(cells), 4)]
    return "<table>" + "".join(rows_html) + "</table>"


def write_anomaly_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    maps: np.ndarray,
    preprocess,
    heatmap_range: Sequence[float],
    threshold: float | None,
    metrics: Mapping[str, Any] | None = None,
    is_defect: np.ndarray | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    extra: Mapping[str, Any] | None = None,
    n_extremes: int = N_EXTREMES,
) -> Path:
    """Write ``out_dir/report.html`` atomically and return its path."""
    scores = np.array([r["score"] for r in rows], dtype=np.float64)
    parts = [f"<h1>{_e(title)}</h1>"]
    summary: dict[str, Any] = {"images": len(rows)}
    if threshold is not None:
        summary["threshold (score > t is anomalous)"] = f"{threshold:.6g}"
        summary["flagged anomalous"] = sum(1 for r in rows if r.get("is_anomalous"))
    if metrics:
        for key in ("image_auroc", "image_aupr", "image_f1", "false_reject_rate", "miss_rate", "pixel_auroc", "aupro"):
            if metrics.get(key) is not None:
                text = f"{metrics[key]:.4f}"
                if key == "image_auroc" and metrics.get("image_auroc_ci"):
                    lo, hi = metrics["image_auroc_ci"]
                    text += f" (95% CI {lo:.3f} - {hi:.3f})"
                summary[key.replace("_", " ")] = text
        for key in ("n_good", "n_defect", "target_false_reject"):
            if metrics.get(key) is not None:
                summary[key.replace("_", " ")] = metrics[key]
    parts += ["<h2>Summary</h2>", _kv_table(summary)]
    if extra:
        parts += ["<h2>Run</h2>", _kv_table(extra)]
    if metrics and metrics.get("per_defect_type"):
        head = "<tr><th>defect type</th><th>images</th><th>AUROC</th><th>miss rate</th></tr>"
        body = "".join(
            f"<tr><td>{_e(k)}</td><td class='num'>{v.get('n_defect')}</td>"
            f"<td class='num'>{'' if v.get('image_auroc') is None else format(v['image_auroc'], '.4f')}</td>"
            f"<td class='num'>{'' if v.get('miss_rate') is None else format(v['miss_rate'], '.3f')}</td></tr>"
            for k, v in metrics["per_defect_type"].items())
        parts += ["<h2>Per defect type</h2>", "<table>" + head + body + "</table>"]
    if len(rows):
        parts += ["<h2>Scores</h2>", _img(histogram_png(scores, is_defect, threshold), "score histogram")]
        if is_defect is not None and is_defect.any() and (~is_defect).any():
            parts.append(_img(roc_png(scores, is_defect, (metrics or {}).get("image_auroc")), "ROC curve"))
        order = np.argsort(-scores, kind="stable")
        k = min(n_extremes, len(rows))
        parts += ["<h2>Highest-scored images</h2>",
                  _overlay_table(rows, order[:k], maps, preprocess, heatmap_range, masks)]
        parts += ["<h2>Lowest-scored images</h2>",
                  _overlay_table(rows, order[::-1][:k], maps, preprocess, heatmap_range, masks)]
        parts.append(f'<p class="muted">Heat maps: jet colour map over [{heatmap_range[0]:.4g}, '
                     f"{heatmap_range[1]:.4g}]; white outlines are ground-truth defects.</p>")
    else:
        parts.append('<p class="muted">No images could be scored.</p>')
    html = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return atomic_write_text(Path(out_dir) / "report.html", html)
