"""Per-request decoding parameters (pure Python: crosses Ray/gRPC as a plain dict).

Names and defaults follow what users already know from vLLM, the OpenAI API and Hugging Face
`generate`. Every invalid value raises `ValueError` whose message starts with the field name, so
the APIs can map it to INVALID_ARGUMENT / HTTP 400 and tell the user which field is wrong.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from raylm.cluster.structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20  # the OpenAI API's limit on top-N logprobs per token
# Bounds that keep one request from exhausting a replica's memory or CPU. The engine also caps
# n and num_beams by its max_num_seqs (EngineCore.make_request): every sequence runs at once.
MAX_N = 128  # outputs (n) and beams (num_beams) per request
MAX_STOP_STRINGS = 64  # checked against the tail of every new token's text
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# Token counts and top_k travel as 32-bit ints (proto, tensors); seeds as 64-bit.
MAX_INT32 = 2**31 - 1
SEED_RANGE = (-(2**63), 2**64 - 1)

_DEFAULT_TEMPERATURE = 1.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to decode one request.

    Sampling: `temperature` (0 = greedy), `top_k` (0 or -1 = off), `top_p` (1 = off),
    `min_p` (0 = off), `repetition_penalty` (Hugging Face semantics, over prompt + output tokens:
    a seen token's logit is divided by the penalty when positive, multiplied when negative),
    `presence_penalty` / `frequency_penalty` (OpenAI semantics, over output tokens only:
    `logit -= presence * (count > 0) + frequency * count`), `seed` (the request's tokens are then
    reproducible whatever it is batched with).

    Beam search (`num_beams > 1`) is deterministic, as in Hugging Face with `do_sample=False`.
    Because users routinely pass `num_beams` while leaving the sampling knobs at their defaults,
    beam search accepts `temperature` of 0 or the untouched default 1.0 (both mean "not
    sampling"), with `top_p`, `top_k` and `min_p` at their defaults; any other value of those
    fields is rejected naming the field, rather than silently ignored. `n` beams are returned,
    so `n <= num_beams`.

    Contrastive search (`penalty_alpha > 0`) uses `top_k` as its number of candidates, so it
    needs `top_k > 1`, and is exclusive with beam search.

    `stop` strings end the output right before the match (the match itself is kept only with
    `include_stop_str_in_output`); `stop_token_ids` end it after the token (the token's text is
    not added). `max_tokens` counts generated tokens; `min_tokens` suppresses EOS and
    `stop_token_ids` until that many tokens exist. `logprobs=N` returns the chosen token's
    logprob plus the top-N of the model's raw distribution per generated token
    (`prompt_logprobs=N` likewise per prompt token).

    `structured_outputs` (a `StructuredOutputsParams` or its dict form: one of json,
    json_object, regex, choice, grammar) constrains the output while sampling: every token the
    grammar disallows is masked, and EOS is allowed only where the grammar may end. It needs
    plain sampling (not beam or contrastive search), and neither `ignore_eos` nor `min_tokens`
    (both would fight the grammar over where the output ends).

    After construction `stop` and `stop_token_ids` are always lists and `top_k == -1` reads 0.
    """

    n: int = 1
    temperature: float = _DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    penalty_alpha: float = 0.0
    structured_outputs: StructuredOutputsParams | dict | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self._check_sampling()
        self._check_lengths()
        self._check_stops()
        self._check_logprobs()
        self._check_search()
        self._check_structured()

    # --- validation -------------------------------------------------------------------------

    def _normalise(self) -> None:
        for name in (
            "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "length_penalty", "penalty_alpha",
        ):
            value = getattr(self, name)
            if not _is_number(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
            try:
                value = float(value)
            except OverflowError:  # an int too large for a float
                value = math.inf
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, value)
        for name in ("n", "top_k", "max_tokens", "min_tokens", "num_beams"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value > MAX_INT32:
                raise ValueError(f"{name} must be <= {MAX_INT32}, got {value}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.top_k == -1:
            self.top_k = 0
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")

    def _check_sampling(self) -> None:
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")

    def _check_lengths(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

    def _check_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, "
                             f"got {len(self.stop)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids, "
                             f"got {len(self.stop_token_ids)}")
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must be a string or a list of strings, got item {s!r}")
            if not s:
                raise ValueError("stop must not contain an empty string")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} "
                                 f"characters, got one of {len(s)}")
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t <= MAX_INT32:
                raise ValueError(f"stop_token_ids must be non-negative integers, got item {t!r}")

    def _check_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    def _check_search(self) -> None:
        if not 1 <= self.num_beams <= MAX_N:
            raise ValueError(f"num_beams must be in [1, {MAX_N}], got {self.num_beams}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(
                f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
        if self.num_beams > 1:
            if self.temperature not in (0.0, _DEFAULT_TEMPERATURE):
                raise ValueError(
                    f"temperature must be 0 (or left at its default) with beam search, "
                    f"got {self.temperature}"
                )
            if self.top_p != 1.0:
                raise ValueError(f"top_p is not supported with beam search, got {self.top_p}")
            if self.top_k != 0 and self.penalty_alpha == 0.0:
                raise ValueError(f"top_k is not supported with beam search, got {self.top_k}")
            if self.min_p != 0.0:
                raise ValueError(f"min_p is not supported with beam search, got {self.min_p}")
            if self.n > self.num_beams:
                raise ValueError(f"n must be <= num_beams ({self.num_beams}), got {self.n}")
        if not 0.0 <= self.penalty_alpha <= 1.0:
            raise ValueError(f"penalty_alpha must be in [0, 1], got {self.penalty_alpha}")
        if self.penalty_alpha > 0.0:
            if self.num_beams > 1:
                raise ValueError(
                    "penalty_alpha (contrastive search) cannot be combined with num_beams > 1"
                )
            if self.top_k <= 1:
                raise ValueError(
                    f"top_k must be > 1 with penalty_alpha (contrastive search), got {self.top_k}"
                )
            if self.top_k > MAX_N:
                # each candidate is a forked sequence
                raise ValueError(f"top_k must be <= {MAX_N} with penalty_alpha (contrastive "
                                 f"search), got {self.top_k}")
        if self.num_beams > 1 or self.penalty_alpha > 0.0:
            # Both searches score with the model's raw logprobs: a penalty would be ignored.
            mode = "beam search" if self.num_beams > 1 else "contrastive search"
            for name, off in (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                              ("frequency_penalty", 0.0)):
                if getattr(self, name) != off:
                    raise ValueError(f"{name} is not supported with {mode}, "
                                     f"got {getattr(self, name)}")

    def _check_structured(self) -> None:
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        if self.structured_outputs is None:
            return
        conflicts = (("num_beams", self.num_beams > 1, "beam search"),
                     ("penalty_alpha", self.penalty_alpha > 0.0, "contrastive search"),
                     ("ignore_eos", self.ignore_eos, "ignore_eos"),
                     ("min_tokens", self.min_tokens > 0, "min_tokens"))
        for name, conflict, what in conflicts:
            if conflict:
                raise ValueError(f"{name}: {what} cannot be combined with structured_outputs "
                                 f"(the grammar decides where the output ends)")

    # --- derived views ----------------------------------------------------------------------

    @property
    def sampling_type(self) -> str:
        """One of "beam", "contrastive", "greedy", "random"."""
        if self.num_beams > 1:
            return "beam"
        if self.penalty_alpha > 0.0:
            return "contrastive"
        if self.temperature == 0.0:
            return "greedy"
        return "random"

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == "greedy"

    @property
    def all_stop_token_ids(self) -> set[int]:
        return set(self.stop_token_ids)

    @property
    def max_stop_len(self) -> int:
        """Length of the longest stop string (0 when none)."""
        return max((len(s) for s in self.stop), default=0)

    # --- transport --------------------------------------------------------------------------

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"{key} is not a sampling parameter")
        return cls(**data)

