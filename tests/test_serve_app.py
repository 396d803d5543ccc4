"""The raylm Serve app end to end on CPU: OpenAI HTTP (official client) and gRPC (generated stubs)
against one Ray/Serve session serving a tiny llama."""
from __future__ import annotations

import concurrent.futures as cf
import os
import pathlib

import grpc
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402

from tests.serve_builders import free_port, wait_until  # noqa: E402
from raylm.cluster.serve.app import GRPC_SERVICER_FUNCTIONS, build_app  # noqa: E402
from raylm.cluster.serve.limits import serve_transport_env  # noqa: E402
from raylm.proto import generation_pb2 as pb  # noqa: E402
from raylm.proto import generation_pb2_grpc as pb_grpc  # noqa: E402

APP = "raylm"
METADATA = (("application", APP),)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_model):
    model = str(tiny_model("llama"))
    http_port, grpc_port = free_port(), free_port()
    env = serve_transport_env()  # what `raylm serve` exports before Ray starts
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        serve.run(build_app({"model": model, "dtype": "float32", "device": "cpu",
                             "max_num_seqs": 64, "kv_cache_memory": 64 << 20}),
                  name=APP, route_prefix="/")
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        yield {
            "model": model,
            "openai": openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none"),
            "http": f"http://127.0.0.1:{http_port}",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "stub": pb_grpc.GenerationStub(channel),
            "channel": channel,
            "llm": serve.get_deployment_handle("LLMServer", app_name=APP),
        }
        channel.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _greedy(max_tokens: int = 12, **extra) -> pb.SamplingOptions:
    return pb.SamplingOptions(temperature=0.0, max_tokens=max_tokens, **extra)


# --- OpenAI HTTP ---------------------------------------------------------------------------

def test_models_and_health(server):
    import requests

    models = server["openai"].models.list()
    # the id is the checkpoint directory's name, never its path (which stays accepted)
    assert [m.id for m in models.data] == [pathlib.Path(server["model"]).name]
    assert requests.get(server["http"] + "/health", timeout=30).status_code == 200
    assert sorted(serve.status().applications[APP].deployments) == ["Ingress", "LLMServer"]


def test_completion_usage_and_streaming_matches(server):
    client = server["openai"]
    full = client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=10, temperature=0)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert full.usage.completion_tokens == 10
    num_prompt = len(server["stub"].Tokenize(pb.TokenizeRequest(text=PROMPT), metadata=METADATA).token_ids)
    assert full.usage.prompt_tokens == num_prompt
    assert full.usage.total_tokens == num_prompt + 10

    chunks = list(client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_completion_and_stream(server):
    client = server["openai"]
    messages = [{"role": "user", "content": "Say hello"}]
    full = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=2)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert len(full.choices[0].logprobs.content) == full.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in full.choices[0].logprobs.content)
    stream = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=8,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == msg.content


def test_n_and_stop(server):
    client = server["openai"]
    out = client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=6, n=2,
                                    temperature=1.0, seed=7,
                                    extra_body={"top_k": 20, "ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 12

    greedy = client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=12, temperature=0)
    stop = greedy.choices[0].text[3:8]
    cut = client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=12,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text
    assert greedy.choices[0].text.startswith(cut.choices[0].text)


def test_http_errors_use_openai_format(server):
    client = server["openai"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=4, top_p=5.0)
    assert info.value.body["param"] == "top_p" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server["model"], prompt="word " * 5000, max_tokens=4)
    assert "prompt" in str(info.value)
    # A body larger than Serve's 4 MiB default for its replica gRPC channels (proxy -> ingress ->
    # LLMServer) still gets the 400 that names the field, not a 500 from a transport.
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server["model"], prompt="word " * (1 << 20), max_tokens=4)
    assert info.value.body["param"] == "prompt"
    # and the server keeps serving
    assert client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=2).choices


# --- gRPC ----------------------------------------------------------------------------------

def test_grpc_unary_and_stream_agree_with_offline_llm(server):
    from raylm.cluster import LLM, SamplingParams

    stub = server["stub"]
    unary = stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=_greedy(12)), metadata=METADATA)
    streamed = list(stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, sampling=_greedy(12)),
                                        metadata=METADATA))
    assert streamed[-1].finished and streamed[-1].usage.completion_tokens == 12
    assert [t for m in streamed for c in m.choices for t in c.token_ids] == list(unary.choices[0].token_ids)
    assert "".join(c.text for m in streamed for c in m.choices) == unary.choices[0].text
    assert streamed[-1].choices[-1].finish_reason == "length"

    offline = LLM(server["model"], dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    ref = offline.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0]
    assert list(unary.choices[0].token_ids) == ref.token_ids
    assert unary.choices[0].text == ref.text


def test_grpc_token_ids_chat_tokenize_and_model_info(server):
    stub = server["stub"]
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=METADATA)
    assert info.model == pathlib.Path(server["model"]).name
    assert info.max_model_len > 0 and info.has_chat_template
    ids = stub.Tokenize(pb.TokenizeRequest(text=PROMPT), metadata=METADATA).token_ids
    by_text = stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=_greedy(6)), metadata=METADATA)
    by_ids = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=_greedy(6)),
                           metadata=METADATA)
    assert by_ids.choices[0].token_ids == by_text.choices[0].token_ids
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    out = stub.Generate(pb.GenerateRequest(chat=chat, sampling=_greedy(5, logprobs=3)), metadata=METADATA)
    assert len(out.choices[0].token_ids) == 5
    assert all(len(p.top) == 3 for p in out.choices[0].logprobs)
    chat_ids = stub.Tokenize(pb.TokenizeRequest(chat=chat), metadata=METADATA).token_ids
    assert out.usage.prompt_tokens == len(chat_ids)


@pytest.mark.parametrize("request_", [
    pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingOptions(temperature=-1.0)),
    pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingOptions(top_p=0.0)),
    pb.GenerateRequest(sampling=pb.SamplingOptions(max_tokens=3)),  # no input
    pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10 ** 7])),
    pb.GenerateRequest(prompt="word " * 5000),  # longer than the context
], ids=["temperature", "top_p", "no-input", "bad-token-id", "too-long"])
def test_grpc_invalid_argument(server, request_):
    stub = server["stub"]
    for call in (stub.Generate, lambda r, metadata: list(stub.GenerateStream(r, metadata=metadata))):
        with pytest.raises(grpc.RpcError) as info:
            call(request_, metadata=METADATA)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ok = stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=_greedy(2)), metadata=METADATA)
    assert len(ok.choices[0].token_ids) == 2


def test_grpc_unknown_model_is_not_found(server):
    with pytest.raises(grpc.RpcError) as info:
        server["stub"].Generate(pb.GenerateRequest(prompt=PROMPT, model="other"), metadata=METADATA)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(server["channel"])
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name for r in responses for s in r.list_services_response.service]
    assert "raylm.v1.Generation" in names


def _idle(llm) -> bool:
    stats = llm.get_stats.remote().result()
    return stats["num_running"] == 0 and stats["num_waiting"] == 0 and \
        stats["num_free_blocks"] == stats["num_total_blocks"]


def test_cancelled_stream_frees_its_blocks(server):
    request = pb.GenerateRequest(prompt=PROMPT, sampling=_greedy(3000, ignore_eos=True))
    call = server["stub"].GenerateStream(request, metadata=METADATA)
    for _, _msg in zip(range(3), call):
        pass
    stats = server["llm"].get_stats.remote().result()
    assert stats["num_running"] == 1 and stats["num_free_blocks"] < stats["num_total_blocks"]
    call.cancel()
    assert wait_until(lambda: _idle(server["llm"]), timeout_s=30), server["llm"].get_stats.remote().result()


def test_http_client_disconnect_frees_blocks(server):
    import requests

    body = {"model": server["model"], "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True,
            "stream": True, "temperature": 0}
    with requests.post(server["http"] + "/v1/completions", json=body, stream=True, timeout=30) as resp:
        for i, _line in enumerate(resp.iter_lines()):
            if i >= 4:
                break
    assert wait_until(lambda: _idle(server["llm"]), timeout_s=30), server["llm"].get_stats.remote().result()


def test_64_concurrent_streams_complete(server):
    """64 streams at once under the default stream_interval="auto": the CPU replica sends
    several tokens per message while >= 16 requests run, and no stream loses a token or text."""
    from transformers import AutoTokenizer

    stub = server["stub"]
    tokenizer = AutoTokenizer.from_pretrained(server["model"])

    def one(i: int) -> tuple[list[int], str, int, str]:
        req = pb.GenerateRequest(prompt=f"{PROMPT} {i}",
                                 sampling=pb.SamplingOptions(max_tokens=40 + i % 5, ignore_eos=True,
                                                             temperature=0.8, seed=i))
        msgs = list(stub.GenerateStream(req, metadata=METADATA))
        ids = [t for m in msgs for c in m.choices for t in c.token_ids]
        text = "".join(c.text for m in msgs for c in m.choices)
        return ids, text, msgs[-1].usage.completion_tokens, \
            msgs[-1].choices[-1].finish_reason

    before = server["llm"].get_stats.remote().result()
    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for i, (ids, text, usage, reason) in enumerate(results):
        assert len(ids) == usage == 40 + i % 5 and reason == "length"
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert wait_until(lambda: _idle(server["llm"]), timeout_s=30)
    after = server["llm"].get_stats.remote().result()
    tokens = after["num_generation_tokens"] - before["num_generation_tokens"]
    outputs = after["num_stream_outputs"] - before["num_stream_outputs"]
    # stream_interval 1 sends one output per token; "auto" under this load 2 or 4 tokens each
    assert tokens == sum(40 + i % 5 for i in range(64)) and outputs < 0.75 * tokens, (outputs, tokens)


def test_bench_clients_time_every_token_of_a_several_token_message(server, monkeypatch):
    """`raylm bench serve`'s clients under the default stream interval at 64 streams (several
    tokens per message): each counts every token and spreads a message's gap over its tokens,
    the HTTP client through the chunks' continuous usage, so both report one inter-token latency
    per token after the first."""
    import argparse
    import asyncio

    from raylm.cluster.bench import serve_clients
    from raylm.cluster.bench.serve_clients import GrpcClient, HttpClient, Sample

    args = argparse.Namespace(host="127.0.0.1", http_port=server["http_port"],
                              grpc_port=server["grpc_port"], app_name=APP, output_len=40)
    # the messages each sample received, by the number of tokens they carried
    sizes: dict[int, list[int]] = {}
    record = serve_clients.record_message

    def recording(sample, start, last, num_new_tokens):
        sizes.setdefault(id(sample), []).append(num_new_tokens)
        return record(sample, start, last, num_new_tokens)

    monkeypatch.setattr(serve_clients, "record_message", recording)

    async def run() -> list[Sample]:
        clients = [HttpClient(args), GrpcClient(args)]
        samples = [Sample() for _ in range(64)]
        try:
            await asyncio.gather(*(clients[i % 2].request(f"{PROMPT} {i}", s)
                                   for i, s in enumerate(samples)))
        finally:
            for c in clients:
                await c.close()
        return samples

    samples = asyncio.run(run())
    assert wait_until(lambda: _idle(server["llm"]), timeout_s=30)
    for s in samples:
        assert s.error is None and s.num_output_tokens == 40 and len(s.itls) == 39
        assert 0 < s.ttft <= s.e2e
    # both clients met messages of several tokens (the case the counting above is about; how
    # many depends on how many of the 64 run at once: 0.55-0.92 messages per token measured)
    for client in range(2):  # HTTP: even i, gRPC: odd i
        assert any(k > 1 for s in samples[client::2] for k in sizes[id(s)]), client


@pytest.mark.skipif(not pathlib.Path("/proc").is_dir(), reason="reads /proc")
def test_the_model_replica_runs_at_the_priority_of_its_clients(server):
    """`raylm serve` starts Ray's workers at nice 0 (SERVE_PROCESS_ENV), not Ray's 15."""
    nices = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            cmdline = (stat.parent / "cmdline").read_bytes()
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if cmdline.startswith(b"ray::ServeReplica:") and b"LLMServer" in cmdline:
            nices.append(int(fields[16]))  # field 19 of /proc/PID/stat
    assert nices and all(n == os.getpriority(os.PRIO_PROCESS, 0) for n in nices)


def test_bench_serve_reports_latencies_and_the_serving_overhead(server, tmp_path):
    import argparse
    import json

    from raylm.cluster.bench import serve as bench_serve

    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    out = tmp_path / "serve.json"
    args = parser.parse_args(["--protocol", "grpc,http,engine", "--model", server["model"],
                              "--http-port", str(server["http_port"]),
                              "--grpc-port", str(server["grpc_port"]),
                              "--concurrency", "1,4", "--num-requests", "4", "--output-len", "6",
                              "--rounds", "2", "--out", str(out)])
    assert bench_serve.run(args) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"grpc", "http", "engine"}
    for levels in result["runs"].values():
        assert [lv["load"] for lv in levels] == [1, 4]
        for level in levels:
            assert level["num_errors"] == 0
            assert level["output_token_throughput"] > 0
            assert level["ttft_s"]["p50"] <= level["e2e_s"]["p99"]
            cpu = level["cpu"]  # the load generator's own cores and the machine's busy cores
            assert 0 < cpu["process_cores"] <= cpu["num_cpus"] + 0.5
            assert 0 < cpu["machine_busy_cores"] <= cpu["num_cpus"] + 0.01
    assert [(r["protocol"], r["load"]) for r in result["vs_engine"]] == [
        ("grpc", 1), ("grpc", 4), ("http", 1), ("http", 4)]
    assert all(r["throughput_fraction"] > 0 for r in result["vs_engine"])
    # two rounds, pooled: each level's requests are those of both rounds
    assert len(result["rounds"]) == 2
    assert all(lv["num_requests"] == 8 for levels in result["runs"].values() for lv in levels)
    assert all(lv["num_requests"] == 4 for rd in result["rounds"] for levels in rd.values()
               for lv in levels)
    assert all(len(r["throughput_fraction_rounds"]) == 2 for r in result["vs_engine"])
    # two rounds are too few to resample: no interval, not a made-up one
    assert all(r["throughput_fraction_ci95"] is None for r in result["vs_engine"])
    assert out.with_suffix(".png").stat().st_size > 0
