"""A served tp=2 replica: one placement group holding the replica and two rank actors; answers
equal tp=1 greedy output; a rank killed mid-stream ends the stream with an explicit error, Serve
replaces the replica with a fresh group, and requests succeed again."""
from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402

from tests.serve_builders import free_port  # noqa: E402
from raylm.cluster.serve.app import build_app  # noqa: E402

pytestmark = pytest.mark.slow
APP = "raylm-tp"


def _rank_actors() -> list[dict]:
    from raylm.cluster.ray_executor import WORKER_NAMESPACE

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == WORKER_NAMESPACE]


@pytest.fixture(scope="module")
def server(tiny_model):
    model = str(tiny_model("llama"))
    http_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app({"model": model, "dtype": "float32", "device": "cpu",
                             "tensor_parallel_size": 2, "kv_cache_memory": 64 << 20,
                             # verification rows travel through the ranks' channel too
                             "speculative_config": {"method": "ngram",
                                                    "num_speculative_tokens": 3,
                                                    "adaptive": False}}),
                  name=APP, route_prefix="/")
        yield {"model": model,
               "client": openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1",
                                       api_key="none", max_retries=0, timeout=60)}
    finally:
        serve.shutdown()
        ray.shutdown()


def test_tp2_replica_answers_like_tp1(server):
    from raylm.cluster import LLM, SamplingParams

    prompt = [5, 17, 99, 300, 41] * 4
    out = server["client"].completions.create(model=server["model"], prompt=prompt,
                                              max_tokens=24, temperature=0)
    expected = LLM(server["model"], dtype="float32").generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
    assert out.choices[0].text == expected
    stats = serve.get_deployment_handle("LLMServer", app_name=APP).get_stats.remote().result()
    assert stats["spec_num_draft_tokens"] > 0
    ranks = _rank_actors()
    assert sorted(a["name"][-5:] for a in ranks) == ["rank0", "rank1"]


def test_a_rank_killed_mid_stream_gives_an_error_then_a_new_replica_serves(server):
    client, model = server["client"], server["model"]
    stream = client.completions.create(model=model, prompt="Hello", max_tokens=3000,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].text is not None
    rank1 = next(a for a in _rank_actors() if a["name"].endswith("rank1"))
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(rank1["name"], namespace=rank1["namespace"]))
    with pytest.raises(Exception) as err:  # an error event / broken stream, never a hang
        for _ in stream:
            pass
    assert time.monotonic() - killed_at < 10, "the client waited too long for the error"
    print(f"stream ended with {type(err.value).__name__} "
          f"{time.monotonic() - killed_at:.1f}s after the kill")
    deadline = time.monotonic() + 180
    while True:
        try:
            out = client.completions.create(model=model, prompt="Hello", max_tokens=4,
                                            temperature=0)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    outage = time.monotonic() - killed_at
    print(f"replica replaced: requests succeed again {outage:.1f}s after the rank was killed")
    assert out.usage.completion_tokens == 4
    assert rank1["name"] not in {a["name"] for a in _rank_actors()}  # a fresh group
    assert len(_rank_actors()) == 2
