"""A served replica with a draft model: the draft is its own Ray actor in the replica's placement
group; streams are correct with speculation; when the draft actor dies the replica serves on
without speculation, with the same greedy output."""
from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402

from tests.serve_builders import free_port  # noqa: E402
from raylm.cluster.serve.app import build_app  # noqa: E402

pytestmark = pytest.mark.slow
APP = "raylm-spec"
PROMPT = [5, 17, 99, 300, 41, 7, 8, 9]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from raylm.cluster import LLM, SamplingParams
    from raylm.workers.make_pair import make_spec_pair

    target, draft = (str(p) for p in make_spec_pair(tmp_path_factory.mktemp("pair"),
                                                     extra_layers=4, residual_scale=0.05))
    expected = LLM(target, dtype="float32").generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    http_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app({"model": target, "dtype": "float32", "device": "cpu",
                             "kv_cache_memory": 64 << 20, "speculative_config": {
                                 "model": draft, "num_speculative_tokens": 4,
                                 "adaptive": False}}),
                  name=APP, route_prefix="/")
        yield {"model": target, "expected": expected,
               "client": openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1",
                                       api_key="none", max_retries=0, timeout=60),
               "handle": serve.get_deployment_handle("LLMServer", app_name=APP)}
    finally:
        serve.shutdown()
        ray.shutdown()


def _stream_text(server) -> str:
    stream = server["client"].completions.create(
        model=server["model"], prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def _draft_actors() -> list[dict]:
    from raylm.cluster.ray_executor import WORKER_NAMESPACE

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == WORKER_NAMESPACE and a["name"].startswith("raylm-draft-")]


def test_the_draft_is_an_actor_and_streams_are_correct(server):
    assert _stream_text(server) == server["expected"]
    (actor,) = _draft_actors()
    stats = server["handle"].get_stats.remote().result()
    assert stats["spec_enabled"] == 1 and stats["spec_num_accepted_tokens"] > 0


def test_a_dead_draft_turns_speculation_off_not_the_replica(server):
    (actor,) = _draft_actors()
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
    time.sleep(1.0)
    assert _stream_text(server) == server["expected"]  # the step that finds it dead, or after
    assert _stream_text(server) == server["expected"]
    stats = server["handle"].get_stats.remote().result()
    assert stats["spec_enabled"] == 0
    assert server["handle"].check_health.remote().result() is None  # still healthy
