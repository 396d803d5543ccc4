"""stream_interval: how often a stream gets a message (a fixed number of steps per delta, or
"auto" by how many requests run on a CPU device), without losing a token."""
import asyncio
import itertools

import pytest

from raylm.cluster import AsyncEngine, SamplingParams


def test_stream_interval_batches_deltas_without_losing_tokens(tiny_model):
    eng = AsyncEngine(str(tiny_model("llama")), dtype="float32", stream_interval=4)
    try:
        async def main():
            deltas, tokens, last = [], [], None
            async for out in eng.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=13,
                                                                    ignore_eos=True)):
                deltas.append(len(out.outputs[0].delta_token_ids))
                tokens += out.outputs[0].delta_token_ids
                last = out
            return deltas, tokens, last
        deltas, tokens, last = asyncio.run(main())
        # The first token at once, then on every 4th step of the engine (the same steps for
        # every stream: here within 4 tokens of the first), the rest with the final output. A
        # reader that fell behind (a busy machine) gets adjacent deltas merged, so the stream
        # ends at a subset of those points.
        ends = list(itertools.accumulate(deltas))
        assert ends[-1] == 13 and ends[0] == 1, deltas
        middle = [e for e in ends[1:] if e != 13]
        assert all(e > 1 and (e - middle[0]) % 4 == 0 for e in middle), deltas
        assert not middle or middle[0] <= 5, deltas
        assert tokens == last.outputs[0].token_ids
    finally:
        eng.shutdown()


def test_auto_stream_interval_pairs_tokens_only_under_load(tiny_model):
    """stream_interval="auto" on CPU: a lone request gets a delta per token; 20 requests running
    together get their first token at once, then deltas of 2 tokens, all on the same steps (the
    consumer wakes once per interval, not once per step), and no token is lost. (EngineCore's
    deltas: an AsyncEngine reader that falls behind merges them further.)"""
    from raylm.cluster.config import EngineConfig
    from raylm.cluster.engine_core import EngineCore

    core = EngineCore(EngineConfig.from_kwargs(str(tiny_model("llama")), dtype="float32",
                                               device="cpu", stream_interval="auto"))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    try:
        def deltas_of(prompts):
            ids = []
            for prompt in prompts:
                request = core.make_request(prompt, params)
                core.add_request(request)
                ids.append(request.request_id)
            deltas = {rid: [] for rid in ids}
            tokens = {rid: [] for rid in ids}
            delta_steps = set()  # steps that sent a stream a delta other than its first or last
            while core.has_unfinished():
                for out in core.step(emit_deltas=True):
                    if deltas[out.request_id] and not out.finished:
                        delta_steps.add(core.num_delta_steps)
                    deltas[out.request_id].append(len(out.outputs[0].delta_token_ids))
                    tokens[out.request_id] += out.outputs[0].delta_token_ids
                    if out.finished:
                        assert tokens[out.request_id] == out.outputs[0].token_ids
            assert all(len(t) == 12 for t in tokens.values())
            if len(prompts) >= 16:
                assert delta_steps and all(step % 2 == 0 for step in delta_steps), delta_steps
            return list(deltas.values())

        assert deltas_of([[5, 6, 7]]) == [[1] * 12]
        for deltas in deltas_of([[5, 6, 7 + i] for i in range(20)]):
            assert deltas[0] == 1 and max(deltas) == 2 and deltas.count(2) >= 4, deltas
    finally:
        core.shutdown()


def test_auto_stream_interval_policy_and_flag():
    import argparse

    from raylm.cluster.config import EngineConfig, auto_stream_interval, parse_stream_interval
    from raylm.cluster.serve.app import AppConfig

    assert [auto_stream_interval(n, "cpu") for n in (1, 15, 16, 23, 24, 256)] == [1, 1, 2, 2, 4, 4]
    assert auto_stream_interval(256, "cuda:0") == 1
    assert AppConfig().engine_args()["stream_interval"] == "auto"  # raylm serve's default
    assert AppConfig(stream_interval=1).engine_args()["stream_interval"] == 1
    assert parse_stream_interval("auto") == "auto" and parse_stream_interval("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="auto"):
        parse_stream_interval("fast")
    for bad in (0, "fast", True, 1.5):
        with pytest.raises(ValueError, match="stream_interval"):
            EngineConfig.from_kwargs("m", device="cpu", stream_interval=bad)
