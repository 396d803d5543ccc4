"""What a request returns: cumulative results plus the delta of the last step."""
from __future__ import annotations

from dataclasses import dataclass, field

# A token's logprobs: {token_id: logprob} with the chosen token and the top-N.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request has n of them)."""

    index: int
    text: str = ""  # cumulative
    token_ids: list[int] = field(default_factory=list)  # cumulative
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None  # one dict per generated token, when asked
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    delta_text: str = ""  # new since the previous RequestOutput of this request
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None
    # Set when the engine failed this request alone (its other requests go on); finished is True.
    error: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


def merge_deltas(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """``newer`` carrying both snapshots' deltas (for a reader that fell behind by one step or
    more): cumulative fields are newer's, delta fields older's followed by newer's."""
    previous = {c.index: c for c in older.outputs}
    for c in newer.outputs:
        old = previous.pop(c.index, None)
        if old is None:
            continue
        c.delta_text = old.delta_text + c.delta_text
        c.delta_token_ids = old.delta_token_ids + c.delta_token_ids
        if c.delta_logprobs is not None and old.delta_logprobs is not None:
            c.delta_logprobs = old.delta_logprobs + c.delta_logprobs
    # a completion only the older snapshot had (beam search reshuffles) keeps its own delta
    newer.outputs.extend(previous.values())
    newer.outputs.sort(key=lambda c: c.index)
    return newer
