"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for the LMM tests.

It listens on an ephemeral port of the loopback interface only, answers POST ``.../chat/completions`` from a script,
and records every request (image sha256 decoded from the data URL, prompt text, model, temperature, headers). It is
bounded: past ``max_requests`` it answers 503 without running the script, and a scripted delay is capped at
``max_delay`` seconds.

A script is a callable ``Request -> Action``; :func:`by_image` builds one from ``{sha256: action or [actions per
attempt]}`` (the last action repeats), with an optional separate table for prompts that contain a marker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Action:
    text: str | None = None  # the answer's content
    status: int = 200
    delay: float = 0.0  # seconds to wait before answering
    raw: bytes | None = None  # a body sent as is (malformed JSON, ...)


def reply(text: str) -> Action:
    return Action(text=text)


def status(code: int, message: str = "scripted failure") -> Action:
    return Action(status=code, raw=json.dumps({"error": {"message": message}}).encode())


def slow(seconds: float, text: str = "too late") -> Action:
    return Action(text=text, delay=seconds)


def raw(body: bytes) -> Action:
    return Action(raw=body)


@dataclass
class Request:
    path: str
    sha256: str | None
    mime: str | None
    prompt: str
    model: str | None
    temperature: object
    authorization: str | None
    attempt: int  # 1 for the first request with this (image, prompt), 2 for the next, ...
    body: dict = field(repr=False, default_factory=dict)


def by_image(answers: dict, default: Action | None = None, marker: str | None = None,
             marked: dict | None = None) -> Callable[[Request], Action]:
    """Script from per-image tables; requests whose prompt contains ``marker`` use ``marked`` instead."""

    def script(req: Request) -> Action:
        table = marked if marker is not None and marked is not None and marker in req.prompt else answers
        item = table.get(req.sha256, default)
        if item is None:
            return status(404, "no scripted answer for this image")
        if isinstance(item, list):
            return item[min(req.attempt, len(item)) - 1]
        return item

    return script


class ScriptedLMMServer:
    def __init__(self, script: Callable[[Request], Action], max_requests: int = 500, max_delay: float = 3.0):
        self.script = script
        self.max_requests = max_requests
        self.max_delay = max_delay
        self.requests: list[Request] = []
        self._attempts: dict[tuple, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                return

            def _send(self, code: int, body: bytes) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, b'{"error": {"message": "not found"}}')
                req = server._record(self.path, data, self.headers.get("Authorization"))
                if req is None:
                    return self._send(503, b'{"error": {"message": "request budget of the test server spent"}}')
                action = server.script(req)
                if action.delay:
                    time.sleep(min(action.delay, server.max_delay))
                if action.raw is not None:
                    return self._send(action.status, action.raw)
                body = {"id": "chatcmpl-test", "object": "chat.completion", "model": req.model,
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": action.text}}]}
                return self._send(action.status, json.dumps(body).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _record(self, path: str, data: bytes, authorization: str | None) -> Request | None:
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        prompt, sha, mime = "", None, None
        for message in body.get("messages", []):
            content = message.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            for part in parts:
                if part.get("type") == "text":
                    prompt += part.get("text", "")
                elif part.get("type") == "image_url":
                    url = part["image_url"]["url"]
                    head, _, b64 = url.partition(",")
                    mime = head.removeprefix("data:").removesuffix(";base64")
                    sha = hashlib.sha256(base64.b64decode(b64)).hexdigest()
        with self._lock:
            if len(self.requests) >= self.max_requests:
                return None
            key = (sha, prompt)
            self._attempts[key] = self._attempts.get(key, 0) + 1
            req = Request(path, sha, mime, prompt, body.get("model"), body.get("temperature"), authorization,
                          self._attempts[key], body)
            self.requests.append(req)
            return req

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def count_for(self, sha256: str) -> int:
        with self._lock:
            return sum(r.sha256 == sha256 for r in self.requests)

    def __enter__(self) -> "ScriptedLMMServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
