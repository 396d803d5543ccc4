"""Recent time-to-first-token samples of one replica, for the autoscaler's TTFT p90 signal."""
from __future__ import annotations

import math
import time
from collections import deque


class RecentLatencies:
    """Latencies seen in the last `window_s` seconds (at most `max_samples` of them): the
    autoscaler compares their p90 with a target, so old bursts must age out."""

    def __init__(self, window_s: float = 30.0, max_samples: int = 2048) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (when, seconds)

    def add(self, seconds: float, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, seconds))

    def percentile(self, q: float, now: float | None = None) -> float:
        """The q-quantile (0..1, nearest rank) of the window; 0.0 when it is empty (an idle
        replica has no latency problem)."""
        now = time.monotonic() if now is None else now
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        values = sorted(s for _, s in self._samples)
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]
