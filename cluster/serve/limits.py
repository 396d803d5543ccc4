"""Request-size limits shared by the HTTP and gRPC front doors, where they are read, and the
transport settings of the serving path (serve_transport_env, HANDLE_TRANSPORTS).

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
# Serve's replica-to-replica gRPC channels (the proxy -> ingress hop with
# RAY_SERVE_PROXY_USE_GRPC=1, and the ingress -> LLMServer token streams with handle_transport
# "grpc") refuse messages over this many bytes (Serve's default: 4 MiB). A request may be up to
# max_request_bytes and a first stream item with prompt logprobs of a long context far more.
RAY_REPLICA_GRPC_MESSAGE_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
REPLICA_GRPC_MESSAGE_BYTES = 512 << 20
# Serve's proxy forwards to the ingress over gRPC instead of Ray actor calls (README "Serving
# path": fewer hops per streamed item); "0" opts out.
PROXY_USE_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"
# How Serve's processes share the CPU with the step thread, which keeps every core busy:
# - Serve runs a replica's user code on an event loop of its own (a second thread) and the
#   handle's router on a third by default: every streamed item then crosses threads (a wake-up
#   of the other loop). On the replica's main loop it goes straight to the socket: the serving
#   threads of a replica streaming at concurrency 32 used about a third less CPU per token
#   (grpc 0.71 -> 0.48 CPU-seconds per 10 s, http 0.72 -> 0.56; Serve's own "throughput
#   optimized" mode sets the same two). LLMServer never blocks its loop: long tokenization and
#   the engine run on threads of their own.
# - Ray starts its worker processes at nice 15 (Ray's worker_niceness), below the client, the
#   proxy and Ray's own daemons: every one of their wake-ups then takes a core from the step,
#   whose other thread waits for it at the next barrier. At nice 0 (this variable) the replica
#   competes on equal terms: `raylm bench serve --protocol engine,grpc,http --rounds 5` at
#   concurrency 32 gave grpc 0.88-0.92 and http 0.92-0.97 of the engine's throughput at nice 15
#   (3 runs), grpc 0.90-1.01 (mean 0.96) and http 0.96-1.00 at nice 0 (4 runs; bench model,
#   2 cores).
#   Ray's daemons stay at their own priority; set RAY_worker_niceness=15 to keep Ray's default.
SERVE_PROCESS_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                     "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                     "RAY_worker_niceness": "0"}
# How token streams travel from LLMServer to the ingress (AppConfig.handle_transport): Serve's
# direct gRPC channel to the replica, or Ray actor calls (Serve's default).
HANDLE_TRANSPORTS = ("grpc", "actor")


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


def replica_message_bytes(max_request_bytes: int) -> int:
    return min(max(REPLICA_GRPC_MESSAGE_BYTES, 2 * max_request_bytes), (1 << 31) - 1)


def serve_transport_env(max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> dict[str, str]:
    """The environment raylm's serving path wants Serve's processes to start with (values the
    caller's environment already sets win)."""
    return {PROXY_USE_GRPC_ENV: os.environ.get(PROXY_USE_GRPC_ENV, "1"),
            RAY_REPLICA_GRPC_MESSAGE_ENV: os.environ.get(
                RAY_REPLICA_GRPC_MESSAGE_ENV, str(replica_message_bytes(max_request_bytes))),
            **{key: os.environ.get(key, value) for key, value in SERVE_PROCESS_ENV.items()}}


def export_limits(max_request_bytes: int) -> None:
    """Before Ray starts: let the gRPC proxy (and grpc itself) refuse larger messages."""
    os.environ[MAX_REQUEST_BYTES_ENV] = str(max_request_bytes)
    os.environ[RAY_GRPC_MAX_MESSAGE_ENV] = str(max_request_bytes)


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None
