"""Pieces every HTML report shares: the style sheet, escaping, embedded PNGs and key-value tables."""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any, Mapping

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.thumb{width:140px;text-align:center}.bad{color:#a00;font-size:.85em;max-width:240px;word-break:break-word}
.path{font-family:monospace;font-size:.85em;word-break:break-all}.note{font-size:.85em;max-width:400px}
.muted{color:#777}
"""


def _e(value: Any) -> str:
    # A file name that is not valid UTF-8 (held as lone surrogates) is shown with U+FFFD: the page stays UTF-8.
    text = "" if value is None else str(value)
    return escape(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), quote=True)


def _mpl_text(text: str) -> str:
    # Matplotlib parses "$...$" as mathtext; a class name with a dollar sign must be shown literally.
    return str(text).replace("$", r"\$")


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _kv_table(items: Mapping[str, Any]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items.items())
    return f"<table>{body}</table>"
