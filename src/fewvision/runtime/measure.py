"""What ``fewvision pack`` measures on each engine - a graph's outputs, its speed, its accuracy on labelled images -
run in a fresh interpreter.

Why apart: OpenVINO's CPU plugin starts a thread pool (TBB) that does not survive a later fork of the process that
loaded it - a forked DataLoader worker or a test runner's worker then dies with the parent. Packing happens in long-
lived processes too (the tests, a script), so the engines it only measures never load there. The functions here
import nothing but the runtime (no torch), so the child starts in about a second.

The child is a plain ``python -c`` rather than multiprocessing's "spawn", which starts by running the caller's main
script again: a packing script without ``if __name__ == "__main__":`` would fit and pack once more in the child and
then wait forever (a worker that dies while starting is replaced by the pool, and the result never comes; so would
an engine that crashes the child). Here a child that dies is an error naming what it printed last.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


_CHILD = ("import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
          "from fewvision.runtime.measure import _serve; _serve(sys.argv[1])")


def apart(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a fresh interpreter (``fn`` a module-level function); its result, or its exception, comes
    back."""
    with tempfile.TemporaryDirectory(prefix="fewvision-measure-") as tmp:
        result = Path(tmp) / "result.pickle"
        done = subprocess.run([sys.executable, "-c", _CHILD, str(result)], capture_output=True,
                              input=pickle.dumps(sys.path) + pickle.dumps((fn, args)))
        if done.returncode != 0 or not result.exists():
            said = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
            raise RuntimeError(f"measuring {getattr(fn, '__name__', fn)} in a fresh interpreter failed (exit code "
                               f"{done.returncode}): {said[-1].strip() if said else 'it printed nothing'}")
        ok, value = pickle.loads(result.read_bytes())
    if not ok:
        raise value
    return value


def _serve(result: str) -> None:
    """The child of :func:`apart`: reads the function and its arguments from stdin, writes (ok, value) to
    ``result``."""
    fn, args = pickle.load(sys.stdin.buffer)
    try:
        answer = (True, fn(*args))
    except Exception as err:  # noqa: BLE001 - handed back to the caller, which raises it
        answer = (False, err)
    try:
        data = pickle.dumps(answer)
    except Exception:  # noqa: BLE001 - an exception that cannot be pickled comes back as its line
        if answer[0]:
            raise
        data = pickle.dumps((False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))
    Path(result).write_bytes(data)


def _model(graph: str, engine: str, precision: str):
    from .model import open_model

    return open_model(graph, engine=engine, precision=precision)


def outputs(graph: str, engine: str, pixels: Sequence[np.ndarray], precision: str = "fp32") -> list[list[np.ndarray]]:
    """The graph's outputs for each pixel batch in ``pixels`` on ``engine``."""
    model = _model(graph, engine, precision)
    return [model.run(p) for p in pixels]


def outputs_and_speed(graph: str, engine: str, pixels: Sequence[np.ndarray]) -> tuple[list, float]:
    """:func:`outputs` and :func:`speed` on one engine, in one child (each start costs a second or two)."""
    return outputs(graph, engine, pixels), speed(graph, engine)


def speed(graph: str, engine: str, images: int = 8, repeats: int = 3) -> float:
    """Images per second of ``graph`` on ``engine``: the best of ``repeats`` runs over ``images`` random inputs
    (after one warm-up run)."""
    model = _model(graph, engine, "fp32")
    pixels = np.random.default_rng(0).normal(size=(images, 3, *model.manifest["input_size"])).astype(np.float32)
    model.run(pixels[:1])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.run(pixels)
        best = min(best, time.perf_counter() - start)
    return round(images / best, 2)


def quality(graph: str, engine: str, precision: str, paths: list[str], labels: list[str],
            good: str | None) -> tuple[float, str, int]:
    """(accuracy of the top class, or image AUROC against ``good``, which of the two, images scored)."""
    from ..metrics.ranking import roc_auc
    from .model import predict, score_files

    model = _model(graph, engine, precision)
    truth = dict(zip(paths, labels))
    if model.task == "anomaly":
        rows = score_files(model, paths, keep_maps=False).rows
        y = [truth[r["path"]] != good for r in rows]
        if len(set(y)) < 2:
            raise ValueError(f"measuring a reduced precision needs good and defect images (the AUROC change); "
                             f"{Path(paths[0]).parent.parent if paths else 'the dataset'} has one kind")
        return roc_auc(y, [r["score"] for r in rows]), "AUROC", len(rows)
    rows = predict(model, paths).rows
    correct = [r["top_label"] == truth[r["path"]] for r in rows]
    return float(np.mean(correct)) if correct else 0.0, "accuracy", len(correct)
