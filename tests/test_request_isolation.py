"""One request cannot take the engine down (issue 15): what SamplingParams cannot check is
checked against the engine (vocabulary, batch size) when the request is made, and an exception
in one request's own step work ends that request with an error, not the step loop."""
import asyncio

import pytest

from raylm.cluster import AsyncEngine, SamplingParams
from raylm.cluster.errors import RequestFailedError

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = AsyncEngine(str(tiny_model("llama")), dtype="float32", max_num_seqs=32)
    yield eng
    eng.shutdown()


async def _collect(engine, prompt, params=PARAMS):
    last = None
    async for out in engine.generate(prompt, params):
        last = out
    return last


def _idle(engine) -> bool:
    s = engine.get_stats()
    return s["num_running"] == s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]


@pytest.mark.parametrize("kwargs,field", [
    (dict(stop_token_ids=[2**31 - 1], min_tokens=2), "stop_token_ids"),
    (dict(stop_token_ids=[10**6], min_tokens=2), "stop_token_ids"),
    (dict(n=33), "n"),  # above this engine's max_num_seqs
    (dict(num_beams=64), "num_beams"),
    (dict(penalty_alpha=0.5, top_k=100), "top_k"),
])
def test_values_beyond_the_engine_are_rejected_when_the_request_enters(engine, kwargs, field):
    with pytest.raises(ValueError, match=field):
        asyncio.run(_collect(engine, [5, 6, 7], SamplingParams(max_tokens=4, **kwargs)))
    engine.check_health()
    assert asyncio.run(_collect(engine, [5, 6, 7])).outputs[0].finish_reason == "length"


def _sabotage(engine, monkeypatch, where: str):
    """Requests whose prompt starts with token 13 fail in `where` of their step work."""
    core = engine.core
    make = core.make_request

    def boom(*_a, **_k):
        raise KeyError("sabotaged")  # an unexpected error, not a validation one

    def make_request(prompt, params=None, *args, **kwargs):
        request = make(prompt, params, *args, **kwargs)
        if isinstance(prompt, list) and prompt[0] == 13:
            if where == "sample":
                monkeypatch.setattr(request.decoder, "on_sampled", boom)
            elif where == "input":  # building its sampling rows fails
                request.params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                min_tokens=3)
                request.params.stop_token_ids = 7  # not iterable: fails in the input builder
        return request

    monkeypatch.setattr(core, "make_request", make_request)


@pytest.mark.parametrize("where", ["sample", "input"])
def test_a_failing_request_ends_alone_and_the_engine_goes_on(engine, monkeypatch, where):
    _sabotage(engine, monkeypatch, where)

    async def main():
        return await asyncio.gather(_collect(engine, [13, 5, 6]), _collect(engine, [5, 6, 7]),
                                    _collect(engine, [8, 9]), return_exceptions=True)

    bad, good, other = asyncio.run(main())
    assert isinstance(bad, RequestFailedError), bad
    assert "sabotaged" not in str(bad) and "/" not in str(bad)  # no internals to the client
    assert good.outputs[0].finish_reason == "length" and len(good.outputs[0].token_ids) == 12
    assert other.outputs[0].finish_reason == "length"
    engine.check_health()
    assert engine.get_stats()["num_failed"] >= 1
    deadline = 100
    while not _idle(engine) and deadline:
        asyncio.run(asyncio.sleep(0.05))
        deadline -= 1
    assert _idle(engine)
    engine.core.check_integrity()


def test_a_failing_detokenizer_ends_its_request_alone(engine, monkeypatch):
    core = engine.core
    attach = core.stop_checker.attach

    def attach_broken(seq):
        attach(seq)
        if seq.prompt_token_ids[0] == 13:
            def broken(tokens):
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "sabotaged")
            monkeypatch.setattr(seq.detokenizer, "append", broken)

    monkeypatch.setattr(core.stop_checker, "attach", attach_broken)

    async def main():
        return await asyncio.gather(_collect(engine, [13, 5]), _collect(engine, [5, 6, 7]),
                                    return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, RequestFailedError)
    assert len(good.outputs[0].token_ids) == 12
    engine.check_health()
