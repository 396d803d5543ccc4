"""One error vocabulary for both APIs: a kind maps to an HTTP status, a gRPC code and an
OpenAI error type. Errors cross the Ray boundary from LLMServer to the ingress as plain dicts
(`{"error": {...}}`), never as pickled exceptions, so the ingress can map them exactly."""
from __future__ import annotations

import logging
import re

import grpc

from raylm.cluster.errors import EngineDeadError, QueueFullError, RequestFailedError

logger = logging.getLogger(__name__)

# What a client reads for an error nobody anticipated: the details (exception text, file paths)
# go to the server log only.
INTERNAL_MESSAGE = "internal server error (the details are in the server log)"

# kind -> (HTTP status, gRPC status code, OpenAI error type)
_KINDS: dict[str, tuple[int, grpc.StatusCode, str]] = {
    "invalid_argument": (400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    "unauthenticated": (401, grpc.StatusCode.UNAUTHENTICATED, "authentication_error"),
    "not_found": (404, grpc.StatusCode.NOT_FOUND, "not_found_error"),
    "too_large": (413, grpc.StatusCode.RESOURCE_EXHAUSTED, "invalid_request_error"),
    "resource_exhausted": (429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error"),
    "cancelled": (499, grpc.StatusCode.CANCELLED, "cancelled"),
    "unavailable": (503, grpc.StatusCode.UNAVAILABLE, "service_unavailable_error"),
    "deadline_exceeded": (504, grpc.StatusCode.DEADLINE_EXCEEDED, "timeout_error"),
    "internal": (500, grpc.StatusCode.INTERNAL, "internal_server_error"),
}

# ValueErrors from SamplingParams / the engine start with the offending field's name.
_FIELD_RE = re.compile(r"^([a-z_][a-z0-9_]*)\b")


class ServeError(Exception):
    """An error the APIs report to the client (see _KINDS for the status codes). Picklable:
    Ray may carry it from the ingress replica to the gRPC proxy."""

    def __init__(self, kind: str, message: str, param: str | None = None) -> None:
        assert kind in _KINDS, kind
        # Messages may quote client text: never let a lone surrogate break the error response.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        if param is not None:
            param = param.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(kind, message, param)
        self.kind, self.message, self.param = kind, message, param

    def __str__(self) -> str:
        return self.message

    @property
    def http_status(self) -> int:
        return _KINDS[self.kind][0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _KINDS[self.kind][1]

    def to_dict(self) -> dict:
        return {"error": {"kind": self.kind, "message": self.message, "param": self.param}}

    @classmethod
    def from_dict(cls, item: dict) -> "ServeError":
        err = item["error"]
        return cls(err["kind"], err["message"], err.get("param"))

    def openai_body(self) -> dict:
        """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": _KINDS[self.kind][2],
                          "param": self.param, "code": self.http_status}}


def error_from_exception(exc: BaseException) -> ServeError:
    """Classify an engine exception (ValueError names the field that is wrong)."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, QueueFullError):
        return ServeError("resource_exhausted", str(exc) or "the request queue is full")
    if isinstance(exc, EngineDeadError):
        return ServeError("unavailable", str(exc) or "the engine is not running")
    if isinstance(exc, ValueError):
        message = str(exc)
        match = _FIELD_RE.match(message)
        return ServeError("invalid_argument", message, match.group(1) if match else None)
    if isinstance(exc, RequestFailedError):
        return ServeError("internal", str(exc))  # written for clients: names no file or code
    logger.error("unexpected error", exc_info=exc)
    return ServeError("internal", INTERNAL_MESSAGE)
