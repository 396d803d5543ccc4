"""How many tokens to speculate this step: the k that maximises expected tokens per second.

With acceptance rate a_i for sequence i (each draft accepted independently with probability a_i),
verifying k drafts emits on average

    E_i(k) = 1 + a_i + a_i^2 + ... + a_i^k = (1 - a_i^(k+1)) / (1 - a_i)

tokens. A step that feeds N tokens costs T(N) = t0 + t1 * N seconds (a line fitted online to
the measured step times; t1 is small while the batch is memory bound and grows when it becomes
compute bound). Each step chooses

    k* = argmax over k in 0..k_max of
         sum_i E_i(min(k, cap_i)) / (T(N0 + sum_i min(k, cap_i)) + k * D(S))

where N0 is the step's tokens without speculation, cap_i what sequence i may still generate, and
D(S) = d0 + d1 * S the measured time of one batched draft forward over the S speculating
sequences (a second online line; 0 for the n-gram proposer, whose lookup is not timed).
At batch 1 on a memory-bound device T barely grows with N, so k* = k_max whenever a > 0; in a
large compute-bound batch every extra verified token costs as much as a decoded one, the ratio
is below 1 and k* = 0: speculation never makes serving slower than not speculating. a_i is an
exponential moving average per request (prior: the engine-wide rate). Pure Python.

A run of k* = 0 would otherwise be final: no drafts means no new acceptance samples, and steps
that all feed N0 tokens leave the time fit degenerate. So after a run of zeros one step explores
with k_max, as rarely as its cost requires: its extra time relative to a plain step (from the last
non-degenerate fit) spread over the run stays under EXPLORE_BUDGET, and the run is at least
EXPLORE_EVERY steps.
"""
from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.98  # weight of the past in the step-time fit (about 50 steps of memory)
PRIOR_ACCEPTANCE = 0.5
MIN_SAMPLES = 8  # below this many measured steps, speculate fully (optimistic start)
EXPLORE_EVERY = 32  # the shortest run of k = 0 steps before one step re-measures with k_max
EXPLORE_BUDGET = 0.02  # what exploring may cost, as a fraction of the time spent at k = 0


@dataclass
class _Fit:
    """Exponentially weighted least squares of time = t0 + t1 * tokens."""

    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    count: int = 0

    def add(self, x: float, y: float) -> None:
        self.w, self.sx, self.sy = DECAY * self.w + 1, DECAY * self.sx + x, DECAY * self.sy + y
        self.sxx, self.sxy = DECAY * self.sxx + x * x, DECAY * self.sxy + x * y
        self.count += 1

    def line(self) -> tuple[float, float] | None:
        var = self.w * self.sxx - self.sx * self.sx
        if self.count < MIN_SAMPLES or var <= 1e-12 * max(1.0, self.w * self.sxx):
            return None
        t1 = max(0.0, (self.w * self.sxy - self.sx * self.sy) / var)
        t0 = max(1e-9, (self.sy - t1 * self.sx) / self.w)
        return t0, t1


def expected_tokens(acceptance: float, k: int) -> float:
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


class AdaptiveK:
    def __init__(self, k_max: int) -> None:
        self.k_max = k_max
        self.fit = _Fit()  # target step seconds vs tokens fed
        self.draft_fit = _Fit()  # one draft forward's seconds vs sequences drafting
        self.last_k = k_max
        self.num_zero_steps = 0  # k = 0 decisions since the last step that speculated
        self._last_line: tuple[float, float] | None = None  # the last non-degenerate fit

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.fit.add(float(num_tokens), seconds)

    def observe_draft(self, num_seqs: int, num_forwards: int, seconds: float) -> None:
        if num_forwards > 0:
            self.draft_fit.add(float(num_seqs), seconds / num_forwards)

    def _draft_seconds(self, num_seqs: int) -> float:
        if self.draft_fit.count == 0:
            return 0.0
        line = self.draft_fit.line()
        if line is None:  # one batch size seen so far: its mean
            return self.draft_fit.sy / self.draft_fit.w
        return line[0] + line[1] * num_seqs

    def choose(self, num_base_tokens: int, acceptances: list[float], caps: list[int]) -> int:
        """k for this step, given each candidate sequence's acceptance rate and cap."""
        k = self._best_k(num_base_tokens, acceptances, caps)
        if k > 0 or not acceptances:
            self.num_zero_steps = 0
            return k
        self.num_zero_steps += 1
        if self.num_zero_steps >= self._explore_interval(num_base_tokens, caps):
            self.num_zero_steps = 0
            return self.k_max  # one step to refresh acceptance and the fit; last_k stays 0
        return 0

    def _explore_interval(self, num_base_tokens: int, caps: list[int]) -> float:
        """Steps at k = 0 between explorations: the extra cost of one k_max step, relative to a
        plain step, over EXPLORE_BUDGET (never fewer than EXPLORE_EVERY)."""
        if self._last_line is None:
            return EXPLORE_EVERY
        t0, t1 = self._last_line
        extra_tokens = sum(min(self.k_max, c) for c in caps)
        extra = t1 * extra_tokens + self.k_max * self._draft_seconds(len(caps))
        return max(EXPLORE_EVERY, extra / (t0 + t1 * num_base_tokens) / EXPLORE_BUDGET)

    def _best_k(self, num_base_tokens: int, acceptances: list[float], caps: list[int]) -> int:
        line = self.fit.line()
        if line is not None:
            self._last_line = line
        if not acceptances:
            return self.last_k
        if line is None:
            # Warming up: speculate fully to measure it. Later, a degenerate fit (every recent
            # step fed about the same tokens) holds the last decision rather than re-exploring
            # with a full k at the current, maybe compute-bound, batch.
            if self.fit.count < MIN_SAMPLES:
                self.last_k = self.k_max
            return self.last_k
        t0, t1 = line
        draft_s = self._draft_seconds(len(acceptances))
        best_k, best_rate = 0, -1.0
        for k in range(self.k_max + 1):
            ks = [min(k, c) for c in caps]
            tokens = sum(expected_tokens(a, ki) for a, ki in zip(acceptances, ks))
            rate = tokens / (t0 + t1 * (num_base_tokens + sum(ks)) + max(ks) * draft_s)
            if rate > best_rate * (1 + 1e-9):  # ties keep the smaller k
                best_k, best_rate = k, rate
        self.last_k = best_k
        return best_k
