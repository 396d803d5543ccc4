"""Prometheus metrics of an LLMServer replica, exported through `ray.util.metrics` (Ray's
metrics agent serves them to Prometheus on each node's metrics port)."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from ray.util import metrics

logger = logging.getLogger(__name__)

# Latency buckets in seconds: sub-millisecond decode steps up to minute-long requests.
_LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                       0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]

# engine.get_stats() counters that only grow -> the Prometheus counter they feed.
_MONOTONIC_STATS = {
    "num_prompt_tokens": "raylm_prompt_tokens_total",
    "num_generation_tokens": "raylm_generation_tokens_total",
    "num_stream_outputs": "raylm_stream_outputs_total",
    "num_preemptions": "raylm_num_preemptions_total",
    "spec_num_draft_tokens": "raylm_spec_draft_tokens_total",
    "spec_num_accepted_tokens": "raylm_spec_accepted_tokens_total",
}


class ServerMetrics:
    """The gauges are refreshed from `engine.get_stats()` by `record_stats`; the latency
    histograms are observed per request through a `RequestTimer`.

    A Ray metric record lets go of the GIL (it calls into the core worker without it), so on
    the event loop that streams the tokens every record meant waiting to get the GIL back from
    the step thread (up to the 5 ms switch interval): per token, py-spy showed it as the largest
    item of that loop's time at concurrency 32. The loop only queues its latencies (an append);
    a thread of their own records them, every FLUSH_INTERVAL_S."""

    FLUSH_INTERVAL_S = 0.5
    MAX_PENDING = 65536  # recorded at once past this, should the flusher fall behind

    def __init__(self, model_name: str) -> None:
        tags = ("model",)
        self._tags = {"model": model_name}
        # (record function, value, times, tags); deque appends/poplefts are thread-safe
        self._pending: deque[tuple[Callable[..., None], float, int, dict[str, str]]] = deque()
        self._closed = threading.Event()
        self.running = metrics.Gauge("raylm_num_requests_running", "Requests in the running batch.",
                                     tag_keys=tags)
        self.waiting = metrics.Gauge("raylm_num_requests_waiting", "Requests waiting to be scheduled.",
                                     tag_keys=tags)
        self.kv_usage = metrics.Gauge("raylm_kv_cache_usage_ratio",
                                      "Fraction of KV cache blocks in use (0..1).", tag_keys=tags)
        self.prefix_hit_rate = metrics.Gauge("raylm_prefix_cache_hit_rate",
                                             "Prompt tokens served from the prefix cache (0..1).",
                                             tag_keys=tags)
        self.dispatch_us = metrics.Gauge(
            "raylm_executor_dispatch_microseconds",
            "Mean per-step control overhead of the tensor-parallel executor (wall time of a step "
            "minus rank 0's compute); 0 when the model runs in the replica's process.",
            tag_keys=tags)
        self.spec_acceptance = metrics.Gauge(
            "raylm_spec_acceptance_rate", "Accepted / proposed draft tokens (0..1).",
            tag_keys=tags)
        self.spec_k = metrics.Gauge(
            "raylm_spec_current_k", "Draft tokens per sequence the adaptive policy chose last "
            "step (0 = not speculating).", tag_keys=tags)
        self.spec_enabled = metrics.Gauge(
            "raylm_spec_enabled", "1 while speculative decoding runs; 0 when off or its draft "
            "worker died.", tag_keys=tags)
        self.ttft = metrics.Histogram("raylm_time_to_first_token_seconds",
                                      "Arrival to first generated token.",
                                      boundaries=_LATENCY_BOUNDARIES, tag_keys=tags)
        self.itl = metrics.Histogram("raylm_inter_token_latency_seconds",
                                     "Time between consecutive generated tokens.",
                                     boundaries=_LATENCY_BOUNDARIES, tag_keys=tags)
        self.e2e = metrics.Histogram("raylm_e2e_request_latency_seconds",
                                     "Arrival to the request's last token.",
                                     boundaries=_LATENCY_BOUNDARIES, tag_keys=tags)
        self.requests = metrics.Counter("raylm_requests_total", "Finished requests.",
                                        tag_keys=("model", "finish_reason"))
        self._counters = {
            key: metrics.Counter(name, f"Engine counter {key}.", tag_keys=tags)
            for key, name in _MONOTONIC_STATS.items()
        }
        self._last_counts = {key: 0 for key in _MONOTONIC_STATS}
        self._flusher = threading.Thread(target=self._flush_forever, name="raylm-metrics",
                                         daemon=True)
        self._flusher.start()

    def later(self, record: Callable[..., None], value: float, times: int = 1,
              tags: dict[str, str] | None = None) -> None:
        """Queue `record(value, tags=...)`, `times` times, for the flusher thread."""
        self._pending.append((record, value, times, tags or self._tags))
        if len(self._pending) >= self.MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Record everything queued so far (the flusher thread calls this; so may a test)."""
        while True:
            try:
                record, value, times, tags = self._pending.popleft()
            except IndexError:
                return
            for _ in range(times):
                record(value, tags=tags)

    def _flush_forever(self) -> None:
        while not self._closed.wait(self.FLUSH_INTERVAL_S):
            try:
                self.flush()
            except Exception:  # metrics must never take the replica down
                logger.exception("could not record latency metrics")

    def close(self) -> None:
        self._closed.set()

    def record_stats(self, stats: dict) -> None:
        """Publish one `engine.get_stats()` snapshot (through the flusher thread)."""
        self.later(self.running.set, stats.get("num_running", 0))
        self.later(self.waiting.set, stats.get("num_waiting", 0))
        self.later(self.kv_usage.set, float(stats.get("kv_usage", 0.0)))
        self.later(self.prefix_hit_rate.set, float(stats.get("prefix_cache_hit_rate", 0.0)))
        self.later(self.dispatch_us.set, float(stats.get("executor_dispatch_us_mean", 0.0)))
        self.later(self.spec_acceptance.set, float(stats.get("spec_acceptance_rate", 0.0)))
        self.later(self.spec_k.set, float(stats.get("spec_current_k", 0)))
        self.later(self.spec_enabled.set, float(stats.get("spec_enabled", 0)))
        for key, counter in self._counters.items():
            value = int(stats.get(key, 0))
            delta = value - self._last_counts[key]
            if delta > 0:
                self.later(counter.inc, delta)
            self._last_counts[key] = value

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Latencies of one request: call `on_tokens(k)` per delta, `on_finish(reason)` at the end."""

    def __init__(self, owner: ServerMetrics) -> None:
        self._owner = owner
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self._last_token: float | None = None

    def on_tokens(self, num_new_tokens: int) -> None:
        if num_new_tokens <= 0:
            return
        now = time.perf_counter()
        owner = self._owner
        if self.first_token is None:
            self.first_token = now
            owner.later(owner.ttft.observe, now - self.arrival)
        elif self._last_token is not None:
            # a delta of k tokens (speculative decoding, n > 1) spreads the gap over them
            owner.later(owner.itl.observe, (now - self._last_token) / num_new_tokens,
                        num_new_tokens)
        self._last_token = now

    def on_finish(self, finish_reason: str | None) -> None:
        owner = self._owner
        owner.later(owner.e2e.observe, time.perf_counter() - self.arrival)
        owner.later(owner.requests.inc, 1,
                    tags={**owner._tags, "finish_reason": finish_reason or "none"})
