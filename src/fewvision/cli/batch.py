"""``fewvision batch``: score an archive of images into one Parquet file, in process or on Ray."""

from __future__ import annotations

from inspect import cleandoc
from pathlib import Path
from typing import Optional

import typer

from .common import (
    CONTEXT,
    EXIT_CODES_HELP,
    NothingScored,
    UserError,
    cache_dir_option,
    check_output,
    engine_option,
    exit_code_option,
    finish,
    info,
    no_cache_option,
    summarise,
    weights_option,
)

BATCH_EXAMPLE = """

\b
Examples:
  fewvision batch line3.fvm archive/2024/ -o results.parquet                 (in this process)
  fewvision batch line3.fvm archive/2024/ -o results.parquet --ray auto --workers 7
  fewvision batch model.fvm archive/ -o results.parquet --ray 10.0.0.5:6379   (an existing Ray cluster)
"""


def register(app: typer.Typer) -> None:
    app.command("batch", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(batch_command.__doc__) + BATCH_EXAMPLE)(batch_command)


def batch_command(
    model_path: Path = typer.Argument(..., metavar="MODEL",
                                      help="model file (.fvm, packed .fvz or exported .onnx) from 'fewvision fit' "
                                           "or 'fewvision anomaly fit'"),
    root: Path = typer.Argument(..., metavar="IMAGES_ROOT", help="folder of images (searched recursively)"),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE",
                             help="results.parquet; when it exists, the images it holds are skipped and the new rows "
                                  "added"),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="auto|ADDRESS",
                                      help="run as a Ray Data pipeline: 'auto' starts or joins a local cluster, "
                                           "ADDRESS joins that one (needs pip install 'fewvision[ray]') [default: "
                                           "in this process]"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, metavar="N",
                                          help="model replicas on Ray, one torch thread each [default: the "
                                               "cluster's CPUs less one]; ignored in process"),
    abstain: bool = typer.Option(False, "--abstain", help="classification: send an image to review when its "
                                 "conformal set is not exactly one class"),
    review_threshold: Optional[float] = typer.Option(None, "--review-threshold", min=0.0, max=1.0, metavar="P",
                                                     help="classification: send an image to review when its top "
                                                          "probability is below P"),
    review_band: float = typer.Option(0.0, "--review-band", min=0.0, metavar="F",
                                      help="anomaly: verdict 'review' for scores within F of the threshold "
                                           "(relative: 0.1 = 10%)"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, metavar="N", help="images per Ray batch"),
    weights: Optional[str] = weights_option(),
    engine: str = engine_option(),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
    exit_code: bool = exit_code_option(),
) -> None:
    """Score every image below IMAGES_ROOT with a fitted model (classification or anomaly) into one Parquet file:
    the rows and columns of 'fewvision predict' or 'fewvision anomaly predict', an error row for each unreadable
    file. Resumable: a re-run with the same --out scores only the images not in it yet. With --ray, a Ray Data
    pipeline: read tasks decode and preprocess, a pool of actors (each loads the model once) encodes and scores."""
    from ..progress import job
    from ..tasks.batch import ray_module, run_batch

    check_output(out, (".parquet",))
    if ray is not None:
        ray = ray.strip()
        if not ray:
            raise UserError("--ray expects 'auto' or a cluster address such as 10.0.0.5:6379")
        ray_module()  # a missing Ray is one line, before any work
    if not root.exists():
        raise UserError(f"{root}: no such folder")
    if ray is not None and engine not in ("auto", "torch"):
        raise UserError(f"--engine {engine}: Ray's actors run the model on torch; drop --ray to run its graph")
    with job("batch" + (" on ray" if ray else "")) as bar:
        summary = run_batch(model_path, root, out, ray=ray, workers=workers, abstain=abstain,
                            review_threshold=review_threshold, review_band=review_band, weights=weights,
                            cache_dir=cache_dir, use_cache=not no_cache, batch_size=batch_size, progress=True,
                            engine=engine)
    engine = f" on Ray, {summary.workers} worker(s)" if summary.engine == "ray" else ""
    summarise(bar, summary.n_scored, summary.skipped, summary.counts, summary.flagged, what=f"scored{engine}")
    new = summary.n_found - summary.n_done_before
    if summary.n_done_before:
        info(f"{summary.n_done_before} image(s) already in {out} were skipped")
    if new or summary.n_rows == 0:
        info(f"wrote {out}")
    typer.echo(f"{summary.n_scored} image(s) scored, {len(summary.skipped)} unreadable, {summary.n_done_before} "
               f"already done; {out} holds {summary.n_rows} row(s)")
    if new == 0:
        if summary.n_rows == 0:
            raise NothingScored(f"no image found in {root}")
        return
    finish(summary.n_scored, summary.n_flagged, exit_code)


__all__ = ["register"]
