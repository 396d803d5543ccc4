"""Greedy output equals Hugging Face generate token for token, under every scheduling regime."""
import pytest

from hf_reference import hf_greedy, random_prompts
from raylm.cluster import LLM, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
LENGTHS = [1, 2, 15, 16, 17, 31, 33, 64, 100, 300]
MAX_TOKENS = 10


def _check(llm: LLM, path, prompts, max_tokens=MAX_TOKENS):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert [o.prompt_token_ids for o in outs] == prompts
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        assert c.finish_reason == "length"
        assert c.token_ids == hf_greedy(path, prompt, max_tokens), f"prompt of {len(prompt)} tokens"
    llm.check_integrity()
    stats = llm.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]  # nothing leaked
    assert stats["num_running"] == stats["num_waiting"] == 0
    return stats


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(tiny_model, arch):
    path = tiny_model(arch)
    llm = LLM(str(path), dtype="float32")
    prompts = random_prompts(llm.engine.vocab_size, LENGTHS, seed=1)
    _check(llm, path, prompts)


def test_torch_reference_backend_matches_hf(tiny_model, monkeypatch):
    monkeypatch.setenv("RAYLM_ATTENTION_BACKEND", "torch")  # the pure-torch oracle path
    path = tiny_model("qwen3")
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=64)
    assert llm.executor_info["attention_backend"] == "torch"
    prompts = random_prompts(llm.engine.vocab_size, [1, 17, 90, 130], seed=7)
    _check(llm, path, prompts)


def test_chunked_prefill_matches_hf(tiny_model):
    path = tiny_model("llama")
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=24)
    prompts = random_prompts(llm.engine.vocab_size, [300, 5, 47, 1, 90], seed=2)
    _check(llm, path, prompts)


def test_prefix_cache_hits_match_hf(tiny_model):
    path = tiny_model("qwen2")
    llm = LLM(str(path), dtype="float32")
    (shared,) = random_prompts(llm.engine.vocab_size, [70], seed=3)
    tails = random_prompts(llm.engine.vocab_size, [1, 9, 16, 30], seed=4)
    prompts = [shared + t for t in tails] + [shared]
    _check(llm, path, prompts[:1])  # fills the cache
    stats = _check(llm, path, prompts)
    assert stats["prefix_cache_hit_tokens"] > 0


def test_preemption_matches_hf(tiny_model):
    path = tiny_model("mistral")
    # 12 blocks of 16 tokens: eight 40-token prompts growing to 70 tokens cannot all fit.
    llm = LLM(str(path), dtype="float32", num_blocks_override=12, max_num_seqs=8)
    prompts = random_prompts(llm.engine.vocab_size, [40] * 8, seed=5)
    stats = _check(llm, path, prompts, max_tokens=30)
    assert stats["num_preemptions"] > 0


def test_eos_stops_like_hf(tiny_model):
    path = tiny_model("llama")
    llm = LLM(str(path), dtype="float32")
    eos = llm.tokenizer.eos_token_id
    prompts = random_prompts(llm.engine.vocab_size, [5, 12], seed=6)
    free_run = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    # Make the 3rd generated token a stop token: generation ends there, token included.
    for prompt, out in zip(prompts, free_run):
        third = out.outputs[0].token_ids[2]
        res = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8,
                                                     stop_token_ids=[third]))[0].outputs[0]
        first = out.outputs[0].token_ids.index(third)
        assert res.token_ids == out.outputs[0].token_ids[: first + 1]
        assert res.finish_reason == "stop" and res.stop_reason == third
    assert eos is not None


def test_token_and_text_prompts_and_per_prompt_params(tiny_model):
    path = tiny_model("llama")
    llm = LLM(str(path), dtype="float32")
    text = "Hello world, this is a test."
    ids = llm.tokenizer.encode(text)
    a, b = llm.generate([text, ids], [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                                      SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)])
    assert a.prompt_token_ids == ids and a.prompt == text
    assert len(a.outputs[0].token_ids) == 5 and len(b.outputs[0].token_ids) == 7
    assert b.outputs[0].token_ids[:5] == a.outputs[0].token_ids
    assert a.outputs[0].text == llm.tokenizer.decode(a.outputs[0].token_ids, skip_special_tokens=True)


def test_bad_input_names_the_field(tiny_model):
    llm = LLM(str(tiny_model("llama")), dtype="float32")
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([[10**9]])
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * (llm.engine.max_model_len + 1)])
    assert llm.get_stats()["num_waiting"] == 0


def test_greedy_steps_fuse_the_lm_head_and_pick_only_when_nothing_else_is_asked(tiny_model,
                                                                                  monkeypatch):
    """On the compiled CPU step a plain greedy step ends at the tokens (LM head and argmax in
    the compiled call); a step that also wants logprobs goes through the sampler. Both give HF's
    tokens."""
    from raylm.workers.models.llama_cpu_step import LlamaCpuStep

    calls = []
    greedy = LlamaCpuStep.greedy
    monkeypatch.setattr(LlamaCpuStep, "greedy", lambda self, *a: calls.append(1) or greedy(self, *a))
    path = tiny_model("llama")
    llm = LLM(str(path), dtype="float32", max_decode_steps=1)
    prompts = random_prompts(llm.engine.vocab_size, [3, 40], seed=5)
    _check(llm, path, prompts)
    assert len(calls) == MAX_TOKENS  # one step per token, both prompts in each
    calls.clear()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, MAX_TOKENS)
        assert len(out.outputs[0].logprobs) == MAX_TOKENS
    assert calls == []
