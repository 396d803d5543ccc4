"""Contrastive search equals the formula of Su et al. (2022) computed directly with plain Hugging
Face forward passes (no cache, no paging), and decoding modes do not disturb each other in one
batch."""
import pytest
import torch
import torch.nn.functional as F

from hf_reference import hf_model, random_prompts
from raylm.cluster import LLM, SamplingParams

ALPHA, TOP_K, MAX_TOKENS = 0.6, 4, 10


def reference_contrastive(path: str, prompt: list[int], alpha: float, top_k: int,
                          max_new_tokens: int) -> list[int]:
    """Each step: the top_k candidates by probability, each run as the full sequence + the
    candidate; score = (1 - alpha) * p - alpha * max cosine(candidate, every earlier token)."""
    model = hf_model(path)
    ids = list(prompt)
    with torch.inference_mode():
        out = model(torch.tensor([ids]), output_hidden_states=True)
        context = out.hidden_states[-1][0]  # [num_tokens, hidden], final normed hidden states
        logits = out.logits[0, -1]  # [vocab]
        for _ in range(max_new_tokens):
            probs, cand_ids = logits.softmax(-1).topk(top_k)
            hiddens, next_logits = [], []
            for token in cand_ids.tolist():
                o = model(torch.tensor([ids + [token]]), output_hidden_states=True)
                hiddens.append(o.hidden_states[-1][0, -1])
                next_logits.append(o.logits[0, -1])
            cand = torch.stack(hiddens)  # [top_k, hidden]
            cosine = F.normalize(cand, dim=-1) @ F.normalize(context, dim=-1).T  # [top_k, T]
            scores = (1 - alpha) * probs - alpha * cosine.max(dim=-1).values
            best = int(scores.argmax())
            ids.append(int(cand_ids[best]))
            context = torch.cat([context, cand[best: best + 1]])
            logits = next_logits[best]
    return ids[len(prompt):]


def _params(**kw) -> SamplingParams:
    return SamplingParams(penalty_alpha=ALPHA, top_k=TOP_K, max_tokens=MAX_TOKENS,
                          ignore_eos=True, **kw)


def _no_leaks(llm: LLM) -> None:
    llm.check_integrity()
    stats = llm.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_contrastive_matches_reference(tiny_model, arch):
    path = str(tiny_model(arch))
    llm = LLM(path, dtype="float32")
    prompts = random_prompts(llm.engine.vocab_size, [1, 7, 20, 45], seed=21)
    outs = llm.generate(prompts, _params())
    for prompt, out in zip(prompts, outs):
        assert len(out.outputs) == 1
        c = out.outputs[0]
        assert c.token_ids == reference_contrastive(path, prompt, ALPHA, TOP_K, MAX_TOKENS), (
            f"prompt of {len(prompt)} tokens")
        assert c.finish_reason == "length" and c.text == llm.tokenizer.decode(
            c.token_ids, skip_special_tokens=True)
    _no_leaks(llm)
    # The same prompts again: a unique cache salt keeps them from hitting the prefix cache
    # (their hidden states must be computed), so the results are unchanged.
    again = llm.generate(prompts, _params())
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    assert all(o.num_cached_tokens == 0 for o in again)
    _no_leaks(llm)


def test_contrastive_chunked_prefill_end_token_and_preemption(tiny_model):
    path = str(tiny_model("llama"))
    # Chunks of 16 tokens: the prompt's hidden states arrive over several steps. 12 blocks:
    # four 40-token prompts with their candidate forks cannot all fit (preemption).
    llm = LLM(path, dtype="float32", max_num_batched_tokens=16, num_blocks_override=12)
    prompts = random_prompts(llm.engine.vocab_size, [40, 37, 33, 45], seed=22)
    expected = [reference_contrastive(path, p, ALPHA, TOP_K, MAX_TOKENS) for p in prompts]
    outs = llm.generate(prompts, _params())
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.get_stats()["num_preemptions"] > 0
    _no_leaks(llm)
    # An end token that the search picks as its 4th token: the output stops there.
    end = expected[0][3]
    out = llm.generate(prompts[0], _params(stop_token_ids=[end]))[0].outputs[0]
    assert out.token_ids == expected[0][: expected[0].index(end) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == end
    _no_leaks(llm)


def test_mixed_batch_equals_each_alone(tiny_model):
    """Greedy, seeded sampling, beam search and contrastive search in one batch give what each
    gives alone."""
    path = str(tiny_model("llama"))
    llm = LLM(path, dtype="float32")
    prompts = random_prompts(llm.engine.vocab_size, [12, 30, 5, 21, 9], seed=23)
    params = [
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=MAX_TOKENS,
                       ignore_eos=True),
        SamplingParams(num_beams=3, n=2, max_tokens=MAX_TOKENS, ignore_eos=True),
        _params(),
        SamplingParams(penalty_alpha=0.3, top_k=3, max_tokens=MAX_TOKENS, ignore_eos=True),
    ]
    alone = [llm.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    together = llm.generate(prompts, params)
    for a, t in zip(alone, together):
        assert [c.token_ids for c in t.outputs] == [c.token_ids for c in a.outputs]
        assert [c.index for c in t.outputs] == list(range(len(a.outputs)))
    assert together[3].outputs[0].token_ids == reference_contrastive(
        path, prompts[3], ALPHA, TOP_K, MAX_TOKENS)
    _no_leaks(llm)


def test_contrastive_streams_one_sequence(tiny_model):
    """Candidates never show: the stream is one completion whose deltas add up to the result."""
    llm = LLM(str(tiny_model("llama")), dtype="float32")
    engine = llm.engine
    engine.add_request(engine.make_request([5, 6, 7, 8], _params()))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert all(len(o.outputs) == 1 and o.outputs[0].index == 0 for o in outs)
    streamed = [t for o in outs for t in o.outputs[0].delta_token_ids]
    assert outs[-1].finished and streamed == outs[-1].outputs[0].token_ids
    assert len(streamed) == MAX_TOKENS
    _no_leaks(llm)
