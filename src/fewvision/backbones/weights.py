"""Finding model weights: the local hub cache first, then the hub, and a fast, clear failure when offline.

open_clip, timm and transformers all fetch through ``huggingface_hub``; left alone, an offline machine spends a
minute on retries and prints stack traces. Here a weight file is looked up in the cache with ``local_files_only``;
only if it is missing do we probe the hub once (a TCP connect with a short timeout) before downloading.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ..io.paths import weights_dir
from .base import WeightsUnavailable

HUB_PROBE_TIMEOUT_S = 3.0


def offline_message(spec: str, cache: Path, detail: str = "") -> str:
    why = f" ({detail})" if detail else ""
    return (
        f"weights for '{spec}' are not in the cache and the model hub cannot be reached{why}. "
        f"Supply them one of these ways: pass --weights PATH (a local checkpoint file or directory); "
        f"run 'fewvision models pull {spec}' on a connected machine and copy its cache; "
        f"or place the hub cache under {cache} (or set FEWVISION_CACHE_DIR)."
    )


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """One TCP connect to the hub endpoint; honours HF_HUB_OFFLINE and HF_ENDPOINT."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as err:
        return False, f"{host}:{port} unreachable: {err}"


def hub_file(spec: str, repo_id: str, filenames: list[str], cache: Path | None = None, download: bool = True) -> Path:
    """Path of the first of ``filenames`` found for ``repo_id``: from the cache, else downloaded (with progress)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    cache = cache or weights_dir()
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=str(cache), local_files_only=True))
        except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError, OSError, ValueError):
            continue
    if not download:
        raise WeightsUnavailable(offline_message(spec, cache, "download not requested"))
    ok, detail = hub_reachable()
    if not ok:
        raise WeightsUnavailable(offline_message(spec, cache, detail))
    last: Exception | None = None
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=str(cache)))
        except Exception as err:  # noqa: BLE001 - try the next candidate name, report the last failure
            last = err
    raise WeightsUnavailable(f"could not download weights for '{spec}' from {repo_id}: {last}")


def hub_snapshot(spec: str, repo_id: str, cache: Path | None = None, download: bool = True) -> Path:
    """A whole hub repository (transformers models): the cached snapshot, else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    cache = cache or weights_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if not download:
        raise WeightsUnavailable(offline_message(spec, cache, "download not requested"))
    ok, detail = hub_reachable()
    if not ok:
        raise WeightsUnavailable(offline_message(spec, cache, detail))
    allow = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.bin"]
    return Path(snapshot_download(repo_id, cache_dir=str(cache), allow_patterns=allow))


def file_digest(path: Path) -> str:
    """sha256 of a weight file or of every file in a weight directory, memoised by (path, size, mtime)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo_file = weights_dir() / "digests.json"
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    memo[key] = digest
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass  # the memo is only a speed-up
    return digest
