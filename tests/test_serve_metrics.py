"""LLMServer's metrics: the event loop only queues latencies and gauges (a Ray metric record
lets go of the GIL); a thread of their own records them, one observation per generated token,
none lost, none twice."""
from __future__ import annotations

import time

from raylm.cluster.serve.metrics import ServerMetrics


class _Recorder:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float, tags=None) -> None:
        self.values.append(value)

    set = inc = observe


def _metrics() -> ServerMetrics:
    metrics = ServerMetrics("m")
    metrics.close()  # the test flushes by hand
    metrics.ttft, metrics.itl, metrics.e2e = _Recorder(), _Recorder(), _Recorder()
    metrics.requests, metrics.running = _Recorder(), _Recorder()
    return metrics


def test_every_token_after_the_first_gets_one_gap_when_the_queue_is_flushed():
    metrics = _metrics()
    timer = metrics.timer()
    timer.on_tokens(1)  # first token: TTFT, no gap
    time.sleep(0.01)
    timer.on_tokens(1)
    time.sleep(0.02)
    timer.on_tokens(4)  # a speculative step's 4 tokens share the gap since the last delta
    timer.on_tokens(0)  # an empty delta is no token
    timer.on_finish("length")
    metrics.record_stats({"num_running": 3})
    assert metrics.itl.values == [] and metrics.ttft.values == []  # queued, not yet recorded
    metrics.flush()
    assert len(metrics.ttft.values) == 1 and len(metrics.e2e.values) == 1
    assert metrics.requests.values == [1] and metrics.running.values == [3]
    assert len(metrics.itl.values) == 5
    assert metrics.itl.values[0] >= 0.01
    assert len(set(metrics.itl.values[1:])) == 1 and metrics.itl.values[1] >= 0.02 / 4
    metrics.flush()  # nothing recorded twice
    assert len(metrics.itl.values) == 5


def test_the_flusher_thread_records_what_the_loop_queued():
    metrics = ServerMetrics("m")
    try:
        metrics.itl = _Recorder()
        metrics.later(metrics.itl.observe, 0.5, times=3)
        deadline = time.time() + 10 * ServerMetrics.FLUSH_INTERVAL_S
        while len(metrics.itl.values) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert metrics.itl.values == [0.5, 0.5, 0.5]
    finally:
        metrics.close()


def test_a_flusher_that_falls_behind_cannot_grow_the_queue_without_bound():
    metrics = _metrics()
    timer = metrics.timer()
    timer.on_tokens(1)
    for _ in range(ServerMetrics.MAX_PENDING + 10):
        timer.on_tokens(1)
    assert 0 < len(metrics._pending) < ServerMetrics.MAX_PENDING  # recorded inline at the cap
    metrics.flush()
    assert len(metrics.itl.values) == ServerMetrics.MAX_PENDING + 10  # and none lost
