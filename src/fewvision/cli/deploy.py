"""``fewvision pack`` (one file for an offline machine) and ``fewvision export`` (ONNX)."""

from __future__ import annotations

from inspect import cleandoc
from pathlib import Path
from typing import Optional

import typer

from .common import CONTEXT, EXIT_CODES_HELP, UserError, cache_dir_option, check_output, weights_option

PACK_EXAMPLE = """

\b
Example (on a connected machine, then copy line.fvz to the line PC):
  fewvision pack line3.fvm -o line3.fvz
  fewvision predict line3.fvz incoming/ -o results.csv        # on the line PC, no hub, no cache
"""


def register(app: typer.Typer) -> None:
    app.command("pack", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(pack.__doc__) + PACK_EXAMPLE)(pack)


def pack(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="model file (.fvm) from 'fit' or 'anomaly fit'"),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="archive to write (.fvz)"),
    weights: Optional[str] = weights_option(),
    cache_dir: Optional[str] = cache_dir_option(),
) -> None:
    """Write one file holding the model and everything its backbone reads (weights, model config), each with its
    sha256 and no pickle; 'predict', 'anomaly predict', 'serve --model' and 'info' take it in place of the .fvm
    and run with no hub and no cache. The archive is loaded back offline before this command reports success."""
    from ..deploy.pack import pack_model

    check_output(out, (".fvz",))
    if out.resolve() == model_path.resolve():
        raise UserError(f"{out}: --out would overwrite the model file")
    manifest = pack_model(model_path, out, cache_dir=cache_dir, weights=weights)
    total = sum(f["size"] for f in manifest["files"].values())
    typer.echo(f"{out}: {manifest['method']} on {manifest['backbone']['spec']}, {len(manifest['files'])} file(s), "
               f"{total / 1e6:.1f} MB, loads offline")
