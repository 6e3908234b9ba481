"""A project's ``params``, checked when they are set: a value the fit or the predictions could not use is refused
with 422 naming the field, instead of being stored and breaking every later request.

Three kinds of keys:

* the service's own (how a prediction is decided): ``review_band``, ``target_false_reject`` (anomaly);
  ``review_threshold``, ``abstain``, ``accept_classes`` (classification);
* the fit's keyword arguments a project may set (``shots``, ``seed``, ``tile`` ...; see ``FIT_KEYS``);
* anything else is a parameter of the method's head (``coreset_ratio`` for PatchCore, ...): it must be one of the
  head's ``__init__`` arguments, and the head must accept the value when built with it.

Numbers must be finite: JSON's ``NaN`` / ``Infinity`` and ``1e400`` (which Python reads as infinity) are refused.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

from .common import ServiceError


def _number(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False, integer=False):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            return "must be an integer" if integer else "must be a number"
        if not math.isfinite(value):
            return "must be a finite number"
        if lo is not None and (value <= lo if lo_open else value < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (value >= hi if hi_open else value > hi):
            return f"must be {'<' if hi_open else '<='} {hi}"
        return None
    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _one_of(*choices: str):
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


SERVICE_KEYS: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "anomaly": {"review_band": _number(0), "target_false_reject": _number(0, 1, lo_open=True, hi_open=True)},
    "classification": {"review_threshold": _number(0, 1), "abstain": _boolean},  # accept_classes: see below
}
FIT_KEYS: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "anomaly": {"shots": _number(1, integer=True), "seed": _number(0, integer=True),
                "holdout_fraction": _number(0, 1, hi_open=True), "sigma": _number(0),
                "batch_size": _number(1, 256, integer=True), "chunk_images": _number(1, 1024, integer=True),
                "min_region_area": _number(0), "tile": _number(16, integer=True),
                "tile_overlap": _number(0, 0.95)},
    "classification": {"shots": _number(1, integer=True), "seed": _number(0, integer=True),
                       "calibrate_fraction": _number(0, 1, hi_open=True),
                       "alpha": _number(0, 1, lo_open=True, hi_open=True),
                       "conformal": _one_of("lac", "aps"), "mondrian": _boolean},
}


def _finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(where, "must be a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite(v, f"{where}[{i}]")


def _invalid(where: str, why: str) -> ServiceError:
    return ServiceError(422, "invalid", f"{where}: {why}")


def check_params(task: str, method: str, classes: list[dict], params: Any) -> dict:
    """``params`` if the project can use them; :class:`ServiceError` 422 naming the first bad field otherwise."""
    if not isinstance(params, dict):
        raise _invalid("params", "must be an object")
    _finite(params, "params")
    head_params = {}
    for key, value in params.items():
        where = f"params.{key}"
        check = SERVICE_KEYS[task].get(key) or FIT_KEYS[task].get(key)
        if check is not None:
            why = check(value)
            if why:
                raise _invalid(where, why)
        elif key == "accept_classes" and task == "classification":
            names = [c["name"] for c in classes]
            if not isinstance(value, list) or not all(isinstance(v, str) and v in names for v in value):
                raise _invalid(where, f"must be a list of the project's classes ({', '.join(names)})")
        else:
            head_params[key] = value
    _check_head_params(task, method, head_params)
    return params


def _check_head_params(task: str, method: str, params: dict) -> None:
    if task == "anomaly":
        from ..anomaly import anomaly_head_classes

        head_class = anomaly_head_classes()[method]
    else:
        from ..heads import head_classes

        head_class = head_classes()[method]
    accepted = [name for name, p in inspect.signature(head_class.__init__).parameters.items()
                if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key, value in params.items():
        if key not in accepted:
            known = sorted(set(SERVICE_KEYS[task]) | set(FIT_KEYS[task]) | set(accepted) |
                           ({"accept_classes"} if task == "classification" else set()))
            raise _invalid(f"params.{key}", f"not a setting of a {task} project with method {method} (known: "
                                            f"{', '.join(known)})")
        if not isinstance(value, (bool, int, float, str, list)) or isinstance(value, list) and not all(
                isinstance(v, (bool, int, float, str)) for v in value):
            raise _invalid(f"params.{key}", "must be a number, true/false, a string or a list of them")
    try:
        head = head_class(**params)
        if hasattr(head, "_check_params"):
            head._check_params()  # the checks a fit would make, run now
    except (TypeError, ValueError) as err:
        raise _invalid("params", " ".join(str(err).split())) from None
