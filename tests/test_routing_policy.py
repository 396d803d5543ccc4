"""The routing decision as pure Python: fake replicas, their held prefixes and loads."""
from __future__ import annotations

import random

import pytest

from raylm.cluster.serve.prefix_hash import (CHUNK_CHARS, PrefixIndex, index_capacity,
                                             request_prefix_digests)
from raylm.cluster.serve.routing_policy import (ReplicaLoad, RouterConfig, InFlight, choose,
                                                prefix_match)

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


def test_a_burst_against_stale_reports_spills_once_the_holder_is_past_the_threshold():
    """12 requests sharing a prefix are chosen before any new report arrives (and before Serve's
    queue-length cache hears of them): counting each choice as in flight makes the holder look
    loaded after `imbalance_threshold` of them, so the rest spill to the other replica."""
    digests = request_prefix_digests({"prompt": SYSTEM})
    held = {"r0": set(digests)}
    cfg, rng, inflight = RouterConfig(imbalance_threshold=2), random.Random(0), InFlight()
    chosen = []
    for i in range(12):
        loads = [ReplicaLoad(r, inflight.count(r)) for r in ("r0", "r1")]  # reports: idle
        first = choose(digests, loads, held, cfg, rng).ranks[0][0]
        inflight.add(f"q{i}", first)
        chosen.append(first)
    assert chosen[:3] == ["r0"] * 3 and chosen.count("r1") >= 4, chosen
    assert inflight.count("r0") == chosen.count("r0") and len(inflight) == 12


def test_requests_one_after_another_stay_on_the_holder():
    """Completed requests are uncounted: a sequential client never looks like a burst."""
    digests = request_prefix_digests({"prompt": SYSTEM})
    cfg, rng, inflight = RouterConfig(imbalance_threshold=2), random.Random(0), InFlight()
    for i in range(20):
        loads = [ReplicaLoad(r, inflight.count(r)) for r in ("r0", "r1")]
        assert choose(digests, loads, {"r0": set(digests)}, cfg, rng).ranks[0] == ["r0"]
        inflight.add(f"q{i}", "r0")
        inflight.done(f"q{i}")
    assert len(inflight) == 0 and inflight.count("r0") == 0


def test_in_flight_moves_with_the_request_and_forgets_dead_replicas():
    inflight = InFlight()
    inflight.add("a", "r0")
    inflight.add("b", "r0")
    inflight.add("a", "r1")  # r0 rejected it, Serve sent it to r1
    assert (inflight.count("r0"), inflight.count("r1")) == (1, 1)
    inflight.done("a")
    inflight.done("a")  # a second completion (a rejected attempt's callback) is harmless
    assert (inflight.count("r0"), inflight.count("r1")) == (1, 0)
    inflight.forget_replica("r0")
    assert inflight.count("r0") == 0 and len(inflight) == 0


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
