"""Shared by the service tests: a real PostgreSQL server (started by .ci/postgres.sh), fresh databases, a running
``fewvision serve`` process, and textile images as upload bytes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def postgres_server_url() -> str:
    """The test server's URL: $FEWVISION_TEST_POSTGRES (set by .ci/run), else started here by .ci/postgres.sh."""
    url = os.environ.get("FEWVISION_TEST_POSTGRES")
    if url:
        return url
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "postgres.sh")], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"the PostgreSQL server for the tests could not be started: {proc.stderr.strip()}")
    url = proc.stdout.strip().splitlines()[-1]
    os.environ["FEWVISION_TEST_POSTGRES"] = url
    return url


def fresh_postgres_database(server_url: str) -> str:
    """A new, empty database on the test server (the tests never share tables)."""
    from sqlalchemy import create_engine, text

    name = f"fv_{uuid.uuid4().hex[:12]}"
    engine = create_engine(server_url.replace("postgresql://", "postgresql+psycopg://", 1),
                           isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


# httpx's default is 5 s; on a loaded 2-core machine (two test workers, each with servers in subprocesses) one
# request to a server that has just started can take longer than that.
REQUEST_TIMEOUT_S = 120


def http(method: str, url: str, **kwargs) -> httpx.Response:
    """One request to a test server, with a timeout made for a loaded machine unless the call gives its own."""
    kwargs.setdefault("timeout", REQUEST_TIMEOUT_S)
    return httpx.request(method, url, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``fewvision serve`` in its own process, as a site runs it."""

    def __init__(self, data_dir: Path, db: str | None = None, extra: list[str] | None = None):
        self.data_dir, self.db, self.extra = Path(data_dir), db, list(extra or [])
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, *args: str) -> list[str]:
        db = ["--db", self.db] if self.db else []
        return [sys.executable, "-m", "fewvision.cli", *args, "--data-dir", str(self.data_dir), *db]

    def token(self, *args: str) -> str:
        out = subprocess.run(self.command("tokens", "create", *args), capture_output=True, text=True, check=True,
                             timeout=120)
        return out.stdout.strip().splitlines()[-1]

    def start(self, timeout: float = 120) -> "Server":
        self.log = open(self.data_dir / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(self.command("serve", "--port", str(self.port), *self.extra), stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, FEWVISION_CACHE_DIR=str(
                                         self.data_dir / "feature-cache")))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: "
                                   f"{(self.data_dir / f'server-{self.port}.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not answer in time")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no clean-up of any kind
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def textile_bytes(kind: str, start: int, n: int) -> list[tuple[str, bytes]]:
    from fewvision.io.datasets import textile_root

    paths = sorted((textile_root() / kind).glob("*.jpg"))[start : start + n]
    return [(p.name, p.read_bytes()) for p in paths]
