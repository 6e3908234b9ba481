"""Asking a large multimodal model (LMM) about an image.

Two backends share one interface, :class:`LMMBackend`: ``ask(path, prompt) -> Answer`` and
``ask_many([(path, prompt), ...]) -> [Answer, ...]`` (in input order, at most ``concurrency`` requests at a time).

* :class:`ChatCompletionsClient` talks to any OpenAI-compatible chat-completions server that takes images: Ollama,
  vLLM, llama.cpp server, LM Studio, OpenAI. The image goes in the user message as a base64 data URL, temperature 0.
  Failed requests are retried with exponential backoff on timeouts, connection errors, 429 and 5xx (never on other
  4xx); the API key comes from ``FEWVISION_LMM_API_KEY``, else ``OPENAI_API_KEY``.
* :class:`fewvision.lmm.local.LocalVLM` runs a small vision-language model in-process through transformers.

Answers are cached on disk by (image sha256, model, prompt), so a second run over the same images sends no request.

An answer is *unusable* when no text came back (timeout after the retries, HTTP error, malformed JSON, empty content)
or when the text is a refusal. The refusal test is a heuristic: the first sentence of the answer (up to 200
characters) is matched against apology and inability phrases - "sorry", "I can't/cannot/am unable to/am not able
to help|assist|identify|determine|...", "as an AI". Descriptions that merely say something is absent ("I can't see
any defect") are not refusals: "see" is deliberately not in the verb list.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..io.images import BadImage, load_image, sha256_file
from .answer_cache import NullAnswerCache, open_answer_cache

API_KEY_VARS = ("FEWVISION_LMM_API_KEY", "OPENAI_API_KEY")
RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx

_REFUSAL_VERBS = (
    "help|assist|comply|provide|process|answer|identify|determine|analy[sz]e|describe|classify|view|access|"
    "open|do that|fulfil|fulfill|support"
)
_REFUSAL = re.compile(
    r"^\s*(?:i'?m\s+)?sorry\b"
    r"|\bi\s+(?:am\s+)?(?:so\s+)?sorry\b"
    r"|\bi\s+apologi[sz]e\b"
    r"|\bi\s*(?:can'?t|cannot|can\s+not|won'?t|will\s+not|am\s+unable\s+to|'m\s+unable\s+to|am\s+not\s+able\s+to"
    r"|'m\s+not\s+able\s+to|m\s+unable\s+to)\s+(?:\w+\s+)?(?:" + _REFUSAL_VERBS + r")\b"
    r"|\bas\s+an\s+ai\b",
    re.IGNORECASE,
)


def first_sentence(text: str, limit: int = 200) -> str:
    text = text.strip().replace("\u2019", "'")
    m = re.search(r"[.!?\n]", text)
    return (text[: m.start() + 1] if m else text)[:limit]


def is_refusal(text: str) -> bool:
    """The documented refusal heuristic (see the module docstring)."""
    return bool(_REFUSAL.search(first_sentence(text)))


@dataclass(frozen=True)
class Answer:
    """What the model said (``text``), or why there is no usable answer (``error``)."""

    text: str
    error: str | None = None
    cached: bool = False

    @property
    def usable(self) -> bool:
        return self.error is None

    @classmethod
    def from_text(cls, text: str, cached: bool = False) -> "Answer":
        text = text.strip()
        if not text:
            return cls("", "empty answer", cached)
        if is_refusal(text):
            return cls(text, f"refusal: {first_sentence(text, 80)}", cached)
        return cls(text, None, cached)


class LMMBackend:
    """Base of the backends: the answer cache and the thread pool live here; subclasses implement ``_generate``.

    ``_generate(path, prompt)`` returns the model's raw text, or raises :class:`LMMRequestError` for a failure that
    must not be cached.
    """

    model_id: str = ""
    concurrency: int = 1

    def __init__(self, cache_dir: str | None = None, use_cache: bool = True):
        self.cache = open_answer_cache(cache_dir, enabled=use_cache)
        self.requests = 0  # calls that reached the model (HTTP requests for the client, generations locally)
        self.cache_hits = 0

    def _generate(self, path: str, prompt: str) -> str:
        raise LMMRequestError(f"{type(self).__name__} cannot generate")

    def describe(self) -> str:
        return self.model_id

    def ask(self, path: str | os.PathLike, prompt: str, sha256: str | None = None) -> Answer:
        path = str(path)
        try:
            sha = sha256 or sha256_file(path)
        except OSError as err:
            return Answer("", f"cannot read image ({err.strerror or err})")
        hit = self.cache.get(sha, self.model_id, prompt)
        if hit is not None:
            self.cache_hits += 1
            return Answer.from_text(hit, cached=True)
        try:
            text = self._generate(path, prompt)
        except LMMRequestError as err:
            return Answer("", str(err))
        except BadImage as err:
            return Answer("", f"cannot read image ({err.reason})")
        answer = Answer.from_text(text)
        if answer.text:  # usable answers and refusals; empty content is not cached
            self.cache.put(sha, self.model_id, prompt, answer.text)
        return answer

    def ask_many(self, items: Sequence[tuple[str, str]], shas: Sequence[str | None] | None = None) -> list[Answer]:
        """``[(path, prompt), ...]`` -> answers in the same order; ``concurrency`` requests in flight at most."""
        shas = list(shas) if shas is not None else [None] * len(items)
        if self.concurrency <= 1 or len(items) <= 1:
            return [self.ask(p, q, s) for (p, q), s in zip(items, shas)]
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="lmm") as pool:
            return list(pool.map(lambda a: self.ask(a[0][0], a[0][1], a[1]), zip(items, shas)))


class LMMRequestError(RuntimeError):
    """No text came back from the model; the message is the one-line reason shown in reports."""


def chat_completions_url(url: str) -> str:
    """``http://host:11434`` or ``.../v1`` or ``.../v1/chat/completions`` -> the chat-completions endpoint."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url, re.IGNORECASE):
        raise ValueError(f"--lmm-url '{url}' must start with http:// or https://")
    if url.endswith("/chat/completions"):
        return url
    if re.search(r"/v\d+$", url):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


_MAGIC = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png"}


def image_data_url(path: str | os.PathLike) -> str:
    """JPEG and PNG files go as they are; every other format is decoded (EXIF, 16-bit, alpha handled) and sent as PNG."""
    data = Path(path).read_bytes()
    mime = next((m for magic, m in _MAGIC.items() if data.startswith(magic)), None)
    if mime is None:
        image = load_image(path)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def api_key_from_env() -> str | None:
    for var in API_KEY_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


class ChatCompletionsClient(LMMBackend):
    """An OpenAI-compatible ``/chat/completions`` endpoint that accepts images (see the module docstring)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0, concurrency: int = 4,
                 max_tokens: int = 200, cache_dir: str | None = None, use_cache: bool = True):
        super().__init__(cache_dir, use_cache)
        if not model or not model.strip():
            raise ValueError("an LMM model name is needed (--lmm-model, e.g. llava or qwen2.5vl)")
        if timeout <= 0:
            raise ValueError(f"--lmm-timeout must be positive, got {timeout}")
        if concurrency < 1:
            raise ValueError(f"--lmm-concurrency must be at least 1, got {concurrency}")
        self.endpoint = chat_completions_url(url)
        self.model = model.strip()
        self.model_id = self.model
        self.api_key = api_key if api_key is not None else api_key_from_env()
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, max(0, retries), backoff, max_backoff
        self.concurrency, self.max_tokens = concurrency, max_tokens

    def describe(self) -> str:
        return f"{self.model} at {self.endpoint}"

    def payload(self, path: str, prompt: str) -> dict:
        return {
            "model": self.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "stream": False,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt},
                    {"type": "image_url", "image_url": {"url": image_data_url(path)}},
                ],
            }],
        }

    def _post(self, body: bytes) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            try:
                detail = err.read()
            except (OSError, ValueError):
                detail = b""
            return err.code, detail

    def _generate(self, path: str, prompt: str) -> str:
        body = json.dumps(self.payload(path, prompt)).encode("utf-8")
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                time.sleep(delay * (0.75 + 0.5 * random.random()))
            try:
                status, raw = self._post(body)
            except (socket.timeout, TimeoutError):
                reason = f"timed out after {self.timeout:g} s"
                continue
            except urllib.error.URLError as err:
                inner = err.reason
                if isinstance(inner, (socket.timeout, TimeoutError)):
                    reason = f"timed out after {self.timeout:g} s"
                else:
                    reason = f"cannot connect to {self.endpoint} ({inner})"
                continue
            except (ConnectionError, OSError) as err:  # reset mid-response, remote closed, ...
                reason = f"connection error ({err})"
                continue
            if status >= 500 or status in RETRY_STATUS:
                reason = f"HTTP {status}{_error_detail(raw)}"
                continue
            if status >= 400:
                raise LMMRequestError(f"HTTP {status}{_error_detail(raw)}")
            return parse_chat_response(raw)
        tries = self.retries + 1
        raise LMMRequestError(f"{reason} ({tries} attempt{'s' if tries > 1 else ''})")


def _error_detail(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        err = data.get("error") if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        msg = raw.decode("utf-8", "replace")
    msg = " ".join(str(msg or "").split())[:160]
    return f": {msg}" if msg else ""


def parse_chat_response(raw: bytes) -> str:
    """The text of ``choices[0].message.content`` (a string, or a list of text parts). Raises LMMRequestError."""
    try:
        data = json.loads(raw)
    except ValueError:
        snippet = " ".join(raw[:60].decode("utf-8", "replace").split())
        raise LMMRequestError(f"malformed JSON in the response ({snippet!r})") from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LMMRequestError("malformed response: no choices[0].message.content") from None
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise LMMRequestError("malformed response: message content is not text")
    return content


__all__ = ["Answer", "LMMBackend", "ChatCompletionsClient", "LMMRequestError", "is_refusal", "chat_completions_url",
           "NullAnswerCache"]
