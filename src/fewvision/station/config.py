"""A station's YAML file as validated dataclasses; every mistake is one line naming the key and the reason.

Relative paths are taken from the YAML file's folder, so a station folder can be moved as a whole.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.engines import CHOICES
from ..tasks.verdicts import VERDICTS, Policy
from .sinks import check_options

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SINK_KINDS = ("mqtt", "opcua", "webhook", "csv")


class ConfigError(ValueError):
    """A station file that cannot be used; the message names the file and the key."""


@dataclass
class Retry:
    initial_s: float = 0.5  # the first wait after a failed delivery; doubled after each failure up to max_s
    max_s: float = 30.0


@dataclass
class SinkConfig:
    kind: str
    name: str
    options: dict[str, Any]
    retry: Retry = field(default_factory=Retry)


@dataclass
class SourceConfig:
    folder: Path
    pattern: str | None = None  # None: every image type fewvision reads
    after: dict[str, Path] = field(default_factory=dict)  # verdict -> folder the image is moved to
    part_id: re.Pattern | None = None
    settle_s: float = 1.0  # a file without its format's end marker is complete once unchanged this long
    poll_s: float = 0.005  # new names looked for this often
    scan_s: float = 2.0  # every file's size and time looked at this often (a file rewritten in place)
    batch: int = 16  # at most this many waiting images scored together (as anomaly predict does)


@dataclass
class StationConfig:
    path: Path
    name: str
    model: Path
    source: SourceConfig
    sinks: list[SinkConfig]
    store: str  # a database URL
    data_dir: Path  # beside the store: the model's copy the service reads, the feature cache
    policy: Policy = field(default_factory=Policy)
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    monitor_delta: float | None = 0.01  # the drift alarm's false-alarm probability (None: no monitor)
    engine: str = "auto"  # what runs a packed model's graph (fewvision.runtime.engines); torch for a .fvm


def _fail(path: Path, key: str, reason: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {reason}")


def _mapping(path: Path, value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, key, f"expected a mapping of keys, got {type(value).__name__}")
    return value


def _known(path: Path, value: dict, key: str, allowed: set[str]) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise _fail(path, where, f"unknown key (known: {', '.join(sorted(allowed))})")


def _number(path: Path, value: Any, key: str, *, lo: float = 0.0, integer: bool = False,
            lo_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _fail(path, key, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if value < lo or (lo_open and value == lo) or value != value or value in (float("inf"), float("-inf")):
        raise _fail(path, key, f"expected a number {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    return value


def _local(base: Path, value: Any, path: Path, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, key, "expected a path")
    p = Path(os.path.expandvars(value)).expanduser()
    return p if p.is_absolute() else (base / p)


def store_url(base: Path, value: Any, path: Path) -> tuple[str, Path]:
    """The store as a database URL and the data folder beside it: a file path is a SQLite file (its folder holds
    the data), a postgresql:// URL a database (the data then beside the station file)."""
    if isinstance(value, str) and value.startswith(("postgresql://", "sqlite:///")):
        if value.startswith("sqlite:///"):
            file = Path(value[len("sqlite:///"):])
            return value, file.parent
        return value, base / "station-data"
    file = _local(base, value, path, "store").resolve()
    return f"sqlite:///{file}", file.parent


def _sink(path: Path, base: Path, item: Any, i: int, taken: set[str]) -> SinkConfig:
    key = f"sinks[{i}]"
    if not isinstance(item, dict) or len(item) != 1:
        raise _fail(path, key, f"expected one of {', '.join(SINK_KINDS)} with its options, e.g. '- csv: {{path: "
                               "verdicts.csv}'")
    kind, options = next(iter(item.items()))
    if kind not in SINK_KINDS:
        raise _fail(path, key, f"unknown sink {kind!r} (known: {', '.join(SINK_KINDS)})")
    options = dict(_mapping(path, options, f"{key}.{kind}"))
    name = options.pop("name", None) or kind
    if not isinstance(name, str) or not NAME.match(name):
        raise _fail(path, f"{key}.{kind}.name", f"expected letters, digits, '.', '_' or '-', got {name!r}")
    if name in taken:
        raise _fail(path, f"{key}.{kind}.name", f"two sinks are named {name!r}: give each a name of its own "
                                                "(its delivery cursor is kept under it)")
    taken.add(name)
    retry = _mapping(path, options.pop("retry", None), f"{key}.{kind}.retry")
    _known(path, retry, f"{key}.{kind}.retry", {"initial_s", "max_s"})
    r = Retry(**{k: float(_number(path, v, f"{key}.{kind}.retry.{k}")) for k, v in retry.items()})
    try:
        options = check_options(kind, options, base)
    except ValueError as err:
        raise _fail(path, f"{key}.{kind}", str(err)) from None
    return SinkConfig(kind, name, options, r)


def load_config(path: str | os.PathLike) -> StationConfig:
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the station file ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]})") from None
    raw = _mapping(path, raw, "(top level)")
    base = path.resolve().parent
    _known(path, raw, "", {"name", "model", "engine", "source", "sinks", "store", "decision", "metrics", "monitor"})
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise _fail(path, "name", f"expected letters, digits, '.', '_' or '-' (it names topics and OPC UA nodes), "
                                  f"got {name!r}")
    if "model" not in raw:
        raise _fail(path, "model", "missing: the .fvm or .fvz model file the station scores with")
    model = _local(base, raw["model"], path, "model")
    if not model.is_file():
        raise _fail(path, "model", f"no such file {model}")

    src = _mapping(path, raw.get("source"), "source")
    _known(path, src, "source", {"folder", "pattern", "after", "part_id", "settle_s", "poll_s", "scan_s", "batch"})
    if "folder" not in src:
        raise _fail(path, "source.folder", "missing: the hot folder the camera writes into")
    folder = _local(base, src["folder"], path, "source.folder")
    after_raw = _mapping(path, src.get("after"), "source.after")
    _known(path, after_raw, "source.after", set(VERDICTS))
    after = {v: _local(base, p, path, f"source.after.{v}") for v, p in after_raw.items()}
    part = src.get("part_id")
    part_re = None
    if part is not None:
        try:
            part_re = re.compile(str(part))
        except re.error as err:
            raise _fail(path, "source.part_id", f"not a regular expression ({err})") from None
    pattern = src.get("pattern")
    if pattern is not None and (not isinstance(pattern, str) or "/" in pattern or not pattern.strip()):
        raise _fail(path, "source.pattern", f"expected a file name pattern such as '*.png', got {pattern!r}")
    source = SourceConfig(folder=folder, pattern=pattern, after=after, part_id=part_re)
    for key in ("settle_s", "poll_s", "scan_s"):
        if key in src:
            setattr(source, key, float(_number(path, src[key], f"source.{key}")))
    if "batch" in src:
        source.batch = int(_number(path, src["batch"], "source.batch", lo=1, integer=True, lo_open=False))

    sinks_raw = raw.get("sinks") or []
    if not isinstance(sinks_raw, list):
        raise _fail(path, "sinks", "expected a list of sinks")
    taken: set[str] = set()
    sinks = [_sink(path, base, item, i, taken) for i, item in enumerate(sinks_raw)]

    url, data_dir = store_url(base, raw.get("store", f"{name}.sqlite"), path)

    decision = _mapping(path, raw.get("decision"), "decision")
    _known(path, decision, "decision", {"review_band", "review_threshold", "abstain", "accept"})
    policy = Policy()
    if "review_band" in decision:
        policy.review_band = float(_number(path, decision["review_band"], "decision.review_band", lo_open=False))
    if "review_threshold" in decision:
        policy.review_threshold = float(_number(path, decision["review_threshold"], "decision.review_threshold"))
    if "abstain" in decision:
        if not isinstance(decision["abstain"], bool):
            raise _fail(path, "decision.abstain", f"expected true or false, got {decision['abstain']!r}")
        policy.abstain = decision["abstain"]
    if "accept" in decision:
        accept = decision["accept"]
        if not isinstance(accept, list) or not all(isinstance(c, str) for c in accept):
            raise _fail(path, "decision.accept", "expected a list of class names")
        policy.accept = list(accept)

    metrics = _mapping(path, raw.get("metrics"), "metrics")
    _known(path, metrics, "metrics", {"port", "address"})
    port = metrics.get("port")
    if port is not None:
        port = int(_number(path, port, "metrics.port", lo=1, integer=True, lo_open=False))
    monitor = raw.get("monitor", {})
    delta = None
    if monitor is not False:
        monitor = _mapping(path, monitor, "monitor")
        _known(path, monitor, "monitor", {"delta"})
        delta = float(_number(path, monitor.get("delta", 0.01), "monitor.delta"))
        if not delta < 1:
            raise _fail(path, "monitor.delta", f"expected a probability below 1, got {delta!r}")
    engine = raw.get("engine", "auto")
    if engine not in CHOICES:
        raise _fail(path, "engine", f"expected one of {', '.join(CHOICES)}, got {engine!r}")
    return StationConfig(path=path, name=name, model=model, source=source, sinks=sinks, store=url,
                         data_dir=data_dir, policy=policy, metrics_port=port,
                         metrics_address=str(metrics.get("address", "127.0.0.1")), monitor_delta=delta,
                         engine=engine)
