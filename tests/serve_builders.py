"""Helpers for tests that run the raylm Serve app: free ports, one Ray/Serve session, polling."""
from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from typing import Any, Iterator

APP = "raylm"
METADATA = (("application", APP),)


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A free port above Ray's worker ports (10002-19999), below Serve's direct-ingress ports
    (30000-31000 and 40000-41000, `--proxy haproxy`) and below the kernel's ephemeral range.

    A port from bind(0) is an ephemeral one: until Serve binds it, the outgoing connections of
    the Ray processes that start meanwhile may take it as their local port, and Serve's proxy
    then fails with "Failed to bind to address" (seen on a clean clone)."""
    low, high = 20000, max(20001, min(_ephemeral_start(), 30000))
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{high - 1}")


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@contextlib.contextmanager
def serve_session(model: str, env: dict[str, str] | None = None, num_cpus: int = 2,
                  **app_args: Any) -> Iterator[dict[str, Any]]:
    """Ray + Serve on loopback ports serving `model` (tiny, fp32, CPU) with `app_args`;
    `env` is set while Ray starts, so its processes (the proxies) inherit it, on top of the
    serving-path environment `raylm serve` exports (proxy -> ingress over gRPC)."""
    import grpc
    import ray
    from ray import serve

    from raylm.cluster.serve.app import GRPC_SERVICER_FUNCTIONS, build_app
    from raylm.cluster.serve.limits import serve_transport_env
    from raylm.proto import generation_pb2_grpc as pb_grpc

    env = {**serve_transport_env(), **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    http_port, grpc_port = free_port(), free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": grpc_port,
                                  "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        args = {"model": model, "dtype": "float32", "device": "cpu", "max_num_seqs": 64,
                "kv_cache_memory": 64 << 20, **app_args}
        serve.run(build_app(args), name=APP, route_prefix="/")
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        yield {
            "model": model,
            "http": f"http://127.0.0.1:{http_port}",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "channel": channel,
            "stub": pb_grpc.GenerationStub(channel),
            "llm": serve.get_deployment_handle("LLMServer", app_name=APP),
        }
        channel.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def engine_idle(llm) -> bool:
    """No request running or waiting and every KV block free (read from the replica)."""
    stats = llm.get_stats.remote().result()
    return (stats["num_running"] == 0 and stats["num_waiting"] == 0
            and stats["num_free_blocks"] == stats["num_total_blocks"])
