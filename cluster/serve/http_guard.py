"""The HTTP front door's checks, before a route reads the body: API key, body size, docs pages.

A plain ASGI middleware: it answers with OpenAI-style errors without reading (or buffering) a
body it is going to refuse. Its settings come from the ingress replica (`GuardSettings`), which
sets them once at start; the middleware object is built by Starlette at the first request."""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from starlette.exceptions import HTTPException

from raylm.cluster.serve.errors import ServeError

OPEN_PATHS = frozenset({"/health"})  # load balancers and probes carry no key
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


@dataclass(frozen=True)
class GuardSettings:
    api_key: str | None = None
    max_request_bytes: int = 32 << 20
    docs: bool = True

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")
        if not isinstance(self.max_request_bytes, int) or self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be a positive integer, "
                             f"got {self.max_request_bytes!r}")


_settings = GuardSettings()
_draining = False


def configure(settings: GuardSettings) -> None:
    """Called by the ingress replica at start (one ingress per replica process)."""
    global _settings
    _settings = settings


def start_draining() -> None:
    """Shutting down: new requests get 503 while the ones in flight finish."""
    global _draining
    _draining = True


def draining() -> bool:
    return _draining


def bearer_token_ok(header: str | None, api_key: str) -> bool:
    """`Authorization: Bearer <key>`, compared in constant time."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


class _BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI lets an HTTPException through its body parsing, and the
    app's HTTPException handler renders it in OpenAI's error shape."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large(limit).message)


class RequestGuard:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = _settings
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if _draining and path not in OPEN_PATHS:
            await _reply(send, ServeError("unavailable", "the server is shutting down"))
            return
        if path in DOCS_PATHS and not settings.docs:
            await _reply(send, ServeError("not_found", "the API docs are turned off"))
            return
        if (settings.api_key is not None and path not in OPEN_PATHS
                and not bearer_token_ok(headers.get("authorization"), settings.api_key)):
            await _reply(send, ServeError(
                "unauthenticated", "a valid API key is required: send 'Authorization: Bearer "
                                   "<key>'"), {"www-authenticate": "Bearer"})
            return
        limit = settings.max_request_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _reply(send, _too_large(limit))
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body with no length, or one that lied
                    raise _BodyTooLarge(limit)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _reply(send, _too_large(limit))


def _too_large(limit: int) -> ServeError:
    return ServeError("too_large", f"the request body is larger than the limit of {limit} bytes")


async def _reply(send, err: ServeError, extra_headers: dict[str, str] | None = None) -> None:
    body = json.dumps(err.openai_body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
