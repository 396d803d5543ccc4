"""Seeded generators of malformed, out-of-range and edge-case requests for the fuzz test.

Each case is plain data (bytes to send), so a failing case is printed and replayed from its seed
and index. The mix follows what an attacker or a buggy client sends: invalid JSON and bytes,
wrong types, every sampling field at and beyond its edges, NaN/Infinity, huge numbers, empty and
over-long prompts, out-of-vocabulary ids, lone surrogates, unknown fields, wrong paths."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from raylm.proto import generation_pb2 as pb

VOCAB_HINT = 1 << 20  # far above any tiny model's vocabulary

_EDGE_INTS = [0, -1, 1, 2, 127, 128, 129, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64,
              10**7, 100000, -(2**63), 10**30]
_EDGE_FLOATS = [0.0, -0.0, 1e-320, 1e-45, 0.5, 1.0, 1.0000001, 2.0, 2.0001, -2.0001, 1e308,
                -1e308, 3.4e38, -1.0]
_RAW_FLOATS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]
_STRINGS = ["", " ", "a", "\x00", "\ud800", "\udfff", "x" * 5000, "é" * 300, "\u202e", "{}",
            "null", "4", "true", "🦊" * 50]
_JUNK = [None, True, False, [], {}, [1, "a"], {"a": 1}, "4", 4.5, -1, 2**70]

_INT_FIELDS = ["n", "max_tokens", "top_k", "seed", "min_tokens", "logprobs", "top_logprobs",
               "best_of", "max_completion_tokens"]
_FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"]
_BOOL_FIELDS = ["stream", "echo", "ignore_eos", "skip_special_tokens",
                "include_stop_str_in_output", "logprobs"]


@dataclass
class HttpCase:
    method: str
    path: str
    body: bytes | None
    content_type: str | None = "application/json"
    raw: bool = False  # body is not valid JSON on purpose


@dataclass
class GrpcCase:
    method: str  # Generate | GenerateStream | Tokenize | GetModelInfo
    payload: bytes


def _value(rng: random.Random) -> Any:
    pick = rng.random()
    if pick < 0.35:
        return rng.choice(_EDGE_INTS)
    if pick < 0.6:
        return rng.choice(_EDGE_FLOATS)
    if pick < 0.8:
        return rng.choice(_STRINGS)
    return rng.choice(_JUNK)


def _prompt(rng: random.Random) -> Any:
    return rng.choice([
        "", "Hello", "\ud800 lone", "word " * rng.choice([10, 3000, 40000]), [], [[]],
        [rng.randrange(-5, VOCAB_HINT) for _ in range(rng.randrange(1, 6))],
        [[1, 2], [3, VOCAB_HINT]], [1.5, 2], ["a", 1], [True, 2], [-1], [2**31 - 1], [2**63],
        ["ok", "\udfff"], None, 7, {"text": "x"}, "\x00" * 100, [5] * 5000,
    ])


def _messages(rng: random.Random) -> Any:
    return rng.choice([
        [], None, "hi", [{"role": "user", "content": "hi"}], [{"role": "wizard", "content": "x"}],
        [{"content": "no role"}], [{"role": "user"}], [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}],
        [{"role": "user", "content": "\ud83d"}], [{"role": "user", "content": 5}], [1, 2],
        [{"role": "user", "content": "long " * 40000}],
        [{"role": "system", "content": "s"}] * 300,
    ])


def _sampling_fields(rng: random.Random, num: int) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for _ in range(num):
        kind = rng.random()
        if kind < 0.3:
            body[rng.choice(_INT_FIELDS)] = rng.choice(_EDGE_INTS + _JUNK[:4])
        elif kind < 0.55:
            body[rng.choice(_FLOAT_FIELDS)] = rng.choice(_EDGE_FLOATS + _JUNK[:5])
        elif kind < 0.65:
            body[rng.choice(_BOOL_FIELDS)] = rng.choice([True, False, 1, 0, "true", None])
        elif kind < 0.8:
            body["stop"] = rng.choice([["x"] * 100, [""], ["a" * 5000], [1], "s", None, ["\ud800"],
                                       ["ok", "stop"]])
        elif kind < 0.9:
            body["stop_token_ids"] = rng.choice([[VOCAB_HINT], [-1], [2**31 - 1], [2**63],
                                                 list(range(2000)), ["a"], [1.5], 3])
            body["min_tokens"] = rng.choice([0, 2, 5])
        else:
            body[rng.choice(["unknown_field", "response_format", "tools", "logit_bias",
                             "stream_options", "suffix", "user", "model"])] = _value(rng)
    return body


def _json_case(rng: random.Random, path: str, body: dict[str, Any]) -> HttpCase:
    text = json.dumps(body)
    if rng.random() < 0.15:  # a float field as a non-standard literal Python's json accepts
        field = rng.choice(_FLOAT_FIELDS)
        text = text[:-1] + (", " if len(body) else "") + f'"{field}": {rng.choice(_RAW_FLOATS)}}}'
    return HttpCase("POST", path, text.encode("utf-8", "surrogatepass"))


def http_case(rng: random.Random, model: str) -> HttpCase:
    kind = rng.random()
    if kind < 0.08:  # not JSON at all, or broken JSON, or invalid UTF-8
        body = rng.choice([b"", b"{", b"{\"prompt\": ", b"\xff\xfe\xfd", b"[1, 2", b"null", b"[]",
                           b"\"text\"", b"123", b"{\"prompt\": \"\xc3\x28\"}", b"\x00" * 64,
                           bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))])
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        return HttpCase("POST", path, body, rng.choice(["application/json", None, "text/plain"]),
                        raw=True)
    if kind < 0.12:  # wrong path or method
        return rng.choice([HttpCase("GET", "/v1/completions", None),
                           HttpCase("POST", "/v1/nothing", b"{}"),
                           HttpCase("DELETE", "/v1/models", None),
                           HttpCase("GET", "/v1/models/" + "x" * 300, None),
                           HttpCase("POST", "/health", b"{}"),
                           HttpCase("GET", "/v1/chat/completions?x=" + "y" * 2000, None)])
    if kind < 0.55:
        body = {"prompt": _prompt(rng), "max_tokens": rng.choice([1, 2, 4])}
        if rng.random() < 0.2:
            body["model"] = rng.choice([model, "other", "", "\ud800", 5])
        body.update(_sampling_fields(rng, rng.randrange(1, 5)))
        return _json_case(rng, "/v1/completions", body)
    body = {"messages": _messages(rng), "max_tokens": rng.choice([1, 2, 4])}
    body.update(_sampling_fields(rng, rng.randrange(0, 5)))
    if rng.random() < 0.1:
        body = {k: v for k, v in body.items() if k != "messages"}
    return _json_case(rng, "/v1/chat/completions", body)


def http_cases(seed: int, num: int, model: str) -> list[HttpCase]:
    rng = random.Random(seed)
    return [http_case(rng, model) for _ in range(num)]


# --- gRPC ----------------------------------------------------------------------------------

_U32 = [0, 1, 2, 129, 100000, 10**7, 2**31, 2**32 - 1]
_I32 = [-(2**31), -1, 0, 1, 2**31 - 1]
_F32 = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e-40, 3e38, 1.5, 2.5]


def _sampling(rng: random.Random) -> pb.SamplingOptions:
    s = pb.SamplingOptions(max_tokens=rng.choice([1, 2, 3]))
    for _ in range(rng.randrange(1, 5)):
        field = rng.choice(["n", "max_tokens", "min_tokens", "logprobs", "top_k", "seed",
                            "temperature", "top_p", "min_p", "repetition_penalty",
                            "presence_penalty", "frequency_penalty", "stop", "stop_token_ids"])
        if field in ("n", "max_tokens", "min_tokens", "logprobs"):
            setattr(s, field, rng.choice(_U32))
        elif field == "top_k":
            s.top_k = rng.choice(_I32)
        elif field == "seed":
            s.seed = rng.choice([-(2**63), 2**63 - 1, 0])
        elif field == "stop":
            s.stop.extend(rng.choice([["x"] * 100, [""], ["a" * 5000], ["ok"]]))
        elif field == "stop_token_ids":
            s.stop_token_ids.extend(rng.choice([[2**31 - 1], [-1], [VOCAB_HINT], [1, 2]]))
            s.min_tokens = rng.choice([0, 2])
        else:
            setattr(s, field, rng.choice(_F32))
    return s


def _generate_request(rng: random.Random) -> pb.GenerateRequest:
    r = pb.GenerateRequest(sampling=_sampling(rng))
    which = rng.random()
    if which < 0.35:
        r.prompt = rng.choice(["", "Hello", "word " * rng.choice([10, 3000, 30000]), "\x00"])
    elif which < 0.65:
        r.token_ids.ids.extend(rng.choice([[], [1, 2, 3], [-1], [2**31 - 1], [VOCAB_HINT],
                                           [5] * 5000]))
    elif which < 0.9:
        msgs = rng.choice([[], [("user", "hi")], [("wizard", "x")], [("user", "")],
                           [("user", "long " * 30000)]])
        r.chat.messages.extend(pb.ChatMessage(role=a, content=b) for a, b in msgs)
    # else: the oneof stays empty
    if rng.random() < 0.1:
        r.model = rng.choice(["other", "x" * 1000])
    if rng.random() < 0.1:
        r.request_id = rng.choice(["dup", "x" * 5000, ""])
    return r


def grpc_case(rng: random.Random) -> GrpcCase:
    kind = rng.random()
    method = rng.choice(["Generate", "GenerateStream"])
    if kind < 0.3:  # bytes protobuf cannot parse (or parses into something odd)
        payload = rng.choice([b"\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11,
                              bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))])
        return GrpcCase(rng.choice([method, "Tokenize", "GetModelInfo"]), payload)
    if kind < 0.4:  # a valid message cut short
        full = _generate_request(rng).SerializeToString()
        return GrpcCase(method, full[: rng.randrange(0, max(1, len(full)))])
    if kind < 0.5:
        t = pb.TokenizeRequest()
        choice = rng.random()
        if choice < 0.4:
            t.text = rng.choice(["", "hi", "z" * 100000])
        elif choice < 0.8:
            t.chat.messages.extend([pb.ChatMessage(role=rng.choice(["user", "x"]), content="c")])
        return GrpcCase("Tokenize", t.SerializeToString())
    return GrpcCase(method, _generate_request(rng).SerializeToString())


def grpc_cases(seed: int, num: int) -> list[GrpcCase]:
    rng = random.Random(seed)
    return [grpc_case(rng) for _ in range(num)]
