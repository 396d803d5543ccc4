"""Cancellation and bursts through the whole serving path (issue 15), on one Serve session
whose engine core runs in a process of its own (engine_process; other modules cover the
step-thread mode).

- 50 SSE and 50 gRPC streams cancelled after their first chunk: every cancel reaches the engine
  (its abort counter), the replica's KV usage returns to idle, the server stays healthy.
- 1,000 HTTP and 500 gRPC requests at once: each completes or gets an explicit 429 / 503 /
  RESOURCE_EXHAUSTED / UNAVAILABLE; as many answers as requests; the drain time is printed."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import time

import grpc
import pytest

requests = pytest.importorskip("requests")
aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("ray")

from raylm.proto import generation_pb2 as pb  # noqa: E402
from raylm.proto import generation_pb2_grpc as pb_grpc  # noqa: E402
from serve_builders import METADATA, engine_idle, serve_session, wait_until  # noqa: E402

pytestmark = pytest.mark.slow

NUM_CANCEL = 50  # per protocol
NUM_BURST_HTTP = 1000
NUM_BURST_GRPC = 500
LONG = 3000  # tokens a cancelled stream would generate if the cancel were lost


@pytest.fixture(scope="module")
def server(tiny_model):
    # a capped engine queue: a burst beyond it is told 429 / RESOURCE_EXHAUSTED, not kept waiting
    with serve_session(str(tiny_model("llama")), max_num_seqs=64, max_queued_requests=256,
                       engine_process=True) as s:
        yield s


def _stats(server) -> dict:
    return server["llm"].get_stats.remote().result()


def _cancel_sse(server, i: int) -> bool:
    body = {"prompt": f"Once upon a time {i}", "max_tokens": LONG, "ignore_eos": True,
            "stream": True, "temperature": 0}
    with requests.post(server["http"] + "/v1/completions", json=body, stream=True,
                       timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"data: {"):
                return True  # leaving the block closes the connection mid-stream
    return False


def _cancel_grpc(server, i: int) -> bool:
    request = pb.GenerateRequest(prompt=f"Once upon a time {i}", sampling=pb.SamplingOptions(
        max_tokens=LONG, ignore_eos=True, temperature=0))
    call = server["stub"].GenerateStream(request, metadata=METADATA, timeout=60)
    first = next(call)
    call.cancel()
    return bool(first.choices)


def test_every_cancel_reaches_the_engine_and_frees_its_blocks(server):
    before = _stats(server)
    start = time.monotonic()
    with cf.ThreadPoolExecutor(10) as pool:
        sse = list(pool.map(lambda i: _cancel_sse(server, i), range(NUM_CANCEL)))
        grpc_ok = list(pool.map(lambda i: _cancel_grpc(server, i), range(NUM_CANCEL)))
    assert all(sse) and all(grpc_ok)
    idle = wait_until(lambda: engine_idle(server["llm"]), timeout_s=60)
    idle_s = time.monotonic() - start
    after = _stats(server)
    aborted = after["num_aborted"] - before["num_aborted"]
    blocks_left = after["num_total_blocks"] - after["num_free_blocks"]
    print(f"\nFIGURE cancellation: {NUM_CANCEL} SSE + {NUM_CANCEL} gRPC streams cancelled after "
          f"the first chunk; aborted in the engine {aborted}/{2 * NUM_CANCEL}; KV blocks left "
          f"{blocks_left} (idle {idle_s:.1f}s after the first cancel); generated "
          f"{after['num_generation_tokens'] - before['num_generation_tokens']} tokens in all")
    assert idle, after
    assert aborted == 2 * NUM_CANCEL, after
    assert blocks_left == 0 and after["kv_usage"] == 0
    assert requests.get(server["http"] + "/health", timeout=30).status_code == 200


async def _burst(server) -> tuple[dict[str, int], dict[str, int], int, float]:
    """Returns HTTP outcomes, gRPC outcomes, answers received, seconds until all answered."""
    http_out: dict[str, int] = {}
    grpc_out: dict[str, int] = {}
    answered = 0

    async def one_http(session, i):
        nonlocal answered
        body = {"prompt": f"burst {i}", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        try:
            async with session.post(server["http"] + "/v1/completions", json=body) as r:
                text = await r.text()
            key = str(r.status)
            if r.status == 200:
                assert json.loads(text)["usage"]["completion_tokens"] == 4
            else:
                json.loads(text)["error"]  # an explicit OpenAI-style error
        except aiohttp.ClientError as exc:
            key = type(exc).__name__
        answered += 1
        http_out[key] = http_out.get(key, 0) + 1

    async def one_grpc(stub, i):
        nonlocal answered
        request = pb.GenerateRequest(prompt=f"burst {i}", sampling=pb.SamplingOptions(
            max_tokens=4, ignore_eos=True, temperature=0))
        try:
            reply = await stub.Generate(request, metadata=METADATA, timeout=300)
            assert reply.usage.completion_tokens == 4
            key = "OK"
        except grpc.aio.AioRpcError as err:
            key = err.code().name
        answered += 1
        grpc_out[key] = grpc_out.get(key, 0) + 1

    start = time.monotonic()
    connector = aiohttp.TCPConnector(limit=NUM_BURST_HTTP)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=300)) as session, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server['grpc_port']}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        await asyncio.gather(*[one_http(session, i) for i in range(NUM_BURST_HTTP)],
                             *[one_grpc(stub, i) for i in range(NUM_BURST_GRPC)])
    return http_out, grpc_out, answered, time.monotonic() - start


def test_a_burst_is_answered_in_full(server):
    http_out, grpc_out, answered, drain_s = asyncio.run(_burst(server))
    sent = NUM_BURST_HTTP + NUM_BURST_GRPC
    ok = http_out.get("200", 0) + grpc_out.get("OK", 0)
    explicit = (sum(v for k, v in http_out.items() if k in ("429", "503"))
                + sum(v for k, v in grpc_out.items() if k in ("RESOURCE_EXHAUSTED", "UNAVAILABLE")))
    print(f"\nFIGURE burst: sent {sent} ({NUM_BURST_HTTP} HTTP + {NUM_BURST_GRPC} gRPC), "
          f"answered {answered}, ok {ok}, explicit errors {explicit}, lost {sent - ok - explicit}; "
          f"drained in {drain_s:.1f}s; HTTP {http_out}, gRPC {grpc_out}")
    assert answered == sent
    assert ok + explicit == sent, (http_out, grpc_out)
    assert ok > 0
    assert wait_until(lambda: engine_idle(server["llm"]), timeout_s=60)
