"""Multi-step decode (cluster/multi_step.py): several greedy decode steps per executor call give
the one-step engine's tokens, texts and finish reasons, stop where a sequence stops, and leave
no block behind."""
import pytest

from hf_reference import random_prompts
from raylm.cluster import LLM, SamplingParams


@pytest.fixture(scope="module")
def engines(tiny_model):
    """(one step per call, up to 8 steps per call) on the same weights."""
    path = str(tiny_model("llama"))
    return LLM(path, dtype="float32", max_decode_steps=1), LLM(path, dtype="float32")


def _generate(llm: LLM, prompts, params) -> tuple[list, int, int]:
    """Outputs, executor calls and model steps of one generate; checks nothing leaked."""
    before = llm.get_stats()
    outs = llm.generate(prompts, params, use_tqdm=False)
    after = llm.get_stats()
    llm.check_integrity()
    assert after["num_free_blocks"] == after["num_total_blocks"]
    assert after["num_running"] == after["num_waiting"] == 0
    return (outs, after["num_executor_calls"] - before["num_executor_calls"],
            after["num_model_steps"] - before["num_model_steps"])


def _summary(outs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outs]


def test_runs_give_the_one_step_tokens_and_stops(engines):
    """A batch whose requests end at different steps, by length, stop token id and stop string:
    the same outputs either way, in fewer executor calls than steps."""
    single, multi = engines
    prompts = random_prompts(single.engine.vocab_size, [3, 17, 40, 5], seed=11)
    base = single.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40,
                                                   ignore_eos=True), use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in base]
    text = base[3].outputs[0].text
    params = [
        SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                       stop_token_ids=[tokens[1][21]]),
        SamplingParams(temperature=0.0, max_tokens=31, ignore_eos=True, min_tokens=9),
        # ends on a string in the middle of its text: the run may compute past it, not emit
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                       stop=[text[len(text) // 2: len(text) // 2 + 3]]),
    ]
    want, calls_1, steps_1 = _generate(single, prompts, params)
    got, calls_8, steps_8 = _generate(multi, prompts, params)
    assert _summary(got) == _summary(want)
    assert want[1].outputs[0].token_ids == tokens[1][:22]
    assert want[1].outputs[0].finish_reason == "stop"
    assert want[3].outputs[0].finish_reason == "stop"
    longest = max(len(o.outputs[0].token_ids) for o in want)
    assert calls_1 == steps_1 == longest  # each step samples every running request once
    assert steps_8 >= longest and calls_8 < longest // 3


def test_a_run_ends_at_the_step_where_its_stop_token_comes(engines):
    """No step past a stop token id: the run ends in the C++ loop, not after its 8 steps."""
    single, multi = engines
    prompt = random_prompts(single.engine.vocab_size, [9], seed=3)
    base = single.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30,
                                                  ignore_eos=True), use_tqdm=False)
    tokens = base[0].outputs[0].token_ids
    stop = max(i for i in range(30) if tokens[i] not in tokens[:i])  # its first time
    assert stop >= 9, tokens
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                            stop_token_ids=[tokens[stop]])
    outs, calls, steps = _generate(multi, prompt, params)
    assert outs[0].outputs[0].token_ids == tokens[:stop + 1]
    assert steps == stop + 1  # the prefill's token, then one step per token: none wasted
    assert calls < steps


def test_runs_stop_at_max_model_len_and_fall_back_when_blocks_run_short(tiny_model):
    """A sequence ending at max_model_len, and a KV pool too small for every lookahead (the
    step then runs alone): the one-step outputs."""
    path = str(tiny_model("llama"))
    prompts = random_prompts(1000, [30, 20], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    results = []
    for steps in (1, 8):
        llm = LLM(path, dtype="float32", max_decode_steps=steps, max_model_len=64,
                  num_blocks_override=6, block_size=16)
        results.append(_summary(_generate(llm, prompts, params)[0]))
        assert llm.get_stats()["num_preemptions"] > 0  # the pool was short
    assert results[0] == results[1]
    assert [o[0][2] for o in results[0]] == ["length", "length"]
    assert [len(o[0][0]) for o in results[0]] == [34, 44]


def test_streamed_steps_and_sampled_rows_run_one_step_per_call(engines):
    """Deltas (the servers' path) and sampling keep one step per executor call."""
    _, multi = engines
    engine = multi.engine
    prompt = random_prompts(engine.vocab_size, [7], seed=2)[0]
    before = multi.get_stats()
    engine.add_request(engine.make_request(prompt, SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True)))
    deltas = 0
    while engine.has_unfinished():
        deltas += sum(not o.finished for o in engine.step(emit_deltas=True))
    after = multi.get_stats()
    assert deltas == 11
    assert (after["num_model_steps"] - before["num_model_steps"]
            == after["num_executor_calls"] - before["num_executor_calls"] == 12)
    _, calls, steps = _generate(multi, [prompt], SamplingParams(
        temperature=0.8, seed=1, max_tokens=12, ignore_eos=True))
    assert calls == steps == 12


def test_max_decode_steps_must_be_a_positive_int(tiny_model):
    with pytest.raises(ValueError, match="max_decode_steps"):
        LLM(str(tiny_model("llama")), dtype="float32", max_decode_steps=0)
