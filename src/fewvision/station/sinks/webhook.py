"""Webhook sink: each message POSTed as JSON, signed with HMAC-SHA256 when a secret is configured.

2xx is delivered; a timeout, a refused connection, 5xx, 408 and 429 are retried (with back-off, by the station);
any other 4xx is the receiver refusing this message for good (:class:`Rejected`: logged, counted, passed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from .base import Rejected, known_options, positive

SIGNATURE_HEADER = "X-Fewvision-Signature"  # "sha256=" + hex HMAC-SHA256 of the body with the shared secret
ID_HEADER = "X-Fewvision-Id"  # the message's id, the receiver's idempotency key
RETRIED_4XX = (408, 429)


def check_options(options: dict, base: Path) -> dict:
    known_options(options, {"url", "secret_env", "timeout_s", "headers"})
    url = options.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"url: expected an http:// or https:// URL, got {url!r}")
    secret_env = options.get("secret_env")
    if secret_env is not None and (not isinstance(secret_env, str) or not secret_env):
        raise ValueError(f"secret_env: expected the name of an environment variable, got {secret_env!r}")
    headers = options.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ValueError("headers: expected a mapping of header names to strings")
    return {"url": url, "secret_env": secret_env, "timeout_s": positive(options, "timeout_s", 5.0),
            "headers": headers}


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSink:
    def __init__(self, name: str, options: dict, station: str, context: dict):
        self.name, self.options = name, options
        self.secret: bytes | None = None

    def open(self) -> None:
        env = self.options["secret_env"]
        if env:
            value = os.environ.get(env)
            if not value:
                raise RuntimeError(f"sink {self.name}: the environment variable {env} (secret_env) is not set")
            self.secret = value.encode()

    def send(self, message: dict) -> None:
        body = json.dumps(message, sort_keys=True).encode()
        headers = {"Content-Type": "application/json", ID_HEADER: str(message.get("id", "")),
                   "User-Agent": "fewvision-station", **self.options["headers"]}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.secret, body)
        request = urllib.request.Request(self.options["url"], data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.options["timeout_s"]) as response:
                response.read()
        except urllib.error.HTTPError as err:
            if 400 <= err.code < 500 and err.code not in RETRIED_4XX:
                raise Rejected(f"HTTP {err.code} {err.reason}") from None
            raise ConnectionError(f"HTTP {err.code} {err.reason}") from None

    def close(self) -> None:
        pass
