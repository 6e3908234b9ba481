"""The anomaly-detection HTML reports and heat-map images.

Heat maps show each pixel's excess over the median map of the good images the model was calibrated on (stored with
the model as ``heatmap_baseline``), through matplotlib's ``jet`` from no excess to twice the largest excess of a good
image: what every good image has - a brighter frame where the features see the image border, a lighting gradient -
stays dark, and only what differs lights up.

* :func:`heatmap_image`: one PNG per image for a line operator: the image and the overlay side by side at the
  image's own resolution, score, threshold and verdict on top, a colour bar at the side. Parts of the image the model
  did not see (outside the backbone's centre crop) are left uncoloured.
* :func:`write_anomaly_report`: one self-contained ``report.html`` (everything embedded). After ``anomaly eval``:
  metrics, the threshold and what it guarantees, the labelled thresholds, score histogram and ROC, and galleries of
  the missed defects and the false rejects. After ``anomaly predict --report``: a daily gallery, flagged images
  first, then those nearest the threshold.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..io.geometry import image_coordinates, input_view, resize_bilinear
from ..io.atomic import atomic_path, atomic_write_text
from ..io.images import BadImage, load_image
from ..metrics.ranking import roc_curve
from .page import _CSS, _e, _img, _kv_table, _png_data_uri

GALLERY = 12
OVERLAY_ALPHA = 0.5
MAX_HEATMAP_SIDE = 4096  # heat-map files are at the image's own resolution, up to this many pixels a side


def display_map(heat: np.ndarray, decision: Mapping[str, Any]) -> np.ndarray:
    """A finished map minus the model's median good map (up-sampled to the map's size), when the model has one."""
    baseline = decision.get("heatmap_baseline")
    if not baseline:
        return np.asarray(heat, dtype=np.float32)
    up = resize_bilinear(np.asarray(baseline, dtype=np.float32), tuple(heat.shape))
    return np.asarray(heat, dtype=np.float32) - up


# matplotlib's ``jet`` (its breakpoints, matplotlib._cm._jet_data) as the 256-entry table matplotlib builds from
# them, so heat maps are drawn without matplotlib on the light install (tested equal to matplotlib's bytes).
_JET = {"red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0))}
_JET_N = 256
_JET_BYTES = np.stack([(np.interp(np.linspace(0, 1, _JET_N), *zip(*_JET[c])) * 255).astype(np.uint8)
                       for c in ("red", "green", "blue")], axis=1)


def colours(heat: np.ndarray, vrange: Sequence[float]) -> np.ndarray:
    """``jet`` colours [..., 3] in 0..1 of ``heat`` over ``vrange`` (float32)."""
    lo, hi = float(vrange[0]), float(vrange[1])
    norm = np.clip((np.asarray(heat, dtype=np.float32) - lo) / max(hi - lo, 1e-12), 0, 1)
    index = (norm * np.float32(_JET_N)).astype(np.int64)  # as matplotlib indexes its table: x * N, 1.0 -> N - 1
    return _JET_BYTES[np.minimum(index, _JET_N - 1)].astype(np.float32) / 255.0


def overlay_rgb(image: np.ndarray, heat: np.ndarray, vrange: Sequence[float], alpha: float = OVERLAY_ALPHA,
                mask: np.ndarray | None = None) -> np.ndarray:
    """``image`` [H, W, 3] in 0..1 blended with ``heat`` [H, W] through ``jet`` over ``vrange``; uint8 RGB. Pixels
    where ``heat`` is NaN keep the image. With a ground-truth ``mask`` its outline is drawn in white."""
    heat = np.asarray(heat, dtype=np.float32)
    seen = np.isfinite(heat)
    colour = colours(np.where(seen, heat, 0.0), vrange)
    out = np.asarray(image, dtype=np.float32).copy()
    out[seen] = (1 - alpha) * out[seen] + alpha * colour[seen]
    if mask is not None and mask.any():
        m = mask.astype(bool)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 1.0
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def overlay_for(path: str, heat: np.ndarray, preprocess, decision: Mapping[str, Any],
                mask: np.ndarray | None = None) -> np.ndarray:
    """Heat-map overlay in the geometry the model saw (report thumbnails); raises :class:`BadImage`."""
    view = input_view(load_image(path), preprocess, heat.shape)
    return overlay_rgb(view, display_map(heat, decision), decision.get("heatmap_range") or [0.0, 1.0], mask=mask)


def map_on_image(heat: np.ndarray, preprocess, width: int, height: int) -> np.ndarray:
    """A map in the model's geometry placed on the original ``width`` x ``height`` image: [height, width], NaN where
    the model saw nothing (outside its crop). The crop box comes from the backbone's own preprocessing."""
    from PIL import Image

    xs, ys = image_coordinates(preprocess, width, height, tuple(heat.shape))
    x0, x1 = int(np.floor(xs.min())), int(np.ceil(xs.max())) + 1
    y0, y1 = int(np.floor(ys.min())), int(np.ceil(ys.max())) + 1
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    out = np.full((height, width), np.nan, dtype=np.float32)
    resized = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F").resize((x1 - x0, y1 - y0),
                                                                                  Image.Resampling.BILINEAR)
    out[y0:y1, x0:x1] = np.asarray(resized)
    return out


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=max(10, int(size)))


def capped(image, max_side: int):
    """``image`` (PIL) scaled down to at most ``max_side`` pixels a side, its aspect kept."""
    scale = min(1.0, max_side / max(image.size))
    if scale >= 1.0:
        return image
    return image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                        reducing_gap=2.0)  # a box reduction first: a 40 MP image in a fraction of a second


REGION_COLOUR = (255, 0, 255)  # magenta: no colour of the jet scale


def draw_regions(picture, regions: Sequence[Mapping[str, Any]] | None, scale: float,
                 offset: tuple[int, int] = (0, 0)) -> None:
    """Outline each defect region's box (image pixels, scaled by ``scale`` and shifted by ``offset``) on
    ``picture`` (PIL, in place)."""
    from PIL import ImageDraw

    if not regions:
        return
    draw = ImageDraw.Draw(picture)
    line = max(2, round(max(picture.size) / 400))
    for r in regions:
        x0, y0 = offset[0] + r["x"] * scale, offset[1] + r["y"] * scale
        x1, y1 = x0 + max(r["width"] * scale, 1), y0 + max(r["height"] * scale, 1)
        draw.rectangle([x0 - line, y0 - line, x1 + line - 1, y1 + line - 1], outline=REGION_COLOUR, width=line)


def overlay_on_image(path: str, heat: np.ndarray, preprocess, decision: Mapping[str, Any],
                     max_side: int = MAX_HEATMAP_SIDE, regions: Sequence[Mapping[str, Any]] | None = None
                     ) -> np.ndarray:
    """The heat map over the whole image at the image's own resolution, at most ``max_side`` pixels a side, the
    defect regions' boxes outlined (uint8 RGB); raises :class:`BadImage`."""
    from PIL import Image

    original = load_image(path)
    image = capped(original, max_side)
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    placed = map_on_image(display_map(heat, decision), preprocess, image.width, image.height)
    picture = Image.fromarray(overlay_rgb(rgb, placed, decision.get("heatmap_range") or [0.0, 1.0]))
    draw_regions(picture, regions, image.width / original.width)
    return np.asarray(picture)


def heatmap_image(path: str, heat: np.ndarray, preprocess, decision: Mapping[str, Any], *, score: float,
                  verdict: str | None, regions: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
    """The image and its heat-map overlay side by side at the image's own resolution (at most
    ``MAX_HEATMAP_SIDE`` a side), the defect regions outlined on the overlay, a header with score, threshold and
    verdict, and a colour bar; uint8 RGB."""
    from PIL import Image, ImageDraw

    original = load_image(path)
    image = capped(original, MAX_HEATMAP_SIDE)
    w, h = image.size
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    vrange = decision.get("heatmap_range") or [0.0, 1.0]
    placed = map_on_image(display_map(heat, decision), preprocess, w, h)
    overlay = overlay_rgb(rgb, placed, vrange)
    gap, bar_w = max(4, w // 100), max(16, w // 25)
    header = max(24, h // 14)
    small = _font(min(header * 0.5, bar_w * 0.9))
    labels = [f"+{vrange[1]:.3g}", "excess over", decision.get("heatmap_reference", "good images"), "0"]
    label_w = int(max(small.getlength(s) for s in labels)) + 8
    canvas = Image.new("RGB", (2 * w + 2 * gap + bar_w + label_w, h + header), "white")
    canvas.paste(image, (0, header))
    canvas.paste(Image.fromarray(overlay), (w + gap, header))
    draw_regions(canvas, regions, w / original.width, (w + gap, header))
    bar = colours(np.linspace(vrange[1], vrange[0], h)[:, None].repeat(bar_w, 1), vrange)
    canvas.paste(Image.fromarray((bar * 255 + 0.5).astype(np.uint8)), (2 * w + 2 * gap, header))
    draw = ImageDraw.Draw(canvas)
    threshold = decision.get("threshold")
    text = f"score {score:.4g}"
    if threshold is not None:
        text += f"   threshold {threshold:.4g}   score/threshold {score / threshold:.2f}" if threshold else ""
    if verdict:
        text += f"   verdict: {verdict.upper()}"
    if regions:
        text += f"   {len(regions)} region(s), largest {regions[0]['area_px']} px"
    font = _font(header * 0.6)
    draw.text((4, header * 0.15), text, fill=(160, 0, 0) if verdict == "ng" else (0, 0, 0), font=font)
    x_label = 2 * w + 2 * gap + bar_w + 4
    draw.text((x_label, header), labels[0], fill="black", font=small)
    draw.text((x_label, header + h - small.size - 4), labels[3], fill="black", font=small)
    draw.text((x_label, header + h // 2), "\n".join(labels[1:3]), fill="black", font=small)
    return np.asarray(canvas)


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


def _whole_numbers(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def histogram_png(scores: np.ndarray, is_defect: np.ndarray | None, threshold: float | None,
                  labelled: Mapping[str, float] | None = None) -> str:
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
        ax.axvline(threshold, color="black", linestyle="--", label=f"model threshold {threshold:.4g}")
    for (name, value), style in zip((labelled or {}).items(), (":", "-.")):
        ax.axvline(value, color="#555", linestyle=style, label=f"{name} {value:.4g}")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("images")
    _whole_numbers(ax)
    ax.legend(fontsize=8)
    return _png_data_uri(fig)


def roc_png(scores: np.ndarray, is_defect: np.ndarray, auroc: float | None) -> str:
    from matplotlib.figure import Figure

    fpr, tpr = roc_curve(is_defect, scores)
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


def _gallery(rows: Sequence[Mapping[str, Any]], indices: Sequence[int], maps: np.ndarray, preprocess,
             decision: Mapping[str, Any], masks: Sequence[np.ndarray | None] | None) -> str:
    if not len(indices):
        return '<p class="muted">none</p>'
    threshold = decision.get("threshold")
    cells = []
    for i in indices:
        r = rows[i]
        try:
            rgb = overlay_for(r["path"], maps[i], preprocess, decision, None if masks is None else masks[i])
            pic = _img(_png_uri(rgb), Path(r["path"]).name)
        except BadImage as err:
            pic = f'<div class="bad">cannot show image: {_e(err.reason)}</div>'
        against = f" / {threshold:.4g}" if threshold is not None else ""
        verdict = f" <b>{_e(r['verdict'])}</b>" if r.get("verdict") else ""
        true = f"<br>true: {_e(r['true'])}" if r.get("true") is not None else ""
        cells.append(f'<td class="thumb" style="width:260px">{pic}<div class="path">{_e(Path(r["path"]).name)}</div>'
                     f"score {r['score']:.4g}{against}{verdict}{_regions_caption(r)}{true}</td>")
    rows_html = ["<tr>" + "".join(cells[k : k + 4]) + "</tr>" for k in range(0, len(cells), 4)]
    return "<table>" + "".join(rows_html) + "</table>"


def _regions_caption(row: Mapping[str, Any]) -> str:
    """'2 regions, largest 310 px (0.12 %) at x 40, y 88' under a gallery picture ('' without regions)."""
    regions = row.get("regions")
    if not regions:
        return ""
    big = regions[0]
    return (f"<br>{len(regions)} region{'s' if len(regions) > 1 else ''}, largest {big['area_px']} px "
            f"({big['area_pct']:.3g} %) at x {big['x']}, y {big['y']}")


def _labelled_table(labelled: Mapping[str, Mapping[str, Any]]) -> str:
    head = "<tr><th>threshold</th><th>value</th><th>F1</th><th>false-reject rate</th><th>miss rate</th></tr>"
    body = []
    for name, m in labelled.items():
        if "error" in m:
            body.append(f"<tr><td>{_e(name)}</td><td colspan=4 class='muted'>{_e(m['error'])}</td></tr>")
            continue
        cells = [m.get("threshold"), m.get("image_f1"), m.get("false_reject_rate"), m.get("miss_rate")]
        body.append(f"<tr><td>{_e(name.replace('_', ' '))}</td>" + "".join(
            f"<td class='num'>{'' if v is None else format(v, '.4g')}</td>" for v in cells) + "</tr>")
    return "<table>" + head + "".join(body) + "</table>"


def write_anomaly_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    maps: np.ndarray,
    preprocess,
    decision: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    is_defect: np.ndarray | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    extra: Mapping[str, Any] | None = None,
    n_gallery: int = GALLERY,
) -> Path:
    """Write ``out_dir/report.html`` atomically and return its path (module docstring)."""
    scores = np.array([r["score"] for r in rows], dtype=np.float64)
    threshold = decision.get("threshold")
    parts = [f"<h1>{_e(title)}</h1>"]
    summary: dict[str, Any] = {"images": len(rows)}
    if threshold is not None:
        summary["threshold (score > threshold is ng)"] = f"{threshold:.6g}"
        if decision.get("guarantee"):
            summary["what it guarantees"] = decision["guarantee"]
        for v in ("ng", "review", "ok"):
            n = sum(1 for r in rows if r.get("verdict") == v)
            if n or v != "review":
                summary[f"verdict {v}"] = n
    if metrics:
        for key in ("image_auroc", "image_aupr", "image_f1", "false_reject_rate", "miss_rate", "pixel_auroc", "aupro"):
            if metrics.get(key) is not None:
                text = f"{metrics[key]:.4f}"
                if key == "image_auroc" and metrics.get("image_auroc_ci"):
                    lo, hi = metrics["image_auroc_ci"]
                    text += f" (95% CI {lo:.3f} - {hi:.3f})"
                summary[key.replace("_", " ")] = text
        for key in ("n_good", "n_defect", "n_excluded_fit_images"):
            if metrics.get(key) is not None:
                summary[key.replace("_", " ")] = metrics[key]
    parts += ["<h2>Summary</h2>", _kv_table(summary)]
    if extra:
        parts += ["<h2>Run</h2>", _kv_table(extra)]
    labelled = (metrics or {}).get("labelled_thresholds") or {}
    if labelled:
        parts += ["<h2>Thresholds chosen with the labelled defects</h2>",
                  '<p class="muted">For comparison: thresholds that need labelled defects to set. The model\'s own '
                  "threshold was set from good images alone.</p>", _labelled_table(labelled)]
    if metrics and metrics.get("per_defect_type"):
        head = "<tr><th>defect type</th><th>images</th><th>AUROC</th><th>miss rate</th></tr>"
        body = "".join(
            f"<tr><td>{_e(k)}</td><td class='num'>{v.get('n_defect')}</td>"
            f"<td class='num'>{'' if v.get('image_auroc') is None else format(v['image_auroc'], '.4f')}</td>"
            f"<td class='num'>{'' if v.get('miss_rate') is None else format(v['miss_rate'], '.3f')}</td></tr>"
            for k, v in metrics["per_defect_type"].items())
        parts += ["<h2>Per defect type</h2>", "<table>" + head + body + "</table>"]
    if len(rows):
        lines = {n: m["threshold"] for n, m in labelled.items() if "threshold" in m}
        parts += ["<h2>Scores</h2>", _img(histogram_png(scores, is_defect, threshold, lines), "score histogram")]
        if is_defect is not None and is_defect.any() and (~is_defect).any():
            parts.append(_img(roc_png(scores, is_defect, (metrics or {}).get("image_auroc")), "ROC curve"))
        flagged = np.array([r.get("verdict") in ("ng", "review") for r in rows])
        k = n_gallery
        if is_defect is not None:
            missed = np.flatnonzero(is_defect & ~flagged)
            false_rejects = np.flatnonzero(~is_defect & flagged)
            parts += [f"<h2>Missed defects ({len(missed)})</h2>",
                      '<p class="muted">Defective images at or below the threshold, highest score first.</p>',
                      _gallery(rows, missed[np.argsort(-scores[missed], kind="stable")][:k], maps, preprocess,
                               decision, masks),
                      f"<h2>False rejects ({len(false_rejects)})</h2>",
                      '<p class="muted">Good images over the threshold, highest score first.</p>',
                      _gallery(rows, false_rejects[np.argsort(-scores[false_rejects], kind="stable")][:k], maps,
                               preprocess, decision, masks)]
            caught = np.flatnonzero(is_defect & flagged)
            parts += [f"<h2>Caught defects ({len(caught)})</h2>",
                      _gallery(rows, caught[np.argsort(-scores[caught], kind="stable")][:k // 2], maps, preprocess,
                               decision, masks)]
        else:
            order = np.flatnonzero(flagged)[np.argsort(-scores[flagged], kind="stable")]
            near = np.flatnonzero(~flagged)
            if threshold is not None:
                near = near[np.argsort(np.abs(scores[near] - threshold), kind="stable")]
            parts += [f"<h2>Flagged ({int(flagged.sum())})</h2>", _gallery(rows, order[:k], maps, preprocess,
                                                                          decision, masks),
                      "<h2>Passed, nearest the threshold</h2>", _gallery(rows, near[:k], maps, preprocess, decision,
                                                                         masks)]
        note = ("Heat maps: each pixel's excess over the median map of the good images, jet colour map from 0 to "
                f"{(decision.get('heatmap_range') or [0, 1])[1]:.4g}.")
        if masks is not None and any(m is not None and m.any() for m in masks):
            note += " White outlines are the ground-truth defects."
        parts.append(f'<p class="muted">{_e(note)}</p>')
    else:
        parts.append('<p class="muted">No images could be scored.</p>')
    html = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return atomic_write_text(Path(out_dir) / "report.html", html)
