"""Speculative decoding through the whole engine, with the n-gram proposer and with a draft
model (a matched pair: make_pair.py): greedy tokens equal decoding without speculation (and HF)
under chunked prefill, prefix hits, preemption, stops inside an accepted run and n > 1; rejected
drafts leave no block behind; requests that cannot speculate share the batch unchanged."""
import random

import pytest

from hf_reference import hf_greedy
from raylm.cluster import LLM, SamplingParams

# Fixed k: these tests check correctness with drafts in every step (adaptive k may choose 0).
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from raylm.workers.make_pair import make_spec_pair

    target, draft = make_spec_pair(tmp_path_factory.mktemp("pair"), preset="tiny",
                                   extra_layers=4, residual_scale=0.05)
    return str(target), str(draft)


@pytest.fixture(params=["ngram", "draft"])
def setup(request, tiny_model, pair):
    """(target checkpoint, speculative_config)."""
    if request.param == "ngram":
        return str(tiny_model("llama")), NGRAM
    target, draft = pair
    return target, {"model": draft, "num_speculative_tokens": 4, "adaptive": False}


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
def test_greedy_with_speculation_equals_hf(setup, engine):
    path, spec = setup
    llm = LLM(path, dtype="float32", speculative_config=spec, **engine)
    prompts = _repetitive_prompts(0)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 40)
    stats = _clean(llm)
    assert stats["spec_num_draft_tokens"] > 0 and stats["spec_num_accepted_tokens"] > 0
    if "num_blocks_override" in engine and spec.get("method") == "ngram":
        assert stats["num_preemptions"] > 0


def test_prefix_hits_stops_and_n_inside_accepted_runs(setup):
    path, spec = setup
    plain = LLM(path, dtype="float32")
    llm = LLM(path, dtype="float32", speculative_config=spec)
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


def test_requests_that_cannot_speculate_share_the_batch(setup):
    path, spec = setup
    plain = LLM(path, dtype="float32")
    llm = LLM(path, dtype="float32", speculative_config=spec)
    prompts = _repetitive_prompts(2)
    params = [SamplingParams(num_beams=2, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    want, got = plain.generate(prompts, params), llm.generate(prompts, params)
    for w, g in zip(want, got):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
    for lw, lg in zip(want[1].outputs[0].logprobs, got[1].outputs[0].logprobs, strict=True):
        assert lg.keys() == lw.keys()
        assert [lg[k] for k in lw] == pytest.approx([lw[k] for k in lw])
    _clean(llm)


def test_seeded_sampling_with_speculation_is_reproducible_alone_and_in_a_batch(setup):
    path, spec = setup
    llm = LLM(path, dtype="float32", speculative_config=spec)
    prompts = _repetitive_prompts(3)
    seeded = SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=30, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = llm.generate(prompts, [seeded, others, others])
    assert batch[0].outputs[0].token_ids == alone and len(alone) == 30
    _clean(llm)


def test_bad_speculative_configs_name_the_field(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(str(tiny_model("llama")), speculative_config={"num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="speculative_config.lookahead"):
        LLM(str(tiny_model("llama")), speculative_config={"lookahead": 3})
    # A draft with another vocabulary cannot propose the target's tokens.
    from raylm.workers.make_model import make_model, make_tokenizer

    other = make_model(tmp_path / "other", vocab_size=len(make_tokenizer()) + 8)
    tok = make_tokenizer()
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(str(other))
    with pytest.raises(ValueError, match="speculative_config.model"):
        LLM(str(tiny_model("llama")), speculative_config={"model": str(other)})


def test_a_matched_pair_agrees_most_of_the_time(pair):
    target, draft = pair
    llm = LLM(target, dtype="float32", speculative_config={"model": draft, "adaptive": False})
    prompts = _repetitive_prompts(5)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    stats = _clean(llm)
    assert stats["spec_acceptance_rate"] > 0.5
    assert stats["spec_mean_acceptance_length"] > 2.0


def test_adaptive_k_keeps_greedy_output_and_reports_its_choice(tiny_model):
    path = str(tiny_model("llama"))
    llm = LLM(path, dtype="float32", speculative_config={"method": "ngram"})  # adaptive default
    prompts = _repetitive_prompts(4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 40)
    stats = _clean(llm)
    assert 0 <= stats["spec_current_k"] <= 4
