"""Adaptive speculation: full k while a step's cost barely grows with its tokens (batch 1,
memory bound), k = 0 once every verified token costs as much as a decoded one (large batch,
compute bound); in between, k follows acceptance."""
import random

from raylm.cluster.spec_policy import AdaptiveK, expected_tokens


def _policy(t0: float, t1: float, noise: float = 0.0) -> AdaptiveK:
    policy = AdaptiveK(k_max=4)
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 300)
        policy.observe_step(n, (t0 + t1 * n) * (1 + noise * rng.uniform(-1, 1)))
    return policy


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12


def test_memory_bound_batch_1_speculates_fully():
    policy = _policy(t0=10e-3, t1=2e-6, noise=0.05)
    assert policy.choose(1, [0.6], [100]) == 4


def test_compute_bound_large_batch_does_not_speculate():
    policy = _policy(t0=1e-4, t1=1e-3, noise=0.05)
    assert policy.choose(64, [0.7] * 64, [100] * 64) == 0


def test_k_follows_acceptance_and_caps():
    policy = _policy(t0=5e-3, t1=1e-4)
    low = policy.choose(32, [0.05] * 32, [100] * 32)
    high = policy.choose(32, [0.95] * 32, [100] * 32)
    assert low < high
    assert AdaptiveK(k_max=4).choose(1, [0.5], [100]) == 4  # no measurements yet: optimistic


def test_an_expensive_draft_lowers_k():
    cheap, costly = _policy(t0=10e-3, t1=2e-6), _policy(t0=10e-3, t1=2e-6)
    for s in (1, 4, 16):
        cheap.observe_draft(s, 4, 4 * 0.5e-3)
        costly.observe_draft(s, 4, 4 * 8e-3)  # each draft forward costs 80 % of a target step
    assert costly.choose(1, [0.8], [100]) < cheap.choose(1, [0.8], [100]) == 4


def test_a_steady_batch_holds_its_decision():
    policy = _policy(t0=1e-4, t1=1e-3)
    assert policy.choose(64, [0.7] * 64, [100] * 64) == 0
    for _ in range(500):  # a long steady phase: every step feeds 64 tokens
        policy.observe_step(64, 1e-4 + 64e-3)
    assert policy.choose(64, [0.7] * 64, [100] * 64) == 0  # no costly re-exploration at full k


def test_a_draft_turned_off_early_is_measured_again():
    """A request whose first drafts were rejected must not lose speculation for good: after a
    run of k = 0 steps one step speculates again (then acceptance and the fit are fresh)."""
    policy = _policy(t0=10e-3, t1=2e-6)
    ks = [policy.choose(1, [0.0], [100]) for _ in range(100)]
    assert ks[0] == 0 and 2 <= ks.count(4) <= 4 and set(ks) == {0, 4}
    assert policy.choose(1, [0.6], [100]) == 4  # better acceptance seen: back to full k


def test_exploring_a_compute_bound_batch_stays_within_its_budget():
    policy = _policy(t0=1e-4, t1=1e-3)
    ks = [policy.choose(64, [0.7] * 64, [100] * 64) for _ in range(1000)]
    # one k_max step costs 5x a plain one here: at most one per ~200 steps (2 % of the time)
    assert 1 <= sum(k > 0 for k in ks) <= 6
