"""LLM autoscaling for LLMServer: a custom Serve autoscaling policy (Ray 2.60 API).

Ongoing requests alone say little for an LLM: a replica batching 64 short decodes is fine while
one with 4 long prompts queued behind a full KV cache is not. Each replica reports, through
`record_autoscaling_stats`, its waiting requests, KV-cache usage and recent TTFT p90; Serve
averages them over `look_back_period_s` and calls the policy every control-loop tick with
`ctx.aggregated_metrics[name][replica_id]`. `decide` (pure, unit-tested) turns them into a
replica count; Serve then applies min/max replicas and the upscale/downscale delays.

Scale up by one replica when any signal is over its target (or to ceil(ongoing / target) when
ongoing requests alone need more); scale down only when the deployment is idle: nothing waits,
KV and TTFT are comfortably low, and the ongoing requests would fit the smaller deployment at
`idle_fraction` of the target.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

logger = logging.getLogger("ray.serve")

WAITING, KV_USAGE, TTFT_P90 = "num_waiting", "kv_usage", "ttft_p90_s"
REASON_KEY = "raylm_last_decision"


@dataclass(frozen=True)
class AutoscalingThresholds:
    """Targets per replica. `ttft_p90_target_s=0` leaves TTFT out of the decision."""

    target_ongoing_requests: float = 16.0
    target_waiting_requests: float = 2.0
    kv_usage_upscale: float = 0.9
    ttft_p90_target_s: float = 2.0
    idle_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("target_ongoing_requests", "target_waiting_requests"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.kv_usage_upscale <= 1.0:
            raise ValueError(f"kv_usage_upscale must be in (0, 1], got {self.kv_usage_upscale}")
        if self.ttft_p90_target_s < 0:
            raise ValueError(f"ttft_p90_target_s must be >= 0, got {self.ttft_p90_target_s}")
        if not 0.0 < self.idle_fraction < 1.0:
            raise ValueError(f"idle_fraction must be in (0, 1), got {self.idle_fraction}")


@dataclass(frozen=True)
class Signals:
    """The deployment's load: totals over its running replicas, and the worst replica's TTFT."""

    num_replicas: int
    ongoing: float
    waiting: float = 0.0
    mean_kv_usage: float = 0.0
    max_ttft_p90_s: float = 0.0


def decide(s: Signals, t: AutoscalingThresholds) -> tuple[int, str]:
    """(desired replicas, why), before Serve's min/max bounds and delays."""
    n = s.num_replicas
    if n == 0:
        return (1 if s.ongoing > 0 else 0), "cold start" if s.ongoing > 0 else "idle"
    by_ongoing = math.ceil(s.ongoing / t.target_ongoing_requests)
    pressure = []
    if s.waiting / n > t.target_waiting_requests:
        pressure.append(f"waiting {s.waiting / n:.1f}/replica > {t.target_waiting_requests:g}")
    if s.mean_kv_usage > t.kv_usage_upscale:
        pressure.append(f"KV usage {s.mean_kv_usage:.2f} > {t.kv_usage_upscale:g}")
    if t.ttft_p90_target_s and s.max_ttft_p90_s > t.ttft_p90_target_s:
        pressure.append(f"TTFT p90 {s.max_ttft_p90_s:.2f}s > {t.ttft_p90_target_s:g}s")
    if by_ongoing > n:
        pressure.append(f"ongoing {s.ongoing:.1f} > {t.target_ongoing_requests:g} x {n}")
    if pressure:
        return max(n + 1, by_ongoing), "scale up: " + "; ".join(pressure)
    f = t.idle_fraction
    idle = (s.waiting == 0 and s.mean_kv_usage <= t.kv_usage_upscale * f
            and (not t.ttft_p90_target_s or s.max_ttft_p90_s <= t.ttft_p90_target_s * f)
            and s.ongoing <= t.target_ongoing_requests * f * (n - 1))
    if idle and n > 1:
        fits = math.ceil(s.ongoing / (t.target_ongoing_requests * f))
        return max(fits, 1 if s.ongoing > 0 else 0), (
            f"scale down: idle (ongoing {s.ongoing:.1f}, nothing waiting)")
    return n, "hold"


def signals_from(num_replicas: int, ongoing: float,
                 metrics: Mapping[str, Mapping[Any, float]] | None) -> Signals:
    metrics = metrics or {}
    waiting = sum(metrics.get(WAITING, {}).values())
    kv = list(metrics.get(KV_USAGE, {}).values())
    ttft = list(metrics.get(TTFT_P90, {}).values())
    return Signals(num_replicas=num_replicas, ongoing=float(ongoing), waiting=float(waiting),
                   mean_kv_usage=sum(kv) / len(kv) if kv else 0.0,
                   max_ttft_p90_s=max(ttft) if ttft else 0.0)


class LLMAutoscalingPolicy:
    """Serve instantiates this once per deployment with `policy_kwargs` (the thresholds) and
    calls it every control-loop tick. The last decision's reason is kept in the policy state and
    logged by the Serve controller when the replica count it asks for changes (a signal must
    hold for the upscale/downscale delay, so the same request repeats for many ticks)."""

    def __init__(self, **thresholds: float) -> None:
        self.thresholds = AutoscalingThresholds(**thresholds)
        self._last_logged: tuple[int, int] | None = None

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        signals = signals_from(ctx.current_num_replicas, ctx.total_num_requests,
                               ctx.aggregated_metrics)
        desired, reason = decide(signals, self.thresholds)
        state = dict(ctx.policy_state or {})
        if desired != ctx.current_num_replicas:
            state[REASON_KEY] = reason
        if (ctx.current_num_replicas, desired) != self._last_logged and (
                desired != ctx.current_num_replicas or self._last_logged is not None):
            self._last_logged = (ctx.current_num_replicas, desired)
            logger.info("raylm autoscaling %s: %d replicas, the policy asks %d before the "
                        "min/max bounds (%s; signals %s)",
                        ctx.deployment_name, ctx.current_num_replicas, desired, reason,
                        asdict(signals))
        return desired, state
