"""Speculative decoding with the n-gram (prompt lookup) proposer through the whole engine:
greedy tokens equal decoding without speculation (and HF) under chunked prefill, prefix hits,
preemption, stops inside an accepted run and n > 1; rejected drafts leave no block behind;
requests that cannot speculate share the batch unchanged."""
import random

import pytest

from hf_reference import hf_greedy
from raylm.cluster import LLM, SamplingParams

# Fixed k: these tests check correctness with drafts in every step (adaptive k may choose 0).
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}


def _repetitive_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    base = [rng.randrange(4, 2000) for _ in range(20)]
    return [base * 3, base[:7] * 5 + [11, 12], [rng.randrange(4, 2000) for _ in range(40)]]


def _clean(llm):
    llm.check_integrity()
    s = llm.get_stats()
    assert s["num_free_blocks"] == s["num_total_blocks"]
    assert s["num_running"] == s["num_waiting"] == 0
    return s


@pytest.mark.parametrize("engine", [
    {},
    {"max_num_batched_tokens": 24},  # chunked prefill; verification competes for the budget
    {"num_blocks_override": 14},  # lookahead slots force preemption and recompute
])
def test_greedy_with_speculation_equals_hf(tiny_model, engine):
    path = str(tiny_model("llama"))
    llm = LLM(path, dtype="float32", speculative_config=SPEC, **engine)
    prompts = _repetitive_prompts(0)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 40)
    stats = _clean(llm)
    assert stats["spec_num_draft_tokens"] > 0 and stats["spec_num_accepted_tokens"] > 0
    if "num_blocks_override" in engine:
        assert stats["num_preemptions"] > 0


def test_prefix_hits_stops_and_n_inside_accepted_runs(tiny_model):
    path = str(tiny_model("llama"))
    plain = LLM(path, dtype="float32")
    llm = LLM(path, dtype="float32", speculative_config=SPEC)
    prompts = _repetitive_prompts(1)
    reference = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=40,
                                                       ignore_eos=True))
    # A stop token taken from the middle of the reference output, and max_tokens that end
    # inside what speculation would otherwise accept.
    stop_id = reference[0].outputs[0].token_ids[25]
    cases = [
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=33, ignore_eos=True),
        SamplingParams(temperature=0, n=2, max_tokens=30, ignore_eos=True),
    ]
    for params in cases:
        for _ in range(2):  # the second round hits the prefix cache
            want = plain.generate(prompts, params)
            got = llm.generate(prompts, params)
            for w, g in zip(want, got):
                assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
                assert [c.finish_reason for c in g.outputs] == [c.finish_reason for c in w.outputs]
    stats = _clean(llm)
    assert stats["prefix_cache_hit_tokens"] > 0 and stats["spec_num_accepted_tokens"] > 0


def test_requests_that_cannot_speculate_share_the_batch(tiny_model):
    path = str(tiny_model("llama"))
    plain = LLM(path, dtype="float32")
    llm = LLM(path, dtype="float32", speculative_config=SPEC)
    prompts = _repetitive_prompts(2)
    params = [SamplingParams(num_beams=2, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    want, got = plain.generate(prompts, params), llm.generate(prompts, params)
    for w, g in zip(want, got):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
    assert got[1].outputs[0].logprobs == pytest.approx(want[1].outputs[0].logprobs)
    _clean(llm)


def test_seeded_sampling_with_speculation_is_reproducible_alone_and_in_a_batch(tiny_model):
    llm = LLM(str(tiny_model("llama")), dtype="float32", speculative_config=SPEC)
    prompts = _repetitive_prompts(3)
    seeded = SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=30, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = llm.generate(prompts, [seeded, others, others])
    assert batch[0].outputs[0].token_ids == alone and len(alone) == 30
    _clean(llm)


def test_bad_speculative_configs_name_the_field(tiny_model):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(str(tiny_model("llama")), speculative_config={"num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="speculative_config.lookahead"):
        LLM(str(tiny_model("llama")), speculative_config={"lookahead": 3})


def test_adaptive_k_keeps_greedy_output_and_reports_its_choice(tiny_model):
    path = str(tiny_model("llama"))
    llm = LLM(path, dtype="float32", speculative_config={"method": "ngram"})  # adaptive default
    prompts = _repetitive_prompts(4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 40)
    stats = _clean(llm)
    assert 0 <= stats["spec_current_k"] <= 4
