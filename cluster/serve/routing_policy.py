"""Which replica serves a request: longest cached prefix unless overloaded, else power of two.

Pure Python (no Ray): the Serve router in request_router.py feeds it what replicas reported and
what it routed itself, and tests drive it with fake replicas.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Collection, Mapping, Sequence


@dataclass(frozen=True)
class RouterConfig:
    """`imbalance_threshold`: a replica holding the longest prefix is skipped when its load
    (running + waiting + in flight from this router) exceeds the least loaded candidate's by more
    than this many requests: recomputing a prefix elsewhere is cheaper than queueing behind a
    hot replica (SGLang's router and Ray's prefix router use the same absolute-gap rule).
    `kv_overload`: a prefix replica whose KV usage is at or above this is skipped too, when
    another replica is below it: new blocks there would evict other users' prefixes.
    `min_match_chunks`: shorter shared prefixes (in 128-character chunks) do not count."""

    imbalance_threshold: float = 8.0
    kv_overload: float = 0.95
    min_match_chunks: int = 1

    def __post_init__(self) -> None:
        if self.imbalance_threshold < 0:
            raise ValueError(f"imbalance_threshold must be >= 0, got {self.imbalance_threshold}")
        if not 0.0 < self.kv_overload <= 1.0:
            raise ValueError(f"kv_overload must be in (0, 1], got {self.kv_overload}")
        if not isinstance(self.min_match_chunks, int) or self.min_match_chunks < 1:
            raise ValueError(f"min_match_chunks must be a positive integer, "
                             f"got {self.min_match_chunks!r}")


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: str
    load: float  # running + waiting requests (plus those this router sent since the report)
    kv_usage: float = 0.0


@dataclass(frozen=True)
class Decision:
    ranks: list[list[str]]  # replica ids, most preferred rank first
    reason: str  # "prefix" | "prefix-overloaded" | "no-prefix"
    match_chunks: int = 0


class InFlight:
    """Requests this router chose a replica for and has not seen complete, per replica.

    A replica's report (running + waiting) is up to one report period old, and Serve's
    queue-length cache is bumped only after the routing loop hands a request over, which can be
    after it has chosen for a whole burst: 12 requests arriving together were all ranked against
    the same stale loads and all sent to the prefix holder. Counting each choice at once, and
    uncounting it when the request completes, makes a burst's later requests see the earlier
    ones. Bounded by the requests in flight: the router drops those cancelled before sending."""

    def __init__(self) -> None:
        self._where: dict[str, str] = {}  # request id -> replica id
        self._counts: dict[str, int] = {}  # replica id -> requests in flight there

    def __len__(self) -> int:
        return len(self._where)

    def count(self, replica_id: str) -> int:
        return self._counts.get(replica_id, 0)

    def add(self, request_id: str, replica_id: str) -> None:
        """Chosen (or re-chosen after a rejection, or routed elsewhere in the end)."""
        self.done(request_id)
        self._where[request_id] = replica_id
        self._counts[replica_id] = self._counts.get(replica_id, 0) + 1

    def done(self, request_id: str) -> None:
        replica_id = self._where.pop(request_id, None)
        if replica_id is None:
            return
        left = self._counts[replica_id] - 1
        if left:
            self._counts[replica_id] = left
        else:
            del self._counts[replica_id]

    def forget_replica(self, replica_id: str) -> None:
        for request_id in [r for r, where in self._where.items() if where == replica_id]:
            self.done(request_id)


def prefix_match(digests: Sequence[int], held: Collection[int]) -> int:
    """How many leading digests of the request a replica holds (a chain: stop at the first miss)."""
    num = 0
    for d in digests:
        if d not in held:
            break
        num += 1
    return num


def _key(r: ReplicaLoad) -> tuple[float, float]:
    return (r.load, r.kv_usage)


def power_of_two(replicas: Sequence[ReplicaLoad], rng: random.Random) -> list[str]:
    """Two random replicas, the less loaded first (both are kept: Serve falls back to the
    second when the first rejects)."""
    if len(replicas) <= 2:
        pair = list(replicas)
        rng.shuffle(pair)  # equal loads: no replica is favoured
    else:
        pair = rng.sample(list(replicas), 2)
    return [r.replica_id for r in sorted(pair, key=_key)]


def choose(digests: Sequence[int], replicas: Sequence[ReplicaLoad],
           held: Mapping[str, Collection[int]], config: RouterConfig,
           rng: random.Random) -> Decision:
    """The ranks of replicas to try for a request whose prefix digests are `digests`;
    `held[replica_id]` is what that replica holds (reported, or routed there by us)."""
    if not replicas:
        return Decision([], "no-prefix")
    fallback = power_of_two(replicas, rng)
    matches = {r.replica_id: prefix_match(digests, held.get(r.replica_id, ())) for r in replicas}
    best_match = max(matches.values())
    if best_match < config.min_match_chunks:
        return Decision([fallback], "no-prefix")
    holders = [r for r in replicas if matches[r.replica_id] == best_match]
    best = min(holders, key=_key)
    least_load = min(r.load for r in replicas)
    kv_room_elsewhere = any(r.kv_usage < config.kv_overload for r in replicas if r is not best)
    if (best.load - least_load > config.imbalance_threshold
            or (best.kv_usage >= config.kv_overload and kv_room_elsewhere)):
        return Decision([fallback], "prefix-overloaded", best_match)
    rest = [rid for rid in fallback if rid != best.replica_id]
    return Decision([[best.replica_id]] + ([rest] if rest else []), "prefix", best_match)
