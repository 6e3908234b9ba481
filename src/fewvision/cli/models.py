"""``fewvision models list | pull | path`` and ``fewvision demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import UserError, _backbone, info


def register(app: typer.Typer) -> None:
    models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="List, download and locate model weights.")
    app.add_typer(models_app, name="models")
    models_app.command("list")(models_list)
    models_app.command("pull")(models_pull)
    models_app.command("path")(models_path)
    app.command()(demo)


def models_list(
    kind: str = typer.Option("openclip", "--kind", help="openclip | timm"),
    filter: Optional[str] = typer.Option(None, "--filter", help="substring to match"),
) -> None:
    """Known backbones: open_clip MODEL/TAG pairs (or timm models with --kind timm), plus 'texture'."""
    if kind == "openclip":
        import open_clip

        names = [f"openclip:{m}/{t}" for m, t in open_clip.list_pretrained()]
    elif kind == "timm":
        import timm

        names = [f"timm:{m}" for m in timm.list_models(pretrained=True)]
    else:
        raise UserError(f"unknown --kind '{kind}': expected openclip or timm")
    names.append("texture")
    for n in names:
        if not filter or filter.lower() in n.lower():
            typer.echo(n)


def models_pull(spec: str, cache_dir: Optional[str] = typer.Option(None, "--cache-dir")) -> None:
    """Download a backbone's weights into the cache (run on a connected machine)."""
    bb = _backbone(spec, None, cache_dir)
    typer.echo(f"{spec}: ready ({bb.id})")


def models_path(spec: str, cache_dir: Optional[str] = typer.Option(None, "--cache-dir")) -> None:
    """Where a backbone's weights are (or would be) cached."""
    from ..backbones import weights_location

    typer.echo(str(weights_location(spec, cache_dir)))


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="folder for the report and metrics"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir"),
) -> None:
    """The main job on the textile images: zero-shot with CLIP when its weights are at hand, else prototypes."""
    from ..tasks.demo import run_demo

    page = run_demo(out, cache_dir=cache_dir, echo=info)
    typer.echo(str(page))
