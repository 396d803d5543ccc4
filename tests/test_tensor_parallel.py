"""Tensor parallelism across Ray worker actors (gloo on CPU): tp=2 equals Hugging Face and tp=1
token for token under every scheduling regime and decoding mode; a dead rank ends requests with
an explicit error; shutdown leaves no actor or placement group behind."""
import time

import pytest

ray = pytest.importorskip("ray")

from hf_reference import hf_greedy, random_prompts  # noqa: E402
from raylm.cluster import LLM, SamplingParams  # noqa: E402
from raylm.cluster.errors import EngineDeadError  # noqa: E402

pytestmark = pytest.mark.slow
MAX_TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def odd_vocab_model(tmp_path_factory):
    from raylm.workers.make_model import make_model, make_tokenizer

    # A vocabulary that does not divide by tp: the last rank's shard is padded.
    return make_model(tmp_path_factory.mktemp("odd-vocab"), arch="llama",
                      vocab_size=len(make_tokenizer()) + 1)


def _tp_llm(path, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", tensor_parallel_size=2, **kwargs)


def _check_greedy(llm: LLM, path, prompts, max_tokens=MAX_TOKENS):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, max_tokens), (
            f"prompt of {len(prompt)} tokens")
    llm.check_integrity()
    stats = llm.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    return stats


def _rank_actors():
    from raylm.cluster.ray_executor import WORKER_NAMESPACE

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == WORKER_NAMESPACE]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "odd-vocab"])
def test_tp2_greedy_matches_hf(tiny_model, odd_vocab_model, arch):
    # llama: GQA (4 q / 2 kv heads); mistral: MQA, its one KV head replicated on both ranks;
    # qwen2: qkv bias + tied embeddings; qwen3: q/k norm; odd-vocab: uneven vocab shards.
    path = odd_vocab_model if arch == "odd-vocab" else tiny_model(arch)
    with _tp_llm(path, max_num_batched_tokens=32) as llm:  # chunked prefill of long prompts
        info = llm.executor_info
        assert info["tensor_parallel_size"] == 2 and info["collective"] == "gloo"
        assert len({r["pid"] for r in info["ranks"]}) == 2  # two processes, one rank each
        prompts = random_prompts(llm.engine.vocab_size, [1, 17, 70], seed=3)
        _check_greedy(llm, path, prompts)
    assert not _rank_actors()


def test_tp2_prefix_hits_and_preemption_match_hf(tiny_model):
    path = tiny_model("qwen2")
    # 10 blocks of 16 tokens; three ~60-token prompts sharing 2 blocks, each growing to 5
    # blocks, need 11: someone is preempted and recomputed.
    with _tp_llm(path, num_blocks_override=10, max_num_batched_tokens=48) as llm:
        (shared,) = random_prompts(llm.engine.vocab_size, [40], seed=4)
        tails = random_prompts(llm.engine.vocab_size, [20, 21, 22], seed=5)
        _check_greedy(llm, path, [shared + tails[0]], max_tokens=16)  # fills the prefix cache
        stats = _check_greedy(llm, path, [shared + t for t in tails], max_tokens=16)
        assert stats["prefix_cache_hit_tokens"] > 0
        assert stats["num_preemptions"] > 0


def test_tp2_decoding_modes_equal_tp1(tiny_model):
    path = str(tiny_model("llama"))
    prompts = random_prompts(2048, [5, 23], seed=6)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=10, ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, seed=12, max_tokens=6, ignore_eos=True),
        SamplingParams(num_beams=3, n=2, max_tokens=6, ignore_eos=True),
        SamplingParams(penalty_alpha=0.6, top_k=4, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2,
                       ignore_eos=True),
    ]

    def run(llm):
        outs = []
        for p in params:
            outs += llm.generate(prompts, p)
        llm.check_integrity()
        return outs

    expected = run(LLM(path, dtype="float32"))
    with _tp_llm(path) as llm:
        got = run(llm)
    for e, g in zip(expected, got):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in e.outputs]
        for ce, cg in zip(e.outputs, g.outputs):
            assert cg.cumulative_logprob == pytest.approx(ce.cumulative_logprob, abs=1e-3)
            for le, lg in zip(ce.logprobs or [], cg.logprobs or []):
                assert le.keys() == lg.keys()
                assert [lg[k] for k in le] == pytest.approx([le[k] for k in le], abs=1e-3)
        for le, lg in zip(e.prompt_logprobs or [], g.prompt_logprobs or []):
            assert (le is None) == (lg is None)
            if le is not None:
                assert [lg[k] for k in le] == pytest.approx([le[k] for k in le], abs=1e-3)


def test_a_dead_rank_fails_the_step_with_an_explicit_error(tiny_model):
    llm = _tp_llm(tiny_model("llama"))
    try:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
        rank1 = next(a for a in _rank_actors() if a["name"].endswith("rank1"))
        ray.kill(ray.get_actor(rank1["name"], namespace=rank1["namespace"]))
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, ignore_eos=True))
        assert time.monotonic() - start < 15
        with pytest.raises(EngineDeadError):
            llm.engine.check_health()
    finally:
        llm.shutdown()
    assert not _rank_actors()
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_the_control_channel_answers_pings(tiny_model):
    with _tp_llm(tiny_model("llama")) as llm:
        round_trips = sorted(llm.engine.executor.ping(200))
        # A functional bound only (figures come from `raylm bench dispatch`): an empty message
        # reaches both ranks and rank 0's answer comes back, 200 times in a row.
        assert len(round_trips) == 200 and round_trips[100] < 0.05


def test_a_ray_worker_runs_every_model_call_on_one_thread_of_its_own():
    """Ray runs a threaded actor's calls on any free thread; the model's calls (load, pinning,
    steps) must all start their OpenMP regions on one (workers/worker.py says why)."""
    import threading

    from raylm.workers.worker import ModelThread

    own = ModelThread(True, "raylm-rank0")
    names = set()
    for _ in range(3):
        caller = threading.Thread(target=lambda: names.add(own.run(
            lambda: threading.current_thread().name)))
        caller.start()
        caller.join()
    assert names == {"raylm-rank0_0"}
    with pytest.raises(ZeroDivisionError):
        own.run(lambda: 1 / 0)  # errors reach the caller
    inline = ModelThread(False, "unused")
    assert inline.run(lambda: threading.current_thread().name) == threading.current_thread().name
