"""What every HTTP request goes through before its route: the token of a request with a body is checked before any
of the body is read, and every response carries the headers that keep a browser from misusing it.

A pure ASGI middleware (no body buffering): FastAPI parses a route's form and files before the route's dependencies
run, so without this an anonymous client could make the server read, and spool to disk, an upload of any size
before hearing 401. The size of what is read is capped by FastAPI's own ``max_body_size`` (see ``app.py``).
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .common import ServiceError

BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
# The page loads nothing from elsewhere and is never framed; JSON and images are never sniffed as HTML.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def error(status: int, code: str, message: str) -> JSONResponse:
    """The service's error answer: ``{"error": {"code", "message"}}`` with a 4xx (or 500) status."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, else None."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None


class Guard:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = scope["path"].startswith("/v1/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if api and "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"  # inspection data stays out of shared caches
            await send(message)

        if api and scope["method"] in BODY_METHODS:
            service = scope["app"].state.service
            try:
                token = await run_in_threadpool(service.authenticate, bearer(Headers(scope=scope).get("authorization")))
            except ServiceError as err:
                return await error(err.status, err.code, err.message)(scope, receive, send_with_headers)
            scope.setdefault("state", {})["token"] = token  # the route's own check reuses it
        await self.app(scope, receive, send_with_headers)
