"""The serving front door under hostile or wrong input (issue 15): API key on HTTP and gRPC,
size limits, strict JSON types, invalid Unicode, unparseable gRPC payloads, the gRPC health and
reflection v1 services, per-call request ids. One Ray/Serve session with an API key set."""
from __future__ import annotations

import concurrent.futures as cf
import json

import grpc
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("ray")

from raylm.cluster.serve.limits import export_limits  # noqa: E402
from raylm.proto import generation_pb2 as pb  # noqa: E402
from serve_builders import METADATA, serve_session  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRPC_AUTH = METADATA + (("authorization", f"Bearer {KEY}"),)
LIMIT = 256 << 10  # request bytes
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_model):
    import os

    saved = {k: os.environ.get(k) for k in ("RAYLM_MAX_REQUEST_BYTES", "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE")}
    export_limits(LIMIT)  # what `raylm serve --max-request-bytes` does before Ray starts
    env = {k: os.environ[k] for k in saved}
    for k, v in saved.items():  # serve_session sets them for Ray's start and restores them
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    with serve_session(str(tiny_model("llama")), env=env, api_key=KEY,
                       max_request_bytes=LIMIT, max_model_len=512) as s:
        yield s


def _post(server, path, body=None, data=None, headers=AUTH, **kw):
    return requests.post(server["http"] + path, json=body, data=data, headers=headers,
                         timeout=60, **kw)


def _completion(server, **fields):
    return _post(server, "/v1/completions", {"model": server["model"], "prompt": PROMPT,
                                             "max_tokens": 3, **fields})


def test_http_needs_the_api_key_but_health_does_not(server):
    assert _completion(server).status_code == 200  # sanity: with the key it works
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    assert requests.get(server["http"] + "/v1/models", timeout=30).status_code == 401
    assert requests.get(server["http"] + "/v1/models", headers=AUTH, timeout=30).status_code == 200
    assert requests.get(server["http"] + "/health", timeout=30).status_code == 200


def test_docs_are_off_when_an_api_key_is_set(server):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert requests.get(server["http"] + path, headers=AUTH, timeout=30).status_code == 404


@pytest.mark.parametrize("fields,param", [
    ({"n": True}, "n"),
    ({"max_tokens": "4"}, "max_tokens"),
    ({"temperature": "0.5"}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"n": 129}, "n"),
    ({"n": 2**32}, "n"),
    ({"stop": ["x"] * 100}, "stop"),
    ({"logprobs": 50}, "logprobs"),
    ({"stop_token_ids": [2**31 - 1], "min_tokens": 2}, "stop_token_ids"),
    ({"prompt": "ab\ud800cd"}, "prompt"),
    ({"model": "m\udfff"}, "model"),
])
def test_wrong_types_and_values_are_400_naming_the_field(server, fields, param):
    r = _completion(server, **fields)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param or param in err["message"], err


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_rejected(server, literal):
    raw = '{"prompt": "hi", "max_tokens": 2, "temperature": %s}' % literal
    r = _post(server, "/v1/completions", data=raw,
              headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "temperature" in r.text


def test_lone_surrogate_in_chat_is_400(server):
    body = {"messages": [{"role": "user", "content": "hi \ud83d"}], "max_tokens": 2}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_bodies_over_the_limit_are_413_without_being_read(server):
    big = json.dumps({"prompt": "x" * (LIMIT + 10), "max_tokens": 2})
    r = _post(server, "/v1/completions", data=big,
              headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text

    def chunks():  # no Content-Length: counted while it streams in
        yield b'{"prompt": "'
        for _ in range(LIMIT // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'
    r = _post(server, "/v1/completions", data=chunks(),
              headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert _completion(server).status_code == 200


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server):
    # under the byte limit, far over what max_model_len tokens can hold
    from raylm.cluster.serve.llm_server import MAX_CHARS_PER_TOKEN

    info = requests.get(server["http"] + "/v1/models", headers=AUTH, timeout=30).json()
    num_chars = info["data"][0]["max_model_len"] * MAX_CHARS_PER_TOKEN + 1
    if num_chars + 100 > LIMIT:
        pytest.skip("the context is too long for this body limit")
    r = _completion(server, prompt="y" * num_chars)
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]


def test_error_bodies_carry_no_trace_or_path(server):
    for r in (_completion(server, n=0), _completion(server, top_p=7),
              _post(server, "/v1/completions", data="{not json",
                    headers={**AUTH, "Content-Type": "application/json"})):
        assert r.status_code == 400
        assert "Traceback" not in r.text and "/work" not in r.text and ".py" not in r.text


# --- gRPC --------------------------------------------------------------------------------

def test_grpc_needs_the_api_key(server):
    request = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingOptions(max_tokens=2))
    for metadata in (METADATA, METADATA + (("authorization", "Bearer nope"),)):
        with pytest.raises(grpc.RpcError) as info:
            server["stub"].Generate(request, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(server["stub"].GenerateStream(request, metadata=metadata))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(server["stub"].Generate(request, metadata=GRPC_AUTH).choices[0].token_ids) == 2


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11])
def test_unparseable_grpc_payload_is_invalid_argument(server, payload):
    for method, stream in (("Generate", False), ("GenerateStream", True), ("Tokenize", False)):
        path = f"/raylm.v1.Generation/{method}"
        call = (server["channel"].unary_stream if stream else server["channel"].unary_unary)(
            path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            result = call(payload, metadata=GRPC_AUTH, timeout=30)
            if stream:
                list(result)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value)


def test_grpc_message_over_the_limit_is_resource_exhausted(server):
    request = pb.GenerateRequest(prompt="z" * (LIMIT + 10))
    with pytest.raises(grpc.RpcError) as info:
        server["stub"].Generate(request, metadata=GRPC_AUTH, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("sampling", [
    pb.SamplingOptions(n=2**31), pb.SamplingOptions(n=100000),
    pb.SamplingOptions(stop_token_ids=[2**31 - 1], min_tokens=3, max_tokens=5),
    pb.SamplingOptions(temperature=float("nan")), pb.SamplingOptions(top_p=float("inf")),
    pb.SamplingOptions(max_tokens=2**32 - 1, top_k=2**31 - 1, logprobs=2**32 - 1),
])
def test_grpc_out_of_range_is_invalid_argument(server, sampling):
    with pytest.raises(grpc.RpcError) as info:
        server["stub"].Generate(pb.GenerateRequest(prompt=PROMPT, sampling=sampling),
                                metadata=GRPC_AUTH, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_health_and_reflection_v1(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(server["channel"])
    for service in ("", "raylm.v1.Generation"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()

    # v1 messages are v1alpha's on the wire: call the v1 method path with v1alpha types
    call = server["channel"].stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    replies = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                        timeout=30))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"raylm.v1.Generation", "grpc.health.v1.Health"} <= names
    alpha = reflection_pb2_grpc.ServerReflectionStub(server["channel"])
    replies = list(alpha.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="raylm.v1.Generation")]), timeout=30))
    assert replies[0].file_descriptor_response.file_descriptor_proto


def test_a_reused_request_id_never_touches_another_request(server):
    """Both calls run to completion and echo the client's id; neither aborts the other."""
    request = pb.GenerateRequest(prompt=PROMPT, request_id="same-id", sampling=pb.SamplingOptions(
        max_tokens=16, ignore_eos=True, temperature=0))

    def one(_):
        msgs = list(server["stub"].GenerateStream(request, metadata=GRPC_AUTH, timeout=60))
        return msgs[-1].finished, msgs[-1].usage.completion_tokens, {m.request_id for m in msgs}

    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert results == [(True, 16, {"same-id"})] * 4
