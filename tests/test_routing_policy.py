"""The routing decision as pure Python: fake replicas, their held prefixes and loads."""
from __future__ import annotations

import random

import pytest

from raylm.cluster.serve.prefix_hash import (CHUNK_CHARS, PrefixIndex, index_capacity,
                                             request_prefix_digests)
from raylm.cluster.serve.routing_policy import ReplicaLoad, RouterConfig, choose, prefix_match

SYSTEM = "You are a terse assistant for the ACME support desk. " * 40  # ~2,100 characters


def _replicas(*loads: float, kv: float = 0.1) -> list[ReplicaLoad]:
    return [ReplicaLoad(f"r{i}", load, kv) for i, load in enumerate(loads)]


def test_shared_prefix_gives_shared_leading_digests():
    a = request_prefix_digests({"prompt": SYSTEM + "Where is my order?"})
    b = request_prefix_digests({"prompt": SYSTEM + "Cancel my subscription please."})
    other = request_prefix_digests({"prompt": "Translate to French: " + SYSTEM})
    assert len(a) == len(SYSTEM + "Where is my order?") // CHUNK_CHARS
    assert prefix_match(b, set(a)) == len(SYSTEM) // CHUNK_CHARS
    assert prefix_match(other, set(a)) == 0
    # a later chat turn extends the earlier one: the whole first turn matches
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    d1 = request_prefix_digests({"messages": turn1})
    assert d1 and prefix_match(request_prefix_digests({"messages": turn2}), set(d1)) == len(d1)
    # a cache salt keeps tenants apart, as it does in the KV cache
    assert prefix_match(request_prefix_digests({"prompt": SYSTEM, "cache_salt": "x"}), set(a)) == 0


def test_longest_prefix_wins():
    digests = request_prefix_digests({"prompt": SYSTEM + "question"})
    held = {"r0": set(digests[:3]), "r1": set(digests[:10]), "r2": set()}
    d = choose(digests, _replicas(2, 3, 0), held, RouterConfig(), random.Random(0))
    assert d.reason == "prefix" and d.ranks[0] == ["r1"] and d.match_chunks == 10
    assert "r1" not in d.ranks[1]  # the fallback rank holds the other replicas


def test_equal_matches_go_to_the_less_loaded_holder():
    digests = request_prefix_digests({"prompt": SYSTEM})
    held = {"r0": set(digests), "r1": set(digests)}
    d = choose(digests, _replicas(5, 1), held, RouterConfig(), random.Random(0))
    assert d.ranks[0] == ["r1"]


def test_overloaded_prefix_replica_is_skipped():
    digests = request_prefix_digests({"prompt": SYSTEM})
    held = {"r0": set(digests)}
    cfg = RouterConfig(imbalance_threshold=4)
    assert choose(digests, _replicas(4, 0), held, cfg, random.Random(0)).ranks[0] == ["r0"]
    d = choose(digests, _replicas(5, 0), held, cfg, random.Random(0))
    assert d.reason == "prefix-overloaded" and d.ranks == [["r1", "r0"]]
    # a full KV cache there counts as overloaded too, if another replica has room
    kv = [ReplicaLoad("r0", 0, 0.97), ReplicaLoad("r1", 0, 0.2)]
    assert choose(digests, kv, held, cfg, random.Random(0)).reason == "prefix-overloaded"


def test_no_prefix_is_power_of_two_on_load():
    replicas = _replicas(9, 1, 7, 3)
    seen = set()
    for seed in range(50):
        d = choose([], replicas, {}, RouterConfig(), random.Random(seed))
        assert d.reason == "no-prefix" and len(d.ranks) == 1 and len(d.ranks[0]) == 2
        first, second = d.ranks[0]
        loads = {r.replica_id: r.load for r in replicas}
        assert loads[first] <= loads[second]
        seen.add(first)
    assert "r0" not in seen  # the most loaded replica is never preferred by two choices
    assert choose([], [], {}, RouterConfig(), random.Random(0)).ranks == []


def test_prefix_index_is_bounded_lru():
    index = PrefixIndex(3)
    index.add([1, 2, 3])
    index.add([1, 4])  # 1 is fresh again; 2 is the oldest and goes
    assert index.snapshot() == [3, 1, 4]
    assert index_capacity(1000, 16, 10**9) == 1000 * 16 * 4 // CHUNK_CHARS
    assert index_capacity(10**9, 16, 500) == 500


@pytest.mark.parametrize("field,value", [("imbalance_threshold", -1), ("kv_overload", 0.0),
                                         ("min_match_chunks", 0)])
def test_router_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        RouterConfig(**{field: value})
