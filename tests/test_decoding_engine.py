"""Decoding features through the whole engine: n > 1, seeds, logprobs, stop strings, min_tokens."""
import asyncio

import pytest
import torch

from hf_reference import hf_model, random_prompts
from raylm.cluster import AsyncEngine, LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama")), dtype="float32")


def _assert_clean(llm):
    llm.check_integrity()
    s = llm.get_stats()
    assert s["num_free_blocks"] == s["num_total_blocks"]


def test_n_samples_share_the_prompt_blocks(tiny_model):
    # Prefix caching off: any sharing must come from the forks themselves.
    llm = LLM(str(tiny_model("llama")), dtype="float32", enable_prefix_caching=False)
    (prompt,) = random_prompts(llm.engine.vocab_size, [200], seed=10)

    def peak_blocks(prompts, p):
        engine = llm.engine
        free0 = low = engine.kv.num_free_blocks
        for x in prompts:
            engine.add_request(engine.make_request(x, p))
        outs = []
        while engine.has_unfinished():
            outs += engine.step(emit_deltas=False)
            low = min(low, engine.kv.num_free_blocks)
        _assert_clean(llm)
        return free0 - low, outs

    n4, outs = peak_blocks([prompt], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6,
                                                    ignore_eos=True))
    assert [o.index for o in outs[0].outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 6 for o in outs[0].outputs)
    assert len({tuple(o.token_ids) for o in outs[0].outputs}) > 1  # independent draws
    separate, _ = peak_blocks([prompt] * 4, SamplingParams(temperature=1.0, seed=3, max_tokens=6,
                                                           ignore_eos=True))
    print(f"KV blocks at peak: n=4 {n4}, 4 separate requests {separate}")
    assert n4 < separate


def test_seeded_requests_reproduce_alone_and_in_a_batch(llm):
    prompts = random_prompts(llm.engine.vocab_size, [7] + [3 + i for i in range(15)], seed=11)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=12,
                            ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=5 + i, ignore_eos=True) for i in range(15)]
    batch = llm.generate(prompts, [seeded] + others)
    assert batch[0].outputs[0].token_ids == alone
    again = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    assert again == alone
    _assert_clean(llm)


def test_logprobs_are_the_models_log_softmax(llm, tiny_model):
    (prompt,) = random_prompts(llm.engine.vocab_size, [9], seed=12)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=5,
                                                ignore_eos=True))[0].outputs[0]
    model = hf_model(str(tiny_model("llama")))
    ids = prompt + out.token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    total = 0.0
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert len(lp) == 6 or (len(lp) == 5 and tok in row.topk(5).indices.tolist())
        assert lp[tok] == pytest.approx(row[tok].item(), abs=1e-4)
        top = row.topk(5)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert lp[t] == pytest.approx(v, abs=1e-4)
        total += lp[tok]
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_stop_string_spanning_tokens_is_cut(llm):
    text_prompt = "the quick brown fox"
    free = llm.generate([text_prompt], SamplingParams(temperature=0, max_tokens=20,
                                                      ignore_eos=True))[0].outputs[0]
    assert len(free.text) > 6
    stop = free.text[3:7]  # likely spans a token boundary
    out = llm.generate([text_prompt], SamplingParams(temperature=0, max_tokens=20, stop=[stop],
                                                     ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]
    incl = llm.generate([text_prompt], SamplingParams(
        temperature=0, max_tokens=20, stop=[stop], include_stop_str_in_output=True,
        ignore_eos=True))[0].outputs[0]
    assert incl.text == free.text[: free.text.index(stop) + len(stop)]
    first = llm.generate([text_prompt], SamplingParams(temperature=0, max_tokens=20,
                                                       stop=[free.text[:1]], ignore_eos=True))
    assert first[0].outputs[0].text == "" and first[0].outputs[0].finish_reason == "stop"
    _assert_clean(llm)


def test_greedy_pick_in_the_compiled_step_equals_the_samplers(llm):
    """Plain greedy steps take the compiled step's fused LM head + argmax, outside Python's
    inference mode; asking for logprobs sends the same requests through the sampler. Same
    tokens, and the caller's thread is left as it was (not in inference mode, grads on)."""
    prompts = random_prompts(llm.engine.vocab_size, [5, 11, 3], seed=21)
    fused = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    sampled = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, logprobs=1,
                                                   ignore_eos=True))
    for a, b in zip(fused, sampled):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.outputs[0].token_ids) == 12
    _assert_clean(llm)


def test_min_tokens_suppresses_stop_tokens(llm):
    prompt = random_prompts(llm.engine.vocab_size, [6], seed=13)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8,
                                                 ignore_eos=True))[0].outputs[0].token_ids
    stop_tok = free[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, min_tokens=4,
                                                stop_token_ids=[stop_tok]))[0].outputs[0]
    assert len(out.token_ids) >= 4 and stop_tok not in out.token_ids[:4]


def test_streaming_never_leaks_stop_text(tiny_model):
    eng = AsyncEngine(str(tiny_model("llama")), dtype="float32")
    try:
        async def main():
            p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
            full = ""
            async for out in eng.generate("hello there", p):
                full = out.outputs[0].text
            stop = full[5:9]
            seen = ""
            async for out in eng.generate("hello there", SamplingParams(
                    temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])):
                seen += out.outputs[0].delta_text
                assert stop not in seen
            assert seen == full[: full.index(stop)]
        asyncio.run(main())
    finally:
        eng.shutdown()


def test_prompt_logprobs_match_hf_across_prefill_chunks(tiny_model):
    path = tiny_model("llama")
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=16)  # 3 prefill chunks
    (prompt,) = random_prompts(llm.engine.vocab_size, [40], seed=14)
    out = llm.generate([prompt, prompt], SamplingParams(temperature=0, max_tokens=2,
                                                        prompt_logprobs=3))[0]
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(str(path))(torch.tensor([prompt])).logits[0], -1)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]] == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        for t in ref[pos - 1].topk(3).indices.tolist():
            assert entry[t] == pytest.approx(ref[pos - 1, t].item(), abs=1e-4)
    _assert_clean(llm)


def test_16bit_kv_cache_stays_close_to_the_fp32_cache(tiny_model):
    path = str(tiny_model("llama"))
    (prompt,) = random_prompts(2048, [60], seed=15)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0)
    ref = LLM(path, dtype="float32", max_num_batched_tokens=16).generate([prompt], params)[0]
    llm = LLM(path, dtype="float32", kv_cache_dtype="bfloat16", max_num_batched_tokens=16)
    assert llm.executor_info["kv_cache_dtype"] == "bfloat16"
    out = llm.generate([prompt], params)[0]
    # Later chunks attend to the rounded K/V of earlier ones: close, not bit-equal.
    for pos in range(1, len(prompt)):
        tok = prompt[pos]
        assert out.prompt_logprobs[pos][tok] == pytest.approx(ref.prompt_logprobs[pos][tok],
                                                              abs=5e-2)
    _assert_clean(llm)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(path, kv_cache_dtype="int8")
