"""Beam search equals Hugging Face `generate(num_beams=..., do_sample=False)`: the same
hypotheses in the same order with the same scores; beams share KV blocks and never leak them."""
import pytest
import torch

from hf_reference import hf_greedy, hf_model, random_prompts
from raylm.cluster import LLM, SamplingParams

MAX_TOKENS = 10
LENGTHS = [3, 17, 40]


@pytest.fixture(scope="module")
def engines(tiny_model):
    cache = {}

    def get(arch: str) -> tuple[LLM, str]:
        if arch not in cache:
            path = str(tiny_model(arch))
            cache[arch] = (LLM(path, dtype="float32"), path)
        return cache[arch]

    return get


def hf_beams(path: str, prompt: list[int], *, num_beams: int, n: int, length_penalty: float,
             early_stopping, eos: int | None, max_new_tokens: int):
    """HF's n best hypotheses: [(token_ids, length-penalized score)], best first."""
    model = hf_model(path)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, num_beams=num_beams, num_return_sequences=n,
            length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
            max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_scores=True)
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()  # generated tokens per hypothesis
    return [(out.sequences[i, len(prompt): len(prompt) + lengths[i]].tolist(),
             out.sequences_scores[i].item()) for i in range(n)]


def check_like_hf(llm: LLM, path: str, prompts, *, num_beams, n, length_penalty, early_stopping,
                  eos_ids: list[int | None], max_tokens=MAX_TOKENS) -> list:
    params = [SamplingParams(num_beams=num_beams, n=n, length_penalty=length_penalty,
                             early_stopping=early_stopping, max_tokens=max_tokens,
                             ignore_eos=True, stop_token_ids=[] if eos is None else [eos])
              for eos in eos_ids]
    outs = llm.generate(prompts, params)
    finish_reasons = []
    for prompt, eos, out in zip(prompts, eos_ids, outs):
        expected = hf_beams(path, prompt, num_beams=num_beams, n=n, length_penalty=length_penalty,
                            early_stopping=early_stopping, eos=eos, max_new_tokens=max_tokens)
        assert out.finished and len(out.outputs) == n
        assert [c.index for c in out.outputs] == list(range(n))
        assert [c.token_ids for c in out.outputs] == [t for t, _ in expected], (
            f"prompt of {len(prompt)} tokens, eos {eos}")
        for c, (tokens, score) in zip(out.outputs, expected):
            assert c.cumulative_logprob / len(tokens) ** length_penalty == pytest.approx(
                score, abs=1e-4)
            ends = eos is not None and tokens[-1] == eos
            assert c.finish_reason == ("stop" if ends else "length")
            finish_reasons.append(c.finish_reason)
    llm.check_integrity()
    stats = llm.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == 0
    return finish_reasons


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_search_matches_hf(engines, arch, num_beams, length_penalty, early_stopping):
    llm, path = engines(arch)
    prompts = random_prompts(llm.engine.vocab_size, LENGTHS, seed=11)
    n = num_beams // 2
    kwargs = dict(num_beams=num_beams, n=n, length_penalty=length_penalty,
                  early_stopping=early_stopping)
    # The first prompt has no end token (it runs to max_tokens); the others end on a token the
    # model likes (their 3rd greedy token), so some hypotheses end early.
    eos_ids = [None] + [hf_greedy(path, p, 3)[2] for p in prompts[1:]]
    reasons = check_like_hf(llm, path, prompts, eos_ids=eos_ids, **kwargs)
    assert set(reasons[:n]) == {"length"}
    if length_penalty < 1.0:  # favours short hypotheses: some end on the end token
        assert "stop" in reasons


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_search_all_hypotheses_and_logprobs(engines, early_stopping):
    """n == num_beams returns every hypothesis; per-token logprobs sum to the beam score."""
    llm, path = engines("llama")
    prompts = random_prompts(llm.engine.vocab_size, [9, 33], seed=12)
    eos_ids = [hf_greedy(path, p, 2)[1] for p in prompts]
    check_like_hf(llm, path, prompts, num_beams=3, n=3, length_penalty=1.0,
                  early_stopping=early_stopping, eos_ids=eos_ids, max_tokens=12)
    out = llm.generate(prompts[0], SamplingParams(num_beams=3, n=3, max_tokens=6, logprobs=2,
                                                  ignore_eos=True))[0]
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        chosen = sum(lp[t] for lp, t in zip(c.logprobs, c.token_ids))
        assert chosen == pytest.approx(c.cumulative_logprob, abs=1e-5)


def test_beam_search_under_preemption_matches_hf(tiny_model):
    """A pool too small for every beam: beams are preempted, recompute and catch up."""
    path = str(tiny_model("llama"))
    llm = LLM(path, dtype="float32", num_blocks_override=14, max_num_seqs=16)
    prompts = random_prompts(llm.engine.vocab_size, [40, 35, 30], seed=13)
    check_like_hf(llm, path, prompts, num_beams=4, n=2, length_penalty=1.0,
                  early_stopping=False, eos_ids=[None] * 3, max_tokens=20)
    assert llm.get_stats()["num_preemptions"] > 0


def _peak_blocks(llm: LLM, prompts, params: SamplingParams) -> int:
    engine = llm.engine
    for p in prompts:
        engine.add_request(engine.make_request(p, params))
    total = engine.kv.num_total_blocks
    peak = 0
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, total - engine.kv.num_free_blocks)
    engine.check_integrity()
    assert engine.kv.num_free_blocks == total
    return peak


def test_beam_search_shares_blocks(tiny_model):
    """4 beams over a 512-token prompt, 128 tokens out, against 4 independent requests."""
    path = str(tiny_model("llama"))
    # No prefix cache: independent requests then really hold their own copy of the prompt.
    llm = LLM(path, dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=2048)
    (prompt,) = random_prompts(llm.engine.vocab_size, [512], seed=14)
    beam = _peak_blocks(llm, [prompt], SamplingParams(num_beams=4, max_tokens=128,
                                                      ignore_eos=True))
    independent = _peak_blocks(llm, [prompt] * 4, SamplingParams(temperature=0.0,
                                                                 max_tokens=128, ignore_eos=True))
    print(f"\npeak KV blocks (block_size {llm.engine.kv.block_size}): beam search x4 {beam}, "
          f"4 independent sequences {independent}")
    assert beam < independent
    # The 32 prompt blocks are held once, plus at most ~9 blocks of output per beam and copies.
    assert beam <= 32 + 4 * 10


def test_beam_search_streams_only_its_result(engines):
    """Beams are reordered every step, so nothing streams until the hypotheses are final."""
    llm, _ = engines("llama")
    engine = llm.engine
    engine.add_request(engine.make_request([5, 6, 7, 8], SamplingParams(
        num_beams=3, n=2, max_tokens=5, ignore_eos=True)))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    *partial, final = outs
    assert partial and all(not o.outputs and not o.finished for o in partial)
    assert final.finished and len(final.outputs) == 2
    assert [c.delta_token_ids for c in final.outputs] == [c.token_ids for c in final.outputs]
    assert all(len(c.token_ids) == 5 for c in final.outputs)
