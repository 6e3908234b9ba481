"""Shared by the station tests: a real Mosquitto broker on loopback, an MQTT subscriber, a scripted webhook
receiver, a station run in a thread or as a process, and image files landing in a folder as a camera writes them."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from service_helpers import free_port

MOSQUITTO = next((p for p in ("/usr/sbin/mosquitto", shutil.which("mosquitto") or "") if p and os.path.exists(p)),
                 None)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    """Poll until ``condition()``; fail naming ``what`` after ``timeout`` seconds (the test stops by itself)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


class Broker:
    """Debian's mosquitto on 127.0.0.1, with persistence so that sessions survive a stop and start."""

    def __init__(self, folder: Path, password_file: Path | None = None, tls: dict | None = None):
        if MOSQUITTO is None:
            raise RuntimeError("the station tests need Debian's mosquitto (bash .ci/system-deps.sh as root)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "persistence true", f"persistence_location {folder}/",
                 "log_dest none"]
        if os.geteuid() == 0:
            lines.append("user root")  # keep writing the persistence folder after start
        if password_file is not None:
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        self.tls_port = None
        if tls is not None:  # a second listener, TLS (the first stays plain for the test's subscriber)
            self.tls_port = free_port()
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {tls['ca']}", f"certfile {tls['cert']}",
                      f"keyfile {tls['key']}"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        import socket

        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()[-500:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 20, "mosquitto to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None


def passwords(folder: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file (hashed by Debian's mosquitto_passwd)."""
    path = folder / "passwords"
    folder.mkdir(parents=True, exist_ok=True)
    path.touch()
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True, capture_output=True)
    return path


def tls_files(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files), made with cryptography."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, public_key, signing_key, ca: bool, san=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fewvision test CA")])
    server = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    ca = cert(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    srv = cert(server, ca_name, key.public_key(), ca_key, False, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    out = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return out


class Subscriber:
    """An MQTT client with a persistent session (fixed id, clean session off): it gets, at QoS 1, what was published
    while it was away. ``messages``: (topic, payload as text) in arrival order."""

    def __init__(self, broker: Broker, topics: list[str], client_id: str = "fewvision-test-subscriber",
                 username: str | None = None, password: str | None = None):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=1)
        self.connected = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties):
            if not reason_code.is_failure:
                for t in topics:
                    client.subscribe(t, qos=1)
                self.connected.set()

        def on_message(client, userdata, msg):
            with self._lock:
                self.messages.append((msg.topic, msg.payload.decode()))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        wait_for(self.connected.is_set, 20, "the subscriber to connect")

    def on(self, topic: str) -> list[str]:
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class WebhookReceiver:
    """An HTTP receiver answering each POST with the next status of ``script`` (then 200), recording every request
    (headers and JSON body)."""

    def __init__(self, script: list[int] | Callable[[dict, int], int] = ()):
        self.requests: list[tuple[dict, bytes, int]] = []
        self._script = script
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                n = len(receiver.requests)
                if callable(receiver._script):
                    status = receiver._script(json.loads(body), n)
                else:
                    status = receiver._script[n] if n < len(receiver._script) else 200
                receiver.requests.append((dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/inspections"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def bodies(self, status: int | None = None) -> list[dict]:
        return [json.loads(b) for _, b, s in self.requests if status is None or s == status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def signed(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def land(src: Path, folder: Path, name: str) -> Path:
    """A camera that writes a temp name and renames it when done (the station never sees the temp name)."""
    tmp = folder / f".{name}.tmp"
    shutil.copyfile(src, tmp)
    dest = folder / name
    os.replace(tmp, dest)
    return dest


def write_station(folder: Path, model: Path, sinks: list[dict], /, **extra) -> Path:
    import yaml

    config = {"name": "cam1", "model": str(model),
              "source": {"folder": "incoming",
                         "after": {"ok": "out/ok", "ng": "out/ng", "review": "out/review", "error": "out/error"},
                         "part_id": "(?P<part>[A-Z0-9]+)_"},
              "sinks": sinks, "store": "station.sqlite",
              "monitor": False}  # the sinks' tests count verdict messages; the monitor's test turns it on
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = folder / "station.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextmanager
def running(station_file: Path, **kwargs):
    """The station of ``station_file`` judging in a thread of this process until the block ends."""
    from fewvision.station.config import load_config
    from fewvision.station.run import Station

    station = Station(load_config(station_file), **kwargs)
    station.start()
    stop = threading.Event()
    thread = threading.Thread(target=station.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield station
    finally:
        stop.set()
        thread.join(60)
        station.close()


def station_process(station_file: Path, *args: str, threads: int | None = 1) -> subprocess.Popen:
    """``fewvision station run`` as its own process (one torch thread by default: the tests run two at a time)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, "-m", "fewvision.cli", "station", "run", str(station_file), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def store_rows(station_dir: Path, sql: str = "select uid, filename, decision, path from predictions order by id"):
    import sqlite3

    db = station_dir / "station.sqlite"
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # the schema is being created
        return []
    finally:
        conn.close()
