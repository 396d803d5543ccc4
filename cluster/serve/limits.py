"""Request-size limits shared by the HTTP and gRPC front doors, and where they are read.

The gRPC request parser runs inside Serve's gRPC proxy, a Ray actor that receives no raylm
configuration; it reads the limit from the environment that `raylm serve` sets before it starts
Ray (every Ray process inherits it). The HTTP limit is an app argument (AppConfig)."""
from __future__ import annotations

import os

# Large enough for a long-context prompt as token ids in JSON (128k ids ~ 1 MB) batched many
# times over; small enough that one request cannot take gigabytes of a proxy's memory.
DEFAULT_MAX_REQUEST_BYTES = 32 << 20
MAX_REQUEST_BYTES_ENV = "RAYLM_MAX_REQUEST_BYTES"
# Serve's gRPC proxy sizes its server's receive limit from this variable (default 2 GiB).
RAY_GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
API_KEY_ENV = "RAYLM_API_KEY"


def max_request_bytes_from_env() -> int:
    raw = os.environ.get(MAX_REQUEST_BYTES_ENV)
    if not raw:
        return DEFAULT_MAX_REQUEST_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_REQUEST_BYTES_ENV} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{MAX_REQUEST_BYTES_ENV} must be >= 1, got {value}")
    return value


def export_limits(max_request_bytes: int) -> None:
    """Before Ray starts: let the gRPC proxy (and grpc itself) refuse larger messages."""
    os.environ[MAX_REQUEST_BYTES_ENV] = str(max_request_bytes)
    os.environ[RAY_GRPC_MAX_MESSAGE_ENV] = str(max_request_bytes)


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None
