"""FeatureCache: round trips, views, concurrent writers in separate processes, and kill -9 in the middle of a write."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fewvision.features.cache import FeatureCache, NullCache, cache_path, open_cache

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Shared by the parent and the child processes: the content of an entry is a pure function of its key, so the
# parent can check every row a child wrote without being told what it wrote.
_CONTENT = textwrap.dedent(
    """
    import hashlib
    import numpy as np

    def content(sha, view, n):
        seed = int.from_bytes(hashlib.sha256(f"{sha}|{view}".encode()).digest()[:8], "little")
        return np.random.default_rng(seed).random(n, dtype=np.float32) - 0.5
    """
)

# The children import only fewvision.features.cache: importing the package itself pulls in torch (seconds per process),
# which would dominate these tests. The cache module and its relative imports are the real ones.
_IMPORT_CACHE_ONLY = textwrap.dedent(
    """
    import sys, types
    if "fewvision" not in sys.modules:
        _pkg = types.ModuleType("fewvision")
        _pkg.__path__ = [__import__("os").path.join(sys.argv[1], "fewvision")]
        sys.modules["fewvision"] = _pkg
    """
)
_ns: dict = {}
exec(_CONTENT, _ns)
content = _ns["content"]


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("FEWVISION_CACHE_DIR", None)
    return env


def _spawn(script: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CONTENT + _IMPORT_CACHE_ONLY + textwrap.dedent(script), SRC, *args],
        env=_child_env(), text=True, **kw,
    )


# --------------------------------------------------------------------------------------------------------------
# single process
# --------------------------------------------------------------------------------------------------------------


def test_round_trip_preserves_dtype_shape_and_values(tmp_path):
    cache = FeatureCache("bb-test", root=tmp_path)
    rng = np.random.default_rng(0)
    items = {
        ("a" * 64, "global:base"): rng.standard_normal(512).astype(np.float32),
        ("b" * 64, "global:base"): rng.standard_normal(768).astype(np.float16),
        ("c" * 64, "patch:base"): rng.standard_normal((384, 16, 16)).astype(np.float16),
        ("d" * 64, "patch:base"): rng.standard_normal((8, 7, 5)).astype(np.float32),
        ("e" * 64, "global:base"): np.asfortranarray(rng.standard_normal((3, 4))).astype(np.float32),
        ("f" * 64, "global:base"): rng.standard_normal((6, 8)).astype(np.float32)[:, ::2],  # non-contiguous view
    }
    cache.put_many(items)
    assert cache.path == cache_path("bb-test", tmp_path)
    assert cache.path.is_file()
    assert len(cache) == len(items)

    for reader in (cache, FeatureCache("bb-test", root=tmp_path)):  # same connection, and a fresh one
        got = reader.get_many(list(items))
        assert set(got) == set(items)
        for key, arr in items.items():
            assert got[key].dtype == arr.dtype, key
            assert got[key].shape == arr.shape, key
            np.testing.assert_array_equal(got[key], arr)
    cache.close()


def test_missing_keys_are_absent_and_views_are_separate(tmp_path):
    cache = FeatureCache("bb", root=tmp_path)
    sha = "0" * 64
    base = np.arange(4, dtype=np.float32)
    aug = np.arange(4, dtype=np.float32) * 10
    cache.put_many({(sha, "global:base"): base})
    assert cache.get_many([(sha, "global:rrc:1")]) == {}
    cache.put_many({(sha, "global:rrc:1"): aug})

    got = cache.get_many([(sha, "global:base"), (sha, "global:rrc:1"), (sha, "patch:base"), ("1" * 64, "global:base")])
    assert set(got) == {(sha, "global:base"), (sha, "global:rrc:1")}
    np.testing.assert_array_equal(got[(sha, "global:base")], base)
    np.testing.assert_array_equal(got[(sha, "global:rrc:1")], aug)
    assert cache.get_many([]) == {}
    assert cache.get_many(iter([("9" * 64, "x")])) == {}
    cache.put_many({})  # nothing to do, no error
    assert len(cache) == 2


def test_overwrite_and_many_keys(tmp_path):
    cache = FeatureCache("bb", root=tmp_path)
    keys = [(f"{i:064x}", "global:base") for i in range(1234)]  # more than one SQL chunk of 500
    cache.put_many({k: np.full(3, i, dtype=np.float32) for i, k in enumerate(keys)})
    got = cache.get_many(keys + [("f" * 64, "global:base")])
    assert len(got) == len(keys)
    assert all(got[k][0] == i for i, k in enumerate(keys))
    cache.put_many({keys[0]: np.full(5, -1, dtype=np.float16)})  # replaced, with its new dtype and shape
    new = cache.get_many([keys[0]])[keys[0]]
    assert new.dtype == np.float16 and new.shape == (5,) and (new == -1).all()


def test_backbones_are_separate_files(tmp_path):
    a, b = FeatureCache("bb-a", root=tmp_path), FeatureCache("bb-b", root=tmp_path)
    key = ("a" * 64, "global:base")
    a.put_many({key: np.ones(2, dtype=np.float32)})
    assert b.get_many([key]) == {}
    assert a.path != b.path


def test_null_cache_and_open_cache(tmp_path):
    null = open_cache("bb", tmp_path, enabled=False)
    assert isinstance(null, NullCache)
    null.put_many({("a", "v"): np.ones(2)})
    assert null.get_many([("a", "v")]) == {} and len(null) == 0
    assert isinstance(open_cache("bb", tmp_path), FeatureCache)


def test_put_many_failure_rolls_back(tmp_path):
    cache = FeatureCache("bb", root=tmp_path)
    good = {("a" * 64, "v"): np.ones(2, dtype=np.float32)}
    cache.put_many(good)

    # the second row violates NOT NULL inside the transaction, after the first row was inserted
    with pytest.raises(sqlite3.IntegrityError):
        cache.put_many({("b" * 64, "v"): np.ones(2, dtype=np.float32), (None, "v"): np.ones(2, dtype=np.float32)})
    assert set(cache.get_many([("a" * 64, "v"), ("b" * 64, "v")])) == {("a" * 64, "v")}
    cache.put_many({("d" * 64, "v"): np.zeros(1, dtype=np.float32)})  # the connection is still usable
    assert len(cache) == 2


# --------------------------------------------------------------------------------------------------------------
# two processes at once
# --------------------------------------------------------------------------------------------------------------

_WRITER = """
import sys
from fewvision.features.cache import FeatureCache

root, name, n_batches = sys.argv[2], sys.argv[3], int(sys.argv[4])
cache = FeatureCache("bb-concurrent", root=root)
print("ready", flush=True)
sys.stdin.readline()  # start together
for b in range(n_batches):
    items = {}
    for j in range(5):
        key = (f"{name}-{b}-{j}", "global:base")  # only this process writes these
        items[key] = content(*key, 64 + b % 7)
    shared = (f"shared-{b}", "global:base" if b % 2 else "patch:base")  # both processes write these
    items[shared] = content(*shared, 32)
    cache.put_many(items)
    got = cache.get_many(list(items))  # reading while the other process writes
    assert set(got) == set(items), "own write not visible"
print("done", flush=True)
"""


def test_two_processes_write_the_same_cache(tmp_path):
    n = 200
    procs = [
        _spawn(_WRITER, str(tmp_path), name, str(n), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE)
        for name in ("p0", "p1")
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert out.strip() == "done"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    cache = FeatureCache("bb-concurrent", root=tmp_path)
    expected = {}
    for name in ("p0", "p1"):
        for b in range(n):
            for j in range(5):
                key = (f"{name}-{b}-{j}", "global:base")
                expected[key] = content(*key, 64 + b % 7)
    for b in range(n):
        key = (f"shared-{b}", "global:base" if b % 2 else "patch:base")
        expected[key] = content(*key, 32)
    got = cache.get_many(list(expected))
    assert set(got) == set(expected)
    for key, arr in expected.items():
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], arr)
    assert len(cache) == len(expected)
    with sqlite3.connect(cache.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --------------------------------------------------------------------------------------------------------------
# kill -9 in the middle of a write
# --------------------------------------------------------------------------------------------------------------

_BIG_N = 50  # entries per batch
_BIG_FLOATS = 256 * 1024  # 1 MB of float32 per entry

_KILLED_WRITER = f"""
import sys
from fewvision.features.cache import FeatureCache

root, tag = sys.argv[2], sys.argv[3]
cache = FeatureCache("bb-kill", root=root)
b = 0
while True:
    items = {{}}
    for j in range({_BIG_N}):
        key = (f"{{tag}}-{{b}}-{{j}}", "patch:base")
        items[key] = content(*key, {_BIG_FLOATS}).reshape(256, 32, 32)
    print("begin", b, flush=True)
    cache.put_many(items)
    print("committed", b, flush=True)
    b += 1
"""


def _batch_keys(tag: str, b: int) -> list[tuple[str, str]]:
    return [(f"{tag}-{b}-{j}", "patch:base") for j in range(_BIG_N)]


def _kill_while_writing(root: Path, tag: str, after_commits: int, delay_s: float) -> tuple[int, list[str]]:
    """Run the writer until it has committed ``after_commits`` batches and started the next one, wait ``delay_s``,
    SIGKILL it. Returns the number of batches it reported committed and its stdout lines."""
    proc = _spawn(_KILLED_WRITER, str(root), tag, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"writer exited early: {proc.stderr.read()}")
            lines.append(line.strip())
            if line.strip() == f"begin {after_commits}":
                break
            assert time.monotonic() < deadline, "writer too slow"
        time.sleep(delay_s)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # what it printed between our last read and the kill
    lines.extend(line.strip() for line in proc.stdout.read().splitlines())
    proc.stdout.close()
    proc.stderr.close()
    committed = sum(1 for line in lines if line.startswith("committed"))
    return committed, lines


def test_kill_9_mid_write_leaves_a_consistent_cache(tmp_path):
    rounds = [("r0", 2, 0.0), ("r1", 2, 0.05), ("r2", 3, 0.15)]
    mid_transaction = 0
    for tag, after, delay in rounds:
        committed, lines = _kill_while_writing(tmp_path, tag, after, delay)
        assert committed >= after, lines
        in_flight = committed  # the batch it had begun (or was preparing) when killed

        cache = FeatureCache("bb-kill", root=tmp_path)  # opens fine after the kill (WAL recovery)
        all_keys = [k for b in range(in_flight + 2) for k in _batch_keys(tag, b)]
        got = cache.get_many(all_keys)
        # every committed batch is fully present
        for b in range(committed):
            missing = [k for k in _batch_keys(tag, b) if k not in got]
            assert not missing, f"{tag}: batch {b} was reported committed but {len(missing)} rows are missing"
        # the batch being written when the process died is all there or not there at all
        present = sum(k in got for k in _batch_keys(tag, in_flight))
        assert present in (0, _BIG_N), f"{tag}: partial batch visible ({present}/{_BIG_N} rows)"
        if present == 0 and lines[-1] == f"begin {in_flight}":
            mid_transaction += 1
        assert not any(k in got for k in _batch_keys(tag, in_flight + 1))
        # every row read back is complete and exactly what the writer wrote for that key
        for key, arr in got.items():
            assert arr.dtype == np.float32 and arr.shape == (256, 32, 32), key
            np.testing.assert_array_equal(arr.reshape(-1), content(*key, _BIG_FLOATS))
        # rows from earlier rounds survived this kill
        for prev_tag, _, _ in rounds[: rounds.index((tag, after, delay))]:
            keys = _batch_keys(prev_tag, 0)[:3] + _batch_keys(prev_tag, 1)[-3:]
            got_prev = cache.get_many(keys)
            assert set(got_prev) == set(keys)
            for key in keys:
                np.testing.assert_array_equal(got_prev[key].reshape(-1), content(*key, _BIG_FLOATS))

        # writing afterwards works, and so does a second process-level open
        key = (f"after-{tag}", "global:base")
        cache.put_many({key: content(*key, 16)})
        np.testing.assert_array_equal(FeatureCache("bb-kill", root=tmp_path).get_many([key])[key], content(*key, 16))
        cache.close()
    with sqlite3.connect(cache.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # the kill is timed right after 'begin': it should have landed inside put_many at least once
    assert mid_transaction >= 1
    shutil.rmtree(cache.path.parent, ignore_errors=True)  # a few hundred MB: don't leave them in pytest's tmp


def test_cache_usable_from_threads(tmp_path):
    cache = FeatureCache("bb-threads", root=tmp_path)
    errors = []

    def work(t):
        try:
            for b in range(20):
                key = (f"t{t}-{b}", "global:base")
                cache.put_many({key: content(*key, 8)})
                assert key in cache.get_many([key])
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(cache) == 80
