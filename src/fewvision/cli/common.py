"""What every command shares: user errors, messages, backbone and LMM options, writing result rows."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path
from typing import Optional

import typer

from ..io.atomic import atomic_open

DEFAULT_BACKBONE_HELP = "backbone spec: openclip:MODEL[/TAG] | openclip:MODEL@PATH | hf:REPO | timm:NAME | texture"


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from ..backbones.base import BackboneError
    from ..heads.prompts import PromptError
    from ..io.datasets import DatasetError
    from ..io.images import BadImage

    return (UserError, BackboneError, DatasetError, PromptError, BadImage, FileNotFoundError, ValueError)


def _quiet_libraries() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs random-init notices at WARNING on the root logger
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def info(msg: str) -> None:
    typer.echo(msg, err=True)


def _classes(classes: Optional[str], classes_file: Optional[Path]):
    from ..heads.prompts import load_class_file, parse_class_names

    if classes and classes_file:
        raise UserError("give either --classes or --classes-file, not both")
    if classes_file:
        return load_class_file(classes_file)
    if classes:
        return parse_class_names(classes)
    return None


def _backbone(spec: str, weights: Optional[str], cache_dir: Optional[str]):
    from ..backbones import create_backbone

    return create_backbone(spec, weights=weights, cache_dir=cache_dir)


LMM_METHODS = ("slac", "tlac")
LMM_URL_HELP = "OpenAI-compatible server for --method slac|tlac, e.g. http://localhost:11434/v1 (Ollama); 'local' runs --lmm-model in-process"


def _lmm(method: str, url: Optional[str], model: Optional[str], timeout: float, concurrency: int,
         cache_dir: Optional[str], no_cache: bool):
    """The LMM asked by --method slac|tlac (None for other methods)."""
    if method not in LMM_METHODS:
        if url or model:
            raise UserError("--lmm-url and --lmm-model apply only to --method slac or tlac")
        return None
    if not url:
        raise UserError(f"--method {method} needs --lmm-url (e.g. http://localhost:11434/v1 for Ollama, or 'local')")
    if not model:
        raise UserError(f"--method {method} needs --lmm-model (e.g. llava, qwen2.5vl, or a local model folder)")
    from ..lmm import create_lmm

    return create_lmm(url, model, timeout=timeout, concurrency=concurrency, cache_dir=cache_dir,
                      use_cache=not no_cache)


def write_rows(path: Path, rows: list[dict], class_names: list[str], skipped) -> None:
    """CSV or JSONL (by suffix), written to a temp file and renamed, so a crash never leaves half a file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise UserError(f"{path}: --out must end in .csv or .jsonl")
    with atomic_open(path, newline="") as fh:
        if suffix == ".csv":
            extra = [k for k in ("true", "note") if any(k in r for r in rows)]
            w = csv.writer(fh)
            w.writerow(["path", "label", *extra, *[f"p_{n}" for n in class_names], "error"])
            for r in rows:
                w.writerow([r["path"], r["label"], *[r.get(k, "") for k in extra],
                            *[f"{r['probabilities'][n]:.6f}" for n in class_names], ""])
            for s in skipped:
                w.writerow([s.path, "", *[""] * len(extra), *[""] * len(class_names), s.reason])
        else:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
            for s in skipped:
                fh.write(json.dumps({"path": s.path, "label": None, "error": s.reason}) + "\n")


def _summary(n_ok: int, skipped) -> None:
    for s in skipped:
        info(f"skipped {s.path}: {s.reason}")
    info(f"{n_ok} image(s) processed, {len(skipped)} skipped")
