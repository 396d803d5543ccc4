"""The autoscaling decision as pure Python: LLM signals in, replica count and reason out."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from raylm.cluster.serve.autoscaling import (REASON_KEY, AutoscalingThresholds,
                                             LLMAutoscalingPolicy, Signals, decide, signals_from)

T = AutoscalingThresholds(target_ongoing_requests=8, target_waiting_requests=2,
                          kv_usage_upscale=0.9, ttft_p90_target_s=1.0)


@pytest.mark.parametrize("signals,reason", [
    (Signals(1, ongoing=4, waiting=3), "waiting"),
    (Signals(2, ongoing=4, mean_kv_usage=0.95), "KV usage"),
    (Signals(1, ongoing=2, max_ttft_p90_s=1.5), "TTFT p90"),
])
def test_each_llm_signal_adds_one_replica(signals, reason):
    desired, why = decide(signals, T)
    assert desired == signals.num_replicas + 1 and reason in why


def test_ongoing_requests_alone_scale_to_their_target():
    assert decide(Signals(1, ongoing=30), T) == (4, "scale up: ongoing 30.0 > 8 x 1")


def test_busy_but_under_targets_holds():
    assert decide(Signals(2, ongoing=10, waiting=1, mean_kv_usage=0.5), T) == (2, "hold")
    # not idle enough to drop a replica: 6 ongoing would not fit one replica at half target
    assert decide(Signals(2, ongoing=6), T)[0] == 2


def test_scale_down_only_when_idle():
    assert decide(Signals(3, ongoing=0), T)[0] == 0  # Serve clamps this to min_replicas
    assert decide(Signals(3, ongoing=3), T)[0] == 1
    assert decide(Signals(3, ongoing=0, waiting=1), T)[0] == 3
    assert decide(Signals(3, ongoing=0, mean_kv_usage=0.6), T)[0] == 3
    assert decide(Signals(1, ongoing=0), T) == (1, "hold")
    assert decide(Signals(0, ongoing=1), T)[0] == 1  # cold start


def test_ttft_target_zero_ignores_ttft():
    t = AutoscalingThresholds(ttft_p90_target_s=0)
    assert decide(Signals(1, ongoing=1, max_ttft_p90_s=60), t) == (1, "hold")


def test_policy_reads_serve_context_and_keeps_the_reason():
    policy = LLMAutoscalingPolicy(target_ongoing_requests=8, target_waiting_requests=2)
    ctx = SimpleNamespace(current_num_replicas=2, total_num_requests=6, deployment_name="LLMServer",
                          policy_state={}, aggregated_metrics={
                              "num_waiting": {"a": 4.0, "b": 3.0}, "kv_usage": {"a": 0.2, "b": 0.4},
                              "ttft_p90_s": {"a": 0.1, "b": 0.3}})
    desired, state = policy(ctx)
    assert desired == 3 and "waiting 3.5/replica" in state[REASON_KEY]
    s = signals_from(2, 6, ctx.aggregated_metrics)
    assert (s.waiting, s.mean_kv_usage, s.max_ttft_p90_s) == (7.0, pytest.approx(0.3), 0.3)


@pytest.mark.parametrize("field,value", [("target_waiting_requests", 0), ("kv_usage_upscale", 1.5),
                                         ("ttft_p90_target_s", -1), ("idle_fraction", 1.0)])
def test_thresholds_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        AutoscalingThresholds(**{field: value})


def test_recent_ttft_p90_ages_out():
    from raylm.cluster.serve.ttft_window import RecentLatencies

    window = RecentLatencies(window_s=10)
    assert window.percentile(0.9, now=0) == 0.0
    for i in range(10):
        window.add(0.1 * (i + 1), now=float(i))
    assert window.percentile(0.9, now=9) == pytest.approx(0.9)
    assert window.percentile(0.9, now=18.5) == pytest.approx(1.0)  # only the last sample is left


def test_policy_logs_a_decision_once_not_every_tick():
    import logging

    from raylm.cluster.serve import autoscaling

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    # Serve's logger does not propagate to the root once Serve has been started in this process
    # (caplog would see nothing): listen on it directly
    handler, log = Collect(), autoscaling.logger
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        policy = LLMAutoscalingPolicy(target_ongoing_requests=8)
        busy = SimpleNamespace(current_num_replicas=1, total_num_requests=1,
                               deployment_name="LLMServer", policy_state={},
                               aggregated_metrics={"num_waiting": {"a": 5.0}})
        for _ in range(5):
            policy(busy)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    lines = [line for line in handler.lines if "raylm autoscaling" in line]
    assert len(lines) == 1 and "policy asks 2" in lines[0] and "waiting 5.0/replica" in lines[0]
