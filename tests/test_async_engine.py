"""AsyncEngine: streamed deltas add up, aborts free blocks, errors reach the caller; with the
engine core on a step thread and in a process of its own (engine_process=True)."""
import asyncio
import os
import signal
import time

import pytest

from raylm.cluster import LLM, AsyncEngine, SamplingParams
from raylm.cluster.errors import EngineDeadError

MODES = ["thread", "process"]


@pytest.fixture(scope="module", params=MODES)
def engine(request, tiny_model):
    eng = AsyncEngine(str(tiny_model("llama")), dtype="float32", max_queued_requests=64,
                      engine_process=request.param == "process")
    yield eng
    eng.shutdown()


def _idle(engine) -> bool:
    s = engine.get_stats()
    return s["num_running"] == s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]


async def _wait_idle(engine, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        if _idle(engine):
            return True
        await asyncio.sleep(0.02)
    return False


def test_deltas_concatenate_to_the_final_output(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        text, tokens, last = "", [], None
        async for out in engine.generate("Once upon a time", params):
            text += out.outputs[0].delta_text
            tokens += out.outputs[0].delta_token_ids
            last = out
        assert last.finished and last.outputs[0].finish_reason == "length"
        assert tokens == last.outputs[0].token_ids and len(tokens) == 20
        assert text == last.outputs[0].text
        assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    asyncio.run(main())


def test_a_slow_reader_gets_merged_deltas_that_still_add_up(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
        text, tokens, logprobs, items, last = "", [], [], 0, None
        async for out in engine.generate("Once upon a time", params):
            await asyncio.sleep(0.05)  # several steps pass between two reads
            items += 1
            text += out.outputs[0].delta_text
            tokens += out.outputs[0].delta_token_ids
            logprobs += out.outputs[0].delta_logprobs
            last = out
        assert items < 40  # deltas were merged, not queued one message per step
        assert tokens == last.outputs[0].token_ids and len(tokens) == 40
        assert text == last.outputs[0].text and logprobs == last.outputs[0].logprobs
    asyncio.run(main())


def test_the_event_loop_tokenizes_with_its_own_tokenizer_and_long_prompts_off_the_loop(engine):
    from raylm.cluster.async_engine import OFFLOAD_TOKENIZE_CHARS

    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(engine.core.executor.model_path if engine.core
                                              else engine.config.model.model)
    if engine.core is not None:
        assert engine.tokenizer is not engine.core.tokenizer  # the step thread detokenizes with its
    long = " ".join(["the quick brown fox"] * (OFFLOAD_TOKENIZE_CHARS // 10))
    assert len(long) > OFFLOAD_TOKENIZE_CHARS

    async def main():
        ids = await engine.encode(long)
        assert ids == reference.encode(long)
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        async for out in engine.generate("Once upon a time", params):
            last = out
        assert last.prompt == "Once upon a time"
        assert last.prompt_token_ids == reference.encode("Once upon a time")
    asyncio.run(main())


def test_concurrent_streams_all_finish(engine):
    async def one(i):
        n = 0
        async for out in engine.generate([5 + i] * (3 + i), SamplingParams(
                temperature=0, max_tokens=8, ignore_eos=True)):
            n += len(out.outputs[0].delta_token_ids)
        return n

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))
    assert asyncio.run(main()) == [8] * 16
    engine.call_engine("check_integrity")


def test_leaving_the_stream_early_aborts_and_frees_blocks(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        n = 0
        async for _ in engine.generate([7] * 40, params):
            n += 1
            if n == 3:
                break
        assert await _wait_idle(engine)
    asyncio.run(main())
    engine.call_engine("check_integrity")


def test_cancelled_task_aborts(engine):
    started = None

    async def consume():
        async for _ in engine.generate([9] * 10, SamplingParams(temperature=0, max_tokens=3000,
                                                                 ignore_eos=True)):
            started.set()

    async def main():
        nonlocal started
        started = asyncio.Event()
        task = asyncio.create_task(consume())
        await started.wait()  # cancel mid-stream, whatever the machine's speed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _wait_idle(engine)
    asyncio.run(main())


def test_bad_params_raise_value_error_before_streaming(engine):
    async def main():
        with pytest.raises(ValueError, match="prompt"):
            async for _ in engine.generate("", SamplingParams()):
                pass
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in engine.generate([5] * (engine.max_model_len + 10), SamplingParams()):
                pass
    asyncio.run(main())
    engine.check_health()


@pytest.mark.parametrize("mode", MODES)
def test_queue_limit_rejects_with_queue_full_and_keeps_serving(tiny_model, mode):
    from raylm.cluster.errors import QueueFullError

    eng = AsyncEngine(str(tiny_model("llama")), dtype="float32", max_queued_requests=1,
                      max_num_seqs=1, engine_process=mode == "process")
    try:
        async def one(i):
            try:
                n = 0
                async for out in eng.generate([5 + i] * 4, SamplingParams(
                        temperature=0, max_tokens=4, ignore_eos=True)):
                    n += len(out.outputs[0].delta_token_ids)
                return n
            except QueueFullError:
                return "rejected"

        async def main():
            return await asyncio.gather(*(one(i) for i in range(20)))
        results = asyncio.run(main())
        # Every request either completed in full or was told explicitly: nothing lost silently.
        assert set(results) <= {4, "rejected"}
        assert "rejected" in results and 4 in results
        eng.check_health()
        assert asyncio.run(main()).count(4) >= 1
        eng.call_engine("check_integrity")
    finally:
        eng.shutdown()


def test_the_model_is_built_and_stepped_on_the_step_thread_only(tiny_model, monkeypatch):
    """Every OpenMP region must start on one thread: libgomp stops spinning between regions once
    two threads own pools on a small box, and each region then pays a wake-up (a batch-1 step
    was 50 % slower with the model loaded on the caller's thread)."""
    import threading

    from raylm.cluster import executor

    seen = []
    init, execute = executor.InProcessExecutor.__init__, executor.InProcessExecutor.execute

    def recording_init(self, *args, **kwargs):
        seen.append(("build", threading.current_thread().name))
        init(self, *args, **kwargs)

    def recording_execute(self, *args, **kwargs):
        seen.append(("step", threading.current_thread().name))
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(executor.InProcessExecutor, "__init__", recording_init)
    monkeypatch.setattr(executor.InProcessExecutor, "execute", recording_execute)
    eng = AsyncEngine(str(tiny_model("llama")), dtype="float32")
    try:
        async def main():
            params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            return [out async for out in eng.generate("Once upon a time", params)]

        assert asyncio.run(main())[-1].finished
    finally:
        eng.shutdown()
    assert seen[0][0] == "build" and any(kind == "step" for kind, _ in seen)
    assert {name for _, name in seen} == {"raylm-step-loop"}, seen


def test_a_steps_outputs_reach_the_loop_when_the_next_steps_compute_starts(tiny_model):
    """On the step thread, a step's outputs are handed to the event loop right before the next
    step's model compute (which runs without the GIL), not while that step's Python still
    runs: the loop's serving work then overlaps the compute. The last step's outputs go out
    when the engine has nothing left to run, so the stream still ends."""
    eng = AsyncEngine(str(tiny_model("llama")), dtype="float32")
    events = []
    runner = eng.core.executor.worker.runner
    release, deliver = runner.compute_hook, eng._deliver_step
    assert release is not None

    def compute_starts():
        events.append("compute")
        release()

    def delivering(outputs):
        events.append("deliver")
        deliver(outputs)

    runner.compute_hook, eng._deliver_step = compute_starts, delivering
    try:
        async def main():
            params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
            return [out async for out in eng.generate("Once upon a time", params)]

        outs = asyncio.run(main())
    finally:
        eng.shutdown()
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
    # 5 steps (the prefill and 4 decodes): each hands over the step before it as its compute
    # starts; the last step's outputs follow once nothing is left to run
    assert events == ["compute"] + ["compute", "deliver"] * 4 + ["deliver"], events


def test_a_failed_build_raises_in_the_caller_and_leaves_no_step_thread(tmp_path):
    import threading

    def step_threads() -> int:
        return sum(t.name == "raylm-step-loop" for t in threading.enumerate())

    before = step_threads()  # other tests' engines
    with pytest.raises(ValueError, match="no-such-model"):
        AsyncEngine(str(tmp_path / "no-such-model"), dtype="float32")
    assert step_threads() == before


def test_both_modes_generate_the_offline_engines_greedy_tokens(engine, tiny_model):
    prompts = [[5 + i] * (3 + 2 * i) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(str(tiny_model("llama")), dtype="float32") as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    async def one(prompt):
        async for out in engine.generate(prompt, params):
            last = out
        return last.outputs[0].token_ids

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))
    assert asyncio.run(main()) == expected


def test_refusals_name_the_field_and_counts_follow_the_work(engine):
    """Validation runs where the engine is (the engine process too): its ValueError names the
    field; the counters the servers read (get_stats: in the process mode the last snapshot,
    without a round trip) follow the finished work."""
    async def main():
        before = engine.get_stats()["num_generation_tokens"]
        with pytest.raises(ValueError, match="prompt_token_ids"):
            async for _ in engine.generate([10 ** 9], SamplingParams()):
                pass
        async for _ in engine.generate([5, 6], SamplingParams(temperature=0, max_tokens=5,
                                                               ignore_eos=True)):
            pass
        assert await _wait_idle(engine)
        assert engine.get_stats()["num_generation_tokens"] == before + 5
    asyncio.run(main())
    assert engine.call_engine("get_stats")["num_free_blocks"] == engine.get_stats()["num_total_blocks"]


def test_a_killed_engine_process_ends_every_stream_with_engine_dead(tiny_model):
    eng = AsyncEngine(str(tiny_model("llama")), dtype="float32", engine_process=True)
    pid = eng.engine_pid
    try:
        async def main():
            params = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
            n = 0
            with pytest.raises(EngineDeadError):
                async for _ in eng.generate([5, 6, 7], params):
                    n += 1
                    if n == 2:
                        os.kill(pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                async for _ in eng.generate([5, 6, 7], params):
                    pass
        asyncio.run(asyncio.wait_for(main(), timeout=60))
        with pytest.raises(EngineDeadError):
            eng.check_health()
    finally:
        eng.shutdown()


def test_shutdown_stops_the_engine_process(tiny_model):
    eng = AsyncEngine(str(tiny_model("llama")), dtype="float32", engine_process=True)
    pid = eng.engine_pid
    assert os.path.exists(f"/proc/{pid}")
    eng.shutdown()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
