"""What every command shares: exit codes, user errors, argument checks, options, result rows and the closing summary.

Nothing heavy is imported here (no torch): ``fewvision --help`` must answer at once.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import typer

from ..defaults import default_backbone
from ..io.atomic import atomic_open
from ..runtime.engines import installed

# --- exit codes ---------------------------------------------------------------------------------------------------
EXIT_OK = 0
EXIT_FLAGGED = 1  # only with --exit-code: something was flagged (ng) or sent to review
EXIT_USAGE = 2  # usage or input error: bad option, unreadable classes file or dataset, missing weights
EXIT_NOTHING_SCORED = 3  # no image could be scored (all unreadable, or none found)
EXIT_INTERNAL = 70  # an unexpected error inside fewvision (EX_SOFTWARE); FEWVISION_DEBUG=1 shows the traceback
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = ("Exit codes: 0 done; 1 something flagged or sent to review (with --exit-code only); 2 usage or "
                   "input error; 3 nothing could be scored; 70 internal error; 130 interrupted.")
CONTEXT = {"help_option_names": ["-h", "--help"]}


def _readable_argument_types() -> None:
    """An argument with a metavar of its own is shown by it alone: 'IMAGES', not 'IMAGES <list[Path]>'."""
    from typer.core import TyperArgument

    shown = TyperArgument.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.metavar else shown(self, ctx)

    TyperArgument.display_type_rich = display_type_rich


_readable_argument_types()
BACKBONE_HELP = ("backbone spec: openclip:MODEL/TAG | openclip:MODEL@PATH | hf:REPO_OR_PATH | timm:NAME[@PATH] | "
                 "texture (built in, no weights); the site default comes from FEWVISION_BACKBONE or "
                 "~/.config/fewvision/config.yaml")


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


class NothingScored(Exception):
    """No image could be scored; exit code 3 (the outputs, with every skip and its reason, are still written)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from ..decide.threshold import ThresholdError
    from ..defaults import ConfigError
    from ..io.datasets import DatasetError
    from ..io.images import BadImage
    from ..modelfile import ModelFileError
    from ..prompts import PromptError

    types = [UserError, DatasetError, BadImage, ModelFileError, ThresholdError, ConfigError, PromptError,
             FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError]
    # only a loaded backbone module can have raised its error: an error met before any model was loaded (and every
    # error on the light install, which has no torch) is reported without importing torch for this check
    backbones = sys.modules.get(f"{__package__.rpartition('.')[0]}.backbones.base")
    if backbones is not None:
        types.append(backbones.BackboneError)
    return tuple(types)


# The libraries an extra brings (pyproject.toml), by the name they are imported under: a command that reaches for
# one on an install without it says which extra to install. The light install lacks every one of them.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "torchvision", "open_clip", "timm", "huggingface_hub", "sklearn", "scipy",
                     "transformers", "diffusers", "peft", "fastapi", "starlette", "uvicorn", "multipart", "onnx",
                     "onnxscript"), "full"),
    "matplotlib": "report", "pyarrow": "batch", "psycopg": "postgres", "openvino": "openvino", "ray": "ray",
    "conformal_clip_data": "demo",
}


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The one line for a library of an extra that is not installed here (None for any other missing module: a
    bug, reported as one)."""
    module = (err.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return f"this command needs {module}, which is not installed here: pip install 'fewvision[{extra}]'"


def click_exception_type() -> type[BaseException]:
    """The ClickException of the click that typer uses (typer ships its own copy, so ``click.ClickException`` is
    another class)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def quiet_libraries() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs random-init notices at WARNING on the root logger
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def info(msg: str) -> None:
    typer.echo(msg, err=True)


# --- options ------------------------------------------------------------------------------------------------------
def backbone_option(task: str = "classification"):
    return typer.Option(None, "--backbone", "-b", metavar="SPEC",
                        help=f"{BACKBONE_HELP} [default here: {default_backbone(task)}]")


def weights_option():
    return typer.Option(None, "--weights", metavar="PATH", help="local weights file or folder for the backbone")


def engine_option():
    return typer.Option("auto", "--engine", metavar="ENGINE",
                        help="auto, onnxruntime, openvino or torch: what runs a packed (.fvz) or exported (.onnx) "
                             "model's graph; auto takes the precision the pack recorded, else OpenVINO when "
                             "installed, else onnxruntime (a .fvm, or a pack without a graph, runs on torch)")


def scoring_model(path: Path, engine: str = "auto", *, cache_dir: str | None = None, weights: str | None = None):
    """See :func:`fewvision.runtime.model.scoring_model`."""
    from ..runtime.model import scoring_model

    return scoring_model(path, engine, cache_dir=cache_dir, weights=weights)


def cache_dir_option():
    return typer.Option(None, "--cache-dir", metavar="DIR",
                        help="cache root (default $FEWVISION_CACHE_DIR or ~/.cache/fewvision)")


def no_cache_option():
    return typer.Option(False, "--no-cache", help="do not read or write the feature cache")


def exit_code_option():
    return typer.Option(False, "--exit-code", help="exit 1 when any image is flagged (ng) or sent to review")


def param_option():
    return typer.Option([], "--param", "-p", metavar="NAME=VALUE",
                        help="method parameter (repeatable; the value is read as JSON when it can be), "
                             "e.g. --param layers=1,2,3")


def resolve_backbone(spec: Optional[str], task: str = "classification") -> str:
    return (spec or default_backbone(task)).strip()


# --- argument checks, before any work -------------------------------------------------------------------------------
def check_output(path: Optional[Path], suffixes: Sequence[str], option: str = "--out") -> Optional[Path]:
    """A file to write: the right suffix, not an existing directory, a folder that can hold it."""
    if path is None:
        return None
    if path.is_dir():
        raise UserError(f"{path}: {option} names an existing directory, not a file")
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{path}: {option} must end in {' or '.join(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{path}: {option} is inside '{parent}', which is not a directory")
    return path


def check_folder(path: Optional[Path], option: str) -> Optional[Path]:
    """A folder to write into: not an existing file."""
    if path is not None and path.exists() and not path.is_dir():
        raise UserError(f"{path}: {option} names an existing file, not a folder")
    return path


def check_report(path: Optional[Path]) -> Optional[Path]:
    """--report: a folder to write into, and matplotlib for its charts, which the light install leaves out (asked
    before any image is scored)."""
    check_folder(path, "--report")
    if path is not None and not installed("matplotlib"):
        raise UserError(f"{path}: --report draws its charts with matplotlib, which this install lacks: "
                        "pip install 'fewvision[report]'")
    return path


def comma_list(text: str, what: str = "value") -> list[str]:
    """``a,b,c`` -> ['a', 'b', 'c']; ``\\,`` is a literal comma inside an item."""
    items = [part.replace("\x00", ",").strip() for part in text.replace("\\,", "\x00").split(",")]
    if any(not item for item in items[:-1]) or (len(items) == 1 and not items[0]):
        raise UserError(f"'{text}': an empty {what} in the list")
    return [item for item in items if item]


def parse_params(items: Iterable[str], accepted: Sequence[str] | None = None, method: str = "") -> dict:
    """``--param NAME=VALUE`` pairs (values read as JSON when they can be); with ``accepted`` unknown names are
    refused, naming what the method takes."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"--param expects NAME=VALUE, got '{item}'")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    if accepted is not None:
        unknown = sorted(set(out) - set(accepted))
        if unknown:
            raise UserError(f"--param {unknown[0]}: method '{method}' has no parameter '{unknown[0]}'; it takes "
                            f"{', '.join(accepted) or 'none'}")
    return out


def init_parameters(cls: type) -> list[str]:
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def spec_has_text(spec: str) -> bool | None:
    """Whether a backbone spec has a text tower, from its kind alone (None when only loading it tells)."""
    kind = spec.split(":", 1)[0]
    return {"texture": False, "timm": False, "openclip": True}.get(kind)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- rows -----------------------------------------------------------------------------------------------------------
def _printable(path: str) -> str:
    """A path as text any reader accepts: a name that is not valid UTF-8 gets U+FFFD for the undecodable bytes."""
    return os.fsencode(path).decode("utf-8", errors="replace")


def _jsonl_row(row: dict) -> str:
    row = dict(row)
    path = row.get("path")
    if isinstance(path, str) and _printable(path) != path:
        # The original bytes too, so nothing is lost: JSON text must be valid UTF-8.
        row["path_bytes_base64"] = base64.b64encode(os.fsencode(path)).decode("ascii")
        row["path"] = _printable(path)
    return json.dumps(row)


def write_table(path: Path, columns: Sequence[str], rows: Sequence[dict], skipped: Sequence) -> None:
    """CSV (those ``columns``) or JSONL (whole rows) by suffix, one row per scored image and one per skipped file
    with its reason under ``error``; written to a temp file and renamed. In CSV a file name that is not valid UTF-8
    is written as its original bytes, so the row names the very file."""
    with atomic_open(path, newline="") as fh:
        if path.suffix.lower() == ".csv":
            w = csv.writer(fh)
            w.writerow(columns)
            for r in rows:
                w.writerow(["" if r.get(c) is None else r[c] for c in columns])
            for s in skipped:
                w.writerow([s.path if c == "path" else s.reason if c == "error" else "" for c in columns])
        else:
            for r in rows:
                fh.write(_jsonl_row(r) + "\n")
            for s in skipped:
                fh.write(_jsonl_row({"path": s.path, "error": s.reason}) + "\n")


def classification_columns(rows: Sequence[dict], class_names: Sequence[str]) -> list[str]:
    extra = [k for k in ("set", "review_reason", "true", "note", "decision") if any(k in r for r in rows)]
    return ["path", "label", "top_label", "top_probability", *extra, *[f"p_{n}" for n in class_names], "error"]


def classification_table(rows: Sequence[dict], class_names: Sequence[str]) -> list[dict]:
    """Rows flattened for CSV: probabilities as ``p_<class>`` columns, sets as ``a|b``."""
    flat = []
    for r in rows:
        f = {k: v for k, v in r.items() if k != "probabilities"}
        f["top_probability"] = f"{r['top_probability']:.6f}"
        for n in class_names:
            f[f"p_{n}"] = f"{r['probabilities'][n]:.6f}"
        if "set" in r:
            f["set"] = "|".join(r["set"])
        flat.append(f)
    return flat


def write_classification(path: Path, preds) -> None:
    if path.suffix.lower() == ".csv":
        rows = classification_table(preds.rows, preds.class_names)
        write_table(path, classification_columns(preds.rows, preds.class_names), rows, preds.skipped)
    else:
        write_table(path, [], preds.rows, preds.skipped)


# --- the closing summary ----------------------------------------------------------------------------------------------
def report_skips(skipped: Sequence) -> None:
    for s in skipped:
        info(f"skipped {_printable(s.path)}: {s.reason}")


def summarise(job, n_scored: int, skipped: Sequence, counts: dict[str, int],
              flagged: Sequence[str] = (), what: str = "scored") -> None:
    """Skip lines, then one line with the time, the rate and the count of each decision, then the first flagged."""
    report_skips(skipped)
    elapsed = job.elapsed
    rate = f", {n_scored / elapsed:.1f} images/s" if elapsed > 0 and n_scored else ""
    decisions = ", ".join(f"{k} {v}" for k, v in counts.items())
    info(f"{n_scored} image(s) {what}, {len(skipped)} skipped in {elapsed:.1f} s{rate}"
         + (f" - {decisions}" if decisions else ""))
    for line in list(flagged)[:5]:
        info(f"  {line}")
    if len(flagged) > 5:
        info(f"  ... and {len(flagged) - 5} more")


def finish(n_scored: int, n_flagged: int, exit_code: bool) -> None:
    """Exit 3 when nothing was scored; with ``--exit-code`` 1 when anything was flagged."""
    if n_scored == 0:
        raise NothingScored("no image could be scored")
    if exit_code and n_flagged:
        raise typer.Exit(EXIT_FLAGGED)


# --- classes and the LMM ----------------------------------------------------------------------------------------------
def classes_from(classes: Optional[str], classes_file: Optional[Path]):
    from ..prompts import load_class_file, parse_class_names

    if classes and classes_file:
        raise UserError("give either --classes or --classes-file, not both")
    if classes_file:
        return load_class_file(classes_file)
    if classes:
        return parse_class_names(classes)
    return None


def templates_from(template: Optional[str]) -> list[str] | None:
    """--template a comma list of named sets and literal templates (``\\,`` for a comma inside one), checked now."""
    if not template:
        return None
    from ..prompts import resolve_templates

    items = comma_list(template, "template")
    resolve_templates(items)  # a bad placeholder is reported before any model is loaded
    return items


def create(spec: str, weights: Optional[str], cache_dir: Optional[str], offline_hint: str = ""):
    from ..backbones import create_backbone
    from ..backbones.base import WeightsUnavailable

    try:
        return create_backbone(spec, weights=weights, cache_dir=cache_dir)
    except WeightsUnavailable as err:
        raise UserError(f"{err}{offline_hint}") from None


LMM_METHODS = ("slac", "tlac")
LMM_URL_HELP = ("OpenAI-compatible server for --method slac|tlac, e.g. http://localhost:11434/v1 (Ollama); 'local' "
                "runs --lmm-model in-process")


def lmm_options() -> dict:
    """The LMM options of classify and eval (``--method slac|tlac``), as typer defaults by parameter name."""
    return {
        "lmm_url": typer.Option(None, "--lmm-url", metavar="URL", help=LMM_URL_HELP),
        "lmm_model": typer.Option(None, "--lmm-model", metavar="NAME", help="LMM name on the server, or a local "
                                  "folder"),
        "lmm_timeout": typer.Option(120.0, "--lmm-timeout", min=0.001, metavar="S", help="seconds per LMM request"),
        "lmm_concurrency": typer.Option(4, "--lmm-concurrency", min=1, metavar="N",
                                        help="LMM requests in flight at most"),
        "lmm_prompt": typer.Option(None, "--lmm-prompt", metavar="TEXT",
                                   help="the stage-1 question (SLAC's by default)"),
        "lmm_top_k": typer.Option(3, "--lmm-top-k", min=1, metavar="K",
                                  help="candidates from CLIP and from SLAC (tlac)"),
    }


LMM = lmm_options()


def lmm_from(method: str, url: Optional[str], model: Optional[str], timeout: float, concurrency: int,
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


def model_task(path: Path, cache_dir: str | None = None) -> str:
    """The task of a model file ('classification' or 'anomaly'), from its metadata alone."""
    from ..modelfile import read_metadata

    return read_metadata(path, cache_dir)["task"]


# --- output of the classification commands (classify, eval, predict) ---------------------------------------
def write_predictions(preds, out: Optional[Path], report: Optional[Path], *, title: str, extra: dict,
                      metrics: Optional[dict] = None) -> None:
    if out:
        write_classification(out, preds)
        info(f"wrote {out}")
    elif metrics is None:
        for r in preds.rows:
            extra_cols = [r.get("review_reason") or "", "|".join(r["set"]) if "set" in r else "", r.get("note", "")]
            tail = "\t".join(c for c in extra_cols if c)
            typer.echo(f"{r['path']}\t{r['label']}\t{r['top_label']}\t{r['top_probability']:.3f}"
                       + (f"\t{tail}" if tail else ""))
    if report:
        from ..reports.classification import write_classification_report

        page = write_classification_report(report, title=title, metrics=metrics, rows=preds.rows,
                                           class_names=preds.class_names, extra=extra)
        info(f"report: {page}")


def summarise_predictions(bar, preds) -> None:
    counts: dict[str, int] = {}
    for r in preds.rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    review = [f"review {r['path']}: {r.get('review_reason', '')} (top {r['top_label']} {r['top_probability']:.2f})"
              for r in preds.rows if r["label"] == "review"]
    summarise(bar, len(preds.rows), preds.skipped, counts, review)


def print_metrics(what: str, m: dict) -> None:
    sets = f"  coverage {m['coverage']:.4f}  mean set size {m['mean_set_size']:.3f}" if "coverage" in m else ""
    ece = f"  ECE {m['ece']:.4f}" if m.get("ece") is not None else ""
    typer.echo(f"{what}: accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}  macro-F1 "
               f"{m['macro_f1']:.4f}{ece}{sets}  (n={m['n']})")
