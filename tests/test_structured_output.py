"""Structured output through the engine (issue 10): a tiny random model sampling at
temperature 1 still emits only what the grammar allows, and ends where it may end."""
from __future__ import annotations

import json
import re

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from raylm.cluster import LLM, SamplingParams  # noqa: E402
from raylm.cluster.structured_outputs import StructuredOutputsParams  # noqa: E402
from raylm.workers.logits_processors import apply_token_bitmask  # noqa: E402

# Bounded, so a random model's walk through it ends well within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
            "legs": {"type": "integer", "minimum": 0, "maximum": 8},
            "flies": {"type": "boolean"}}, "required": ["legs", "flies"],
            "additionalProperties": False}]},
    },
    "required": ["name", "age", "color", "tags", "pet"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama")), dtype="float32")


def _texts(llm, prompts, params):
    outs = llm.generate(prompts, params)
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


def test_json_schema_outputs_always_validate(llm):
    """50 seeded random samples, batched together: every one parses and validates."""
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200,
                             structured_outputs={"json": PERSON}) for s in range(50)]
    results = _texts(llm, ["Tell me about someone."] * 50, params)
    for text, finish in results:
        assert finish == "stop", (text, finish)
        jsonschema.validate(json.loads(text), PERSON)
    assert len({t for t, _ in results}) > 10  # the model still chooses within the grammar
    assert llm.get_stats()["num_grammars_compiled"] >= 1


def test_regex_choice_and_n_greater_than_one(llm):
    regex = r"[a-d]{2,5}-[0-9]{1,3}"
    results = _texts(llm, ["x", "y"], [SamplingParams(temperature=1.0, seed=1, n=4,
                                                      max_tokens=30,
                                                      structured_outputs={"regex": regex})] * 2)
    assert len(results) == 8
    for text, finish in results:
        assert re.fullmatch(regex, text) and finish == "stop", text
    choices = ["alpha beta", "gamma", "{\"x\": 1}"]
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature, seed=s, max_tokens=30,
                                 structured_outputs={"choice": choices}) for s in range(8)]
        for text, finish in _texts(llm, ["pick one"] * 8, params):
            assert text in choices and finish == "stop"


def test_json_object_parses_and_mixes_with_free_text(llm):
    """A random model may run out of tokens inside an open-ended object: every output that
    ended parses as an object; free-text requests in the same batch are untouched."""
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=48,
                             structured_outputs={"json_object": True}) for s in range(12)]
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = _texts(llm, ["json please"] * 12 + ["free"], params + [free])
    ended = [text for text, finish in results[:12] if finish == "stop"]
    assert ended
    for text in ended:
        assert isinstance(json.loads(text), dict)
    alone = _texts(llm, ["free"], [free])
    assert results[-1] == alone[0]


def test_greedy_structured_output_is_deterministic(llm):
    p = SamplingParams(temperature=0.0, max_tokens=200, structured_outputs={"json": PERSON})
    a, b = _texts(llm, ["same"], [p]), _texts(llm, ["same", "other"], [p, p])
    assert a[0] == b[0]
    jsonschema.validate(json.loads(a[0][0]), PERSON)


@pytest.mark.parametrize("spec,field", [
    ({"json": {"type": "no-such-type"}}, "structured_outputs"),
    ({"regex": "[a-"}, "structured_outputs"),
    ({"json": "{not json"}, "structured_outputs"),
    ({"json": "null"}, "structured_outputs"),
    ({"regex": "a", "choice": ["b"]}, "structured_outputs"),
    ({"choice": []}, "structured_outputs"),
    ({"schema": {}}, "structured_outputs"),
])
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(structured_outputs=spec)


@pytest.mark.parametrize("extra,field", [
    ({"num_beams": 2, "temperature": 0.0}, "num_beams"),
    ({"penalty_alpha": 0.5, "top_k": 4}, "penalty_alpha"),
    ({"ignore_eos": True}, "ignore_eos"),
    ({"min_tokens": 2}, "min_tokens"),
])
def test_refused_combinations_name_the_field(extra, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(structured_outputs={"regex": "a+"}, **extra)


def test_spec_crosses_processes_as_a_dict():
    p = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"]))
    again = SamplingParams.from_dict(p.to_dict())
    assert again.structured_outputs == p.structured_outputs
    assert again.structured_outputs.cache_key == p.structured_outputs.cache_key


def test_speculative_engine_serves_structured_requests(tiny_model):
    """Structured sequences are not speculated (a mask covers one position per step); the
    others in the same engine still are."""
    llm = LLM(str(tiny_model("llama")), dtype="float32",
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200,
                             structured_outputs={"json": PERSON}) for s in range(4)]
    for text, finish in _texts(llm, ["spec"] * 4, params):
        jsonschema.validate(json.loads(text), PERSON)


def test_apply_token_bitmask_masks_exactly_the_unset_bits():
    vocab = 70  # not a multiple of 32: the last word is partial
    logits = torch.randn(3, vocab)
    allowed = [[0, 31, 32, 69], [5], list(range(vocab))]
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    for r, ids in enumerate(allowed[:2]):
        for t in ids:
            word = int(bitmask[r, t // 32]) | (1 << (t % 32))
            bitmask[r, t // 32] = word - (1 << 32) if word >= 1 << 31 else word
    # float32: the host's numpy path; bfloat16 takes the tensor path an accelerator uses
    for x in (logits, logits.to(torch.bfloat16)):
        out = apply_token_bitmask(x, [0, 1], bitmask)
        for r in range(2):
            kept = torch.isfinite(out[r]).nonzero().flatten().tolist()
            assert kept == allowed[r]
        assert torch.equal(out[2], x[2]) and torch.isfinite(x).all()  # input untouched
    full = apply_token_bitmask(logits[:2], [0, 1], bitmask)
    assert torch.isfinite(full).sum() == len(allowed[0]) + len(allowed[1])


def test_bench_structured_command(tiny_model, tmp_path):
    """`raylm bench structured` end to end on the tiny model (figures come from the bench
    model; this only keeps the command working)."""
    from raylm.cluster.cli import main

    out = tmp_path / "structured.json"
    assert main(["bench", "structured", "--model", str(tiny_model("llama")), "--batch", "4",
                 "--output-len", "4", "--repeats", "1", "--library-steps", "5",
                 "--libraries", "llguidance", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["libraries"][0]["library"] == "llguidance"
    runs = result["throughput"]["runs"]
    assert runs["json schema"][0]["output_tokens"] == runs["free text"][0]["output_tokens"] == 16
