"""`raylm serve` as a user runs it: a subprocess that starts Ray + Serve, answers over HTTP and
gRPC, and exits 0 on SIGINT."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from serve_builders import free_port
from serve_process import (ROOT, check_serving, descendants, drain_output, start, stop,
                           wait_for, wait_gone)


def test_serve_starts_answers_and_exits_on_sigint(tiny_model):
    """The layout a multi-replica app uses (an Ingress deployment behind Serve's proxy actor),
    asked for by name; the default layout is tested in test_serve_haproxy.py."""
    model = str(tiny_model("llama"))
    http_port, grpc_port = free_port(), free_port()
    proc, lines = start(["--model", model, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                         "--num-cpus", "2", "--dtype", "float32", "--device", "cpu",
                         "--kv-cache-memory", str(32 << 20), "--max-num-seqs", "8",
                         "--ingress", "separate", "--proxy", "serve"])
    try:
        output = wait_for(lines, "Press Ctrl+C", timeout_s=240)
        assert any(model in line for line in output)
        assert any("routes:      an Ingress deployment" in line for line in output)
        assert not any("HAProxy" in line for line in output)
        assert any(f":{grpc_port}" in line for line in output)
        check_serving(model, http_port, grpc_port)
    finally:
        rc = stop(proc)
    assert rc == 0


def _rank_processes(root: int) -> list[int]:
    """pids of tensor-parallel rank actors (Ray titles them ray::Worker) started under the
    process ``root`` (its raylet's children), so other Ray sessions on the machine don't count."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except (OSError, ValueError, IndexError):
            continue

    def under_root(pid: int) -> bool:
        for _ in range(32):
            if pid == root:
                return True
            pid = parents.get(pid, 0)
            if pid <= 1:
                return False
        return False

    return [pid for pid, title in titles.items()
            if title.startswith(b"ray::Worker") and under_root(pid)]


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


@pytest.mark.slow
def test_serve_tp2_answers_like_tp1_and_leaves_nothing_running(tiny_model):
    from raylm.cluster import LLM, SamplingParams

    model = str(tiny_model("llama"))
    http_port, grpc_port = free_port(), free_port()
    proc, lines = start(["--model", model, "--tp", "2", "--http-port", str(http_port),
                         "--grpc-port", str(grpc_port), "--num-cpus", "2", "--dtype", "float32",
                         "--device", "cpu", "--kv-cache-memory", str(32 << 20)])
    try:
        wait_for(lines, "Press Ctrl+C", timeout_s=240)
        check_serving(model, http_port, grpc_port)
        ranks = _rank_processes(proc.pid)
        assert len(ranks) == 2
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none")
        got = client.completions.create(model=model, prompt="Hello there", max_tokens=8,
                                        temperature=0).choices[0].text
    finally:
        rc = stop(proc)
    assert rc == 0
    expected = LLM(model, dtype="float32").generate(
        ["Hello there"], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert got == expected
    deadline = time.monotonic() + 30
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(ranks), "rank actors outlived `raylm serve`"


def test_serve_runs_a_config_file(tiny_model, tmp_path):
    """`--config` runs deploy/serve_config.yaml (here with the tiny model and free ports)."""
    model = str(tiny_model("llama"))
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    http_port, grpc_port = free_port(), free_port()
    config["http_options"].update(host="127.0.0.1", port=http_port)
    config["grpc_options"]["port"] = grpc_port
    config["applications"][0]["args"].update(model=model, kv_cache_memory=32 << 20, max_replicas=1)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, lines = start(["--config", str(path), "--num-cpus", "2"])
    try:
        wait_for(lines, "Press Ctrl+C", timeout_s=240)
        check_serving(model, http_port, grpc_port)
    finally:
        rc = stop(proc)
    assert rc == 0


@pytest.mark.parametrize("flags, field", [(["--tp", "0"], "--tp"),
                                          (["--config", "/no/such.yaml"], "--config"),
                                          (["--proxy", "haproxy", "--address", "auto"], "--proxy")])
def test_bad_flags_fail_before_starting_ray(flags, field):
    proc = subprocess.run([sys.executable, "-m", "raylm.cluster.cli", "serve", *flags],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert field in proc.stderr


def test_serve_with_an_api_key_on_loopback_stops_cleanly_on_sigterm(tiny_model):
    """`--api-key` guards HTTP and gRPC; SIGTERM (docker stop) shuts Serve and Ray down, exit 0,
    and leaves no Ray process behind."""
    import grpc
    import requests

    from raylm.proto import generation_pb2 as pb
    from raylm.proto import generation_pb2_grpc as pb_grpc

    model = str(tiny_model("llama"))
    http_port, grpc_port = free_port(), free_port()
    proc, lines = start(["--model", model, "--http-port", str(http_port), "--grpc-port",
                         str(grpc_port), "--host", "127.0.0.1", "--api-key", "k3y",
                         "--num-cpus", "2", "--dtype", "float32", "--device", "cpu",
                         "--kv-cache-memory", str(32 << 20), "--max-num-seqs", "8"])
    children, terminated = [], False
    try:
        output = wait_for(lines, "Press Ctrl+C", timeout_s=240)
        assert any("API key required" in line for line in output)
        children = descendants(proc.pid)
        url = f"http://127.0.0.1:{http_port}"
        body = {"prompt": "Hello", "max_tokens": 2}
        assert requests.post(url + "/v1/completions", json=body, timeout=60).status_code == 401
        ok = requests.post(url + "/v1/completions", json=body, timeout=60,
                           headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert requests.get(url + "/health", timeout=60).status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            request = pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingOptions(max_tokens=2))
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(request, metadata=(("application", "raylm"),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Generate(request, metadata=(("application", "raylm"),
                                                     ("authorization", "Bearer k3y")))
            assert len(reply.choices[0].token_ids) == 2
        # SIGTERM during a stream: the stream completes (drain), then everything stops
        body = {"prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=120,
                           headers={"Authorization": "Bearer k3y"}) as resp:
            events = []
            for line in resp.iter_lines():
                if line.startswith(b"data: "):
                    if not events:
                        proc.send_signal(signal.SIGTERM)
                        terminated = True
                    events.append(line[6:])
        assert events[-1] == b"[DONE]" and b'"error"' not in b"".join(events)
        assert b'"completion_tokens": 400' in events[-2]
    finally:
        if not terminated:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    output = "".join(drain_output(lines))
    assert rc == 0, output
    assert "drained" in output
    assert children
    assert wait_gone(children, timeout_s=30) == [], "Ray processes left running"


def test_replica_and_router_flags_map_to_app_args():
    import argparse

    from raylm.cluster.serve.app import AppConfig
    from raylm.cluster.serve.serve_cli import add_arguments, app_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = app_args(parser.parse_args(["--replicas", "2", "--num-cpus-per-replica", "1", "--tp", "2",
                                       "--router", "pow2", "--ttft-p90-target", "0",
                                       "--device", "cpu"]))
    config = AppConfig.from_args(args)
    assert (config.min_replicas, config.max_replicas, config.num_cpus_per_rank) == (2, 2, 0.5)
    assert config.request_router_config()["request_router_class"].endswith(
        "PowerOfTwoChoicesRequestRouter")
    assert config.autoscaling_config()["policy"]["policy_kwargs"]["ttft_p90_target_s"] == 0
    with pytest.raises(ValueError, match="--replicas"):
        app_args(parser.parse_args(["--replicas", "0"]))
    with pytest.raises(ValueError, match="router"):
        AppConfig(device="cpu", router="random")




def test_the_routes_run_in_the_replica_unless_there_can_be_several():
    """`--ingress auto` (the default) colocates the routes with a fixed single replica, and
    keeps the Ingress deployment wherever replicas can be several (it routes across them)."""
    import argparse

    from raylm.cluster.serve.app import AppConfig
    from raylm.cluster.serve.serve_cli import add_arguments, app_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def colocated(*flags: str) -> bool:
        return app_args(parser.parse_args([*flags, "--device", "cpu"]))["colocate_ingress"]

    assert colocated() and colocated("--replicas", "1") and colocated("--tp", "2")
    assert not colocated("--max-replicas", "4") and not colocated("--replicas", "2")
    assert not colocated("--ingress", "separate")
    assert colocated("--ingress", "colocated")
    with pytest.raises(ValueError, match="colocate_ingress needs exactly one replica"):
        AppConfig.from_args(app_args(parser.parse_args(["--ingress", "colocated", "--replicas",
                                                        "2", "--device", "cpu"])))


def test_the_engine_process_is_on_where_the_servers_get_a_core_and_the_engine_no_actors():
    import argparse

    from raylm.cluster.serve.app import AppConfig
    from raylm.cluster.serve.serve_cli import add_arguments, app_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    from raylm.cluster.engine_process import by_default

    assert AppConfig(device="cpu").engine_args()["engine_process"] is None  # the replica decides
    cores = len(os.sched_getaffinity(0))
    assert by_default("cpu", cores) is False and by_default("cpu", cores - 1) is (cores > 1)
    assert by_default("cuda", 1) is True
    assert AppConfig(device="cpu", tensor_parallel_size=2).engine_process is False
    draft = {"model": "/some/draft", "num_speculative_tokens": 3}
    assert AppConfig(device="cpu", speculative_config=draft).engine_process is False
    assert AppConfig.from_args(app_args(parser.parse_args(
        ["--engine-process", "off", "--device", "cpu"]))).engine_process is False
    with pytest.raises(ValueError, match="engine_process"):
        AppConfig(device="cpu", tensor_parallel_size=2, engine_process=True)
