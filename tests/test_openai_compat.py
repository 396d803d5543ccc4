"""OpenAI surface as real clients use it (issue 10): lm-eval's loglikelihood requests (echo +
logprobs, max_tokens 0 or 1, token-id and string prompts, batched), vLLM's prompt_logprobs,
unsupported or invalid fields refused by name, the served model name, max_tokens that cannot fit.
Served with the routes inside the model replica (colocate_ingress): one deployment, no ingress
hop; the same answers as through a separate Ingress (tests/test_serve_app.py)."""
from __future__ import annotations

import pathlib

import pytest
import torch
from transformers import AutoTokenizer

requests = pytest.importorskip("requests")
pytest.importorskip("ray")

from hf_reference import hf_model  # noqa: E402
from serve_builders import serve_session  # noqa: E402

NAME = "tiny-served"
CONTEXT = 512


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_session(str(tiny_model("llama")), served_model_name=NAME,
                       max_model_len=CONTEXT, colocate_ingress=True) as s:
        yield s


def test_colocated_app_is_one_deployment_and_a_disconnect_frees_blocks(server):
    """The routes live in the replica: Serve runs one deployment; a client leaving a stream
    closes the in-process generator, so the engine aborts it and frees its blocks."""
    from ray import serve

    from serve_builders import APP, engine_idle, wait_until

    assert list(serve.status().applications[APP].deployments) == ["LLMServer"]
    body = {"model": NAME, "prompt": "The quick brown fox", "max_tokens": 400, "ignore_eos": True,
            "stream": True, "temperature": 0}
    with requests.post(server["http"] + "/v1/completions", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        for i, _line in enumerate(resp.iter_lines()):
            if i >= 4:
                break
    assert wait_until(lambda: engine_idle(server["llm"]), timeout_s=30), \
        server["llm"].get_stats.remote().result()


def _post(server, path, body):
    return requests.post(server["http"] + path, json=body, timeout=120)


def _hf_prompt_logprobs(path: str, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 from Hugging Face on the same weights (fp32)."""
    model = hf_model(path)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _tokenize(server, text: str) -> list[int]:
    from raylm.proto import generation_pb2 as pb
    from serve_builders import METADATA

    return list(server["stub"].Tokenize(pb.TokenizeRequest(text=text), metadata=METADATA).token_ids)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_lm_eval_loglikelihood_token_id_prompts(server, max_tokens):
    """lm-eval local-completions: a batch of token-id prompts, echo, logprobs=1."""
    prompts = [[5, 17, 33, 90, 12, 7], [40, 41, 42, 43]]
    body = {"model": NAME, "prompt": prompts, "echo": True, "logprobs": 1,
            "max_tokens": max_tokens, "temperature": 0}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    for ids, choice in zip(prompts, choices):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = _hf_prompt_logprobs(server["model"], ids)
        got = lp["token_logprobs"][1:len(ids)]
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4, (got, expected)
        for top, value in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
            assert len(top) >= 1 and max(top.values()) >= value - 1e-6  # greedy check lm-eval does
        assert lp["text_offset"] == sorted(lp["text_offset"])
        prompt_text = AutoTokenizer.from_pretrained(server["model"]).decode(ids)
        assert choice["text"].startswith(prompt_text)  # echo: the prompt's text first
        assert lp["tokens"][:len(ids)] == [AutoTokenizer.from_pretrained(server["model"]).decode(
            [t]) for t in ids]


def test_lm_eval_string_prompt_echo(server):
    text = "The quick brown fox jumps"
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": text, "echo": True,
                                          "logprobs": 2, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].startswith(text)
    ids = _tokenize(server, text)
    expected = _hf_prompt_logprobs(server["model"], ids)
    got = choice["logprobs"]["token_logprobs"][1:len(ids)]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4
    assert all(len(t) >= 2 for t in choice["logprobs"]["top_logprobs"][1:])


def test_echo_streams_the_prompt_first(server):
    body = {"model": NAME, "prompt": "Hello there", "echo": True, "max_tokens": 3,
            "temperature": 0, "stream": True}
    with requests.post(server["http"] + "/v1/completions", json=body, stream=True, timeout=60) as r:
        import json

        texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                 if line.startswith(b"data: {")]
    assert texts[0].startswith("Hello there")


def test_vllm_prompt_logprobs_on_both_routes(server):
    ids = [5, 17, 33, 90]
    r = _post(server, "/v1/completions", {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    expected = _hf_prompt_logprobs(server["model"], ids)
    for i, entry in enumerate(plp[1:], start=1):
        assert abs(entry[str(ids[i])]["logprob"] - expected[i - 1]) < 1e-4
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 2, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    assert r.json()["prompt_logprobs"][0] is None and len(r.json()["prompt_logprobs"]) > 1


@pytest.mark.parametrize("field,value", [
    ("response_format", {"type": "xml"}), ("guided_regex", "[a"),
    ("guided_json", {"type": "no-such-type"}), ("functions", [{"name": "f"}]),
    ("logit_bias", {"5": 1.0}), ("suffix", "end"), ("no_such_field", 1),
])
def test_unsupported_fields_are_400_naming_them(server, field, value):
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2})):
        if field == "suffix" and "chat" in path:
            continue
        r = _post(server, path, {**body, field: value})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == field, r.json()


def test_served_model_name_and_model_retrieve(server):
    listed = requests.get(server["http"] + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in listed] == [NAME] and listed[0]["max_model_len"] == CONTEXT
    one = requests.get(server["http"] + f"/v1/models/{NAME}", timeout=30)
    assert one.status_code == 200 and one.json()["id"] == NAME
    assert requests.get(server["http"] + "/v1/models/other", timeout=30).status_code == 404
    assert _post(server, "/v1/completions", {"model": NAME, "prompt": "hi",
                                             "max_tokens": 2}).json()["model"] == NAME
    assert _post(server, "/v1/completions", {"model": "other", "prompt": "hi",
                                             "max_tokens": 2}).status_code == 404
    assert pathlib.Path(server["model"]).name != NAME


def test_max_tokens_that_cannot_fit_is_400_naming_the_numbers(server):
    r = _post(server, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 100000})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and str(CONTEXT) in err["message"] and "100000" in err["message"]
    ok = _post(server, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 100000,
                                           "ignore_eos": True, "truncate_max_tokens": True})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    assert ok.json()["usage"]["completion_tokens"] == CONTEXT - 3


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}),
])
def test_continuous_usage_stats_on_every_chunk(server, path, body):
    import json

    body = {**body, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with requests.post(server["http"] + path, json=body, stream=True, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
    # every chunk that carries text, the last one included: a reader that falls behind the
    # engine gets its pending deltas merged, possibly all into the finishing chunk
    with_text = [c for c in chunks if c["choices"]
                 and (c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content"))]
    assert with_text and all("usage" in c for c in with_text)
    counts = [c["usage"]["completion_tokens"] for c in with_text]
    assert counts == sorted(counts) and counts[0] >= 1
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_grpc_max_tokens_that_cannot_fit(server):
    import grpc

    from raylm.proto import generation_pb2 as pb
    from serve_builders import METADATA

    ids = pb.TokenIds(ids=[5, 6, 7])
    with pytest.raises(grpc.RpcError) as info:
        server["stub"].Generate(pb.GenerateRequest(token_ids=ids, sampling=pb.SamplingOptions(
            max_tokens=100000)), metadata=METADATA, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(CONTEXT) in info.value.details()
    reply = server["stub"].Generate(pb.GenerateRequest(token_ids=ids, sampling=pb.SamplingOptions(
        max_tokens=100000, ignore_eos=True, truncate_max_tokens=True)), metadata=METADATA,
        timeout=120)
    assert reply.usage.completion_tokens == CONTEXT - 3


# --- structured output (the grammar itself is tested at the engine: test_structured_output.py)
_SCHEMA = {"type": "object", "properties": {
    "city": {"enum": ["Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9},
    "note": {"type": "string", "maxLength": 6}},
    "required": ["city", "days", "note"], "additionalProperties": False}
_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": _SCHEMA}},
          {"type": "function", "function": {"name": "ping"}}]


def test_openai_client_structured_output_and_tool_calls(server):
    """The official client: response_format json_schema and json_object, guided_choice,
    tools with a named function and "required" (also streamed)."""
    import json

    import jsonschema
    import openai

    client = openai.OpenAI(base_url=server["http"] + "/v1", api_key="none")
    messages = [{"role": "user", "content": "weather?"}]
    chat = client.chat.completions.create(
        model=NAME, messages=messages, temperature=1.0, seed=3, max_tokens=100, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": _SCHEMA,
                                                                "strict": True}})
    for choice in chat.choices:
        jsonschema.validate(json.loads(choice.message.content), _SCHEMA)
    done = client.completions.create(model=NAME, prompt="pick", max_tokens=10, temperature=1.0,
                                     extra_body={"guided_choice": ["yes", "no"]})
    assert done.choices[0].text in ("yes", "no")

    named = client.chat.completions.create(
        model=NAME, messages=messages, temperature=1.0, seed=1, max_tokens=100, tools=_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert named.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), _SCHEMA)
    for seed in range(4):
        required = client.chat.completions.create(
            model=NAME, messages=messages, temperature=1.0, seed=seed, max_tokens=100,
            tools=_TOOLS, tool_choice="required")
        (call,) = required.choices[0].message.tool_calls
        assert call.function.name in ("get_weather", "ping")
        args = json.loads(call.function.arguments)
        if call.function.name == "ping":
            assert args == {}
        else:
            jsonschema.validate(args, _SCHEMA)

    stream = client.chat.completions.create(
        model=NAME, messages=messages, temperature=1.0, seed=1, max_tokens=100, tools=_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.arguments == call_arguments(named)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def call_arguments(response) -> str:
    return response.choices[0].message.tool_calls[0].function.arguments


@pytest.mark.parametrize("extra,param", [
    ({"tools": _TOOLS}, "tool_choice"),  # auto by default: no tool parser
    ({"tools": _TOOLS, "tool_choice": "auto"}, "tool_choice"),
    ({"tools": _TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/no"}}}}}},
     "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
])
def test_structured_output_errors_name_the_field(server, extra, param):
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_tool_choice_none_is_plain_text(server):
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 4, "tools": _TOOLS,
                                               "tool_choice": "none", "temperature": 0})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert "tool_calls" not in message and isinstance(message["content"], str)


def test_grpc_structured_output(server):
    import json

    import grpc
    import jsonschema

    from raylm.proto import generation_pb2 as pb
    from serve_builders import METADATA

    so = pb.StructuredOutput(json_schema=json.dumps(_SCHEMA))
    reply = server["stub"].Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(
        max_tokens=100, seed=2, structured_output=so)), metadata=METADATA, timeout=120)
    jsonschema.validate(json.loads(reply.choices[0].text), _SCHEMA)
    choice = pb.StructuredOutput(choice=pb.ChoiceList(choices=["left", "right"]))
    reply = server["stub"].Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(
        max_tokens=10, structured_output=choice)), metadata=METADATA, timeout=120)
    assert reply.choices[0].text in ("left", "right")
    with pytest.raises(grpc.RpcError) as info:
        server["stub"].Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(
            structured_output=pb.StructuredOutput(regex="(unclosed"))), metadata=METADATA,
            timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structured_outputs" in info.value.details()
