"""Two LLMServer replicas behind PrefixAwareRouter (half a core each): requests sharing a long
prefix land on the replica that holds it, so only its prefix-cache hit counter rises, until that
replica is overloaded relative to the other."""
from __future__ import annotations

import pytest

pytest.importorskip("ray")
requests = pytest.importorskip("requests")

from tests.serve_builders import serve_session  # noqa: E402

SYSTEM = "You are a terse assistant for the ACME support desk. " * 20  # ~440 tokens
APP_ARGS = {"num_cpus_per_rank": 0.5, "kv_cache_memory": 16 << 20, "routing_stats_period_s": 0.5,
            "router_imbalance_threshold": 2}


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_session(str(tiny_model("llama")), min_replicas=2, max_replicas=2,
                       **APP_ARGS) as s:
        yield s


def _per_replica_stats(llm, num_replicas: int = 2) -> dict[str, dict]:
    """get_stats from every replica (a handle call lands on any one: ask until all answered)."""
    seen: dict[str, dict] = {}
    for _ in range(100):
        stats = llm.get_stats.remote().result()
        seen[stats["replica_id"]] = stats
        if len(seen) == num_replicas:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered")


def _complete(server, prompt: str, max_tokens: int = 4) -> dict:
    r = requests.post(server["http"] + "/v1/completions", timeout=120, json={
        "model": server["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_shared_prefix_requests_stick_to_the_replica_holding_it(server):
    before = _per_replica_stats(server["llm"])
    num_requests = 6
    cached = [_complete(server, SYSTEM + f"Question {i}: where is order {i}?")["usage"]
              for i in range(num_requests)]
    after = _per_replica_stats(server["llm"])
    gained = {rid: after[rid]["prefix_cache_hit_tokens"] - before[rid]["prefix_cache_hit_tokens"]
              for rid in after}
    holder, other = sorted(gained, key=gained.get, reverse=True)
    # every request after the first reused the ~430 cached prompt tokens on the same replica
    assert gained[holder] >= (num_requests - 1) * 400, (gained, cached)
    assert gained[other] == 0, gained
    served = {rid: after[rid]["num_prompt_tokens"] - before[rid]["num_prompt_tokens"] for rid in after}
    assert served[other] == 0, served


def test_an_overloaded_prefix_holder_sheds_requests_to_the_other_replica(server):
    from concurrent.futures import ThreadPoolExecutor

    prefix = "Summarize the quarterly report of the ACME rocket skates division. " * 16
    _complete(server, prefix + "warm")  # one replica now holds this prefix
    before = _per_replica_stats(server["llm"])
    with ThreadPoolExecutor(12) as pool:  # 12 at once: far more than 2 above the other replica
        list(pool.map(lambda i: _complete(server, prefix + f"part {i}", max_tokens=64), range(12)))
    after = _per_replica_stats(server["llm"])
    served = {rid: after[rid]["num_prompt_tokens"] - before[rid]["num_prompt_tokens"] for rid in after}
    assert all(n > 0 for n in served.values()), served


def test_a_replica_removed_mid_load_finishes_its_streams(server):
    """Last in this module: it takes the deployment down to one replica."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from raylm.cluster.serve.app import build_app
    from tests.serve_builders import APP, wait_until

    long_tokens = 1500
    with ThreadPoolExecutor(6) as pool:  # spread over both replicas by power of two
        futures = [pool.submit(_complete, server, f"stream {i} " * 8, long_tokens)
                   for i in range(6)]
        serve.run(build_app({"model": server["model"], "dtype": "float32", "device": "cpu",
                             "max_num_seqs": 64, "min_replicas": 1, "max_replicas": 1,
                             **APP_ARGS}), name=APP, route_prefix="/")
        answers = [f.result(timeout=300) for f in futures]
    assert all(a["usage"]["completion_tokens"] == long_tokens for a in answers)
    status = serve.status().applications[APP].deployments["LLMServer"]
    assert wait_until(lambda: sum(serve.status().applications[APP].deployments["LLMServer"]
                                  .replica_states.values()) == 1, timeout_s=60), status
