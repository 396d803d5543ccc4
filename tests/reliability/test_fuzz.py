"""Bad-input fuzz over HTTP and gRPC (issue 15): thousands of seeded malformed or out-of-range
requests; zero HTTP 5xx, zero gRPC INTERNAL/UNKNOWN, every answer within 30 s, no internals in
error bodies, and a normal request still answered right after. A failure prints its seed and
case index: `fuzz_inputs.http_cases(SEED, N, model)[i]` replays it."""
from __future__ import annotations

import concurrent.futures as cf
import os
import time

import grpc
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("ray")

from fuzz_inputs import GrpcCase, HttpCase, grpc_cases, http_cases  # noqa: E402
from serve_builders import METADATA, serve_session  # noqa: E402

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("RAYLM_FUZZ_SEED", "15"))
NUM_HTTP = 2000
NUM_GRPC = 800
LIMIT = 1 << 20  # request bytes
ANSWER_WITHIN_S = 30.0
BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture(scope="module")
def server(tiny_model):
    env = {"RAYLM_MAX_REQUEST_BYTES": str(LIMIT), "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(LIMIT)}
    # a short context: any valid request the generator makes finishes in a few steps
    with serve_session(str(tiny_model("llama")), env=env, max_request_bytes=LIMIT,
                       max_model_len=256, max_num_seqs=32) as s:
        yield s


def _send_http(server, case: HttpCase) -> tuple[int, float, str]:
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    start = time.monotonic()
    try:
        r = requests.request(case.method, server["http"] + case.path, data=case.body,
                             headers=headers, timeout=ANSWER_WITHIN_S)
        return r.status_code, time.monotonic() - start, r.text[:2000]
    except requests.RequestException as exc:  # a timeout or a dropped connection
        return -1, time.monotonic() - start, repr(exc)


def _send_grpc(server, case: GrpcCase) -> tuple[grpc.StatusCode, float, str]:
    channel = server["channel"]
    path = f"/raylm.v1.Generation/{case.method}"
    ident = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    start = time.monotonic()
    try:
        if case.method == "GenerateStream":
            for _ in channel.unary_stream(path, **ident)(case.payload, metadata=METADATA,
                                                         timeout=ANSWER_WITHIN_S):
                pass
        else:
            channel.unary_unary(path, **ident)(case.payload, metadata=METADATA,
                                               timeout=ANSWER_WITHIN_S)
        return grpc.StatusCode.OK, time.monotonic() - start, ""
    except grpc.RpcError as err:
        return err.code(), time.monotonic() - start, err.details() or ""


def _normal_request_works(server) -> bool:
    r = requests.post(server["http"] + "/v1/completions", timeout=ANSWER_WITHIN_S,
                      json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_http_and_grpc_fuzz(server):
    cases = http_cases(SEED, NUM_HTTP - 4, server["model"])
    big = b'{"prompt": "' + b"x" * (LIMIT + 1) + b'"}'
    cases += [HttpCase("POST", "/v1/completions", big), HttpCase("POST", "/v1/chat/completions", big),
              HttpCase("POST", "/v1/completions", big, None), HttpCase("GET", "/v1/models", big)]
    start = time.monotonic()
    with cf.ThreadPoolExecutor(16) as pool:
        http = list(pool.map(lambda c: _send_http(server, c), cases))
    http_s = time.monotonic() - start
    after_http = _normal_request_works(server)

    gcases = grpc_cases(SEED, NUM_GRPC - 1)
    gcases.append(GrpcCase("Generate", b"\x0a" + b"\x80\x80\x40" + b"p" * (LIMIT + 1)))
    start = time.monotonic()
    with cf.ThreadPoolExecutor(16) as pool:
        grpc_results = list(pool.map(lambda c: _send_grpc(server, c), gcases))
    grpc_s = time.monotonic() - start
    after_grpc = _normal_request_works(server)
    server["llm"].check_health.remote().result()

    bad_http = [(i, r) for i, r in enumerate(http) if r[0] >= 500 or r[0] < 0]
    slow_http = [(i, r) for i, r in enumerate(http) if r[1] > ANSWER_WITHIN_S]
    leaky = [(i, r) for i, r in enumerate(http)
             if r[0] >= 400 and ("Traceback" in r[2] or ".py\"" in r[2] or "/site-packages" in r[2])]
    bad_grpc = [(i, r) for i, r in enumerate(grpc_results) if r[0] in BAD_GRPC]
    slow_grpc = [(i, r) for i, r in enumerate(grpc_results)
                 if r[1] > ANSWER_WITHIN_S or r[0] == grpc.StatusCode.DEADLINE_EXCEEDED]
    codes: dict[str, int] = {}
    for status, *_ in http:
        codes[str(status)] = codes.get(str(status), 0) + 1
    gcodes: dict[str, int] = {}
    for code, *_ in grpc_results:
        gcodes[code.name] = gcodes.get(code.name, 0) + 1
    print(f"\nFIGURE fuzz (seed {SEED}): HTTP {len(cases)} inputs, {len(bad_http)} 5xx/dropped, "
          f"{len(slow_http)} over {ANSWER_WITHIN_S:.0f}s (max {max(r[1] for r in http):.2f}s, "
          f"{http_s:.0f}s total), statuses {dict(sorted(codes.items()))}; gRPC {len(gcases)} "
          f"inputs, {len(bad_grpc)} INTERNAL/UNKNOWN, {len(slow_grpc)} over "
          f"{ANSWER_WITHIN_S:.0f}s (max {max(r[1] for r in grpc_results):.2f}s, {grpc_s:.0f}s "
          f"total), codes {dict(sorted(gcodes.items()))}; normal request after: "
          f"{'ok' if after_http and after_grpc else 'FAILED'}")
    assert not bad_http, [(i, cases[i], r) for i, r in bad_http[:5]]
    assert not slow_http, [(i, cases[i], r) for i, r in slow_http[:5]]
    assert not leaky, [(i, cases[i], r) for i, r in leaky[:5]]
    assert not bad_grpc, [(i, gcases[i].method, gcases[i].payload[:80], r) for i, r in bad_grpc[:5]]
    assert not slow_grpc, [(i, gcases[i].method, r) for i, r in slow_grpc[:5]]
    assert after_http and after_grpc
    stats = server["llm"].get_stats.remote().result()
    assert stats["num_failed"] == 0, stats
