"""OpenAI-compatible request bodies (pydantic) and their translation into LLMServer requests.

Fields follow the OpenAI API; raylm extras (top_k, min_p, repetition_penalty, min_tokens,
stop_token_ids, ignore_eos, skip_special_tokens, include_stop_str_in_output) are accepted at the
top level of the body, as the `openai` client sends them through `extra_body`."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from raylm.cluster.serve.errors import ServeError


def _check_unicode(value: Any) -> None:
    """JSON can carry lone surrogates ("\\ud800"): no tokenizer or response encoder takes them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the text is not valid Unicode (a lone surrogate)") from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)


class _Strict(BaseModel):
    """No coercion (`"4"` is not 4, `true` is not 1), no NaN or infinities, valid Unicode."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        _check_unicode(value)
        return value

MAX_CHOICES = 1024  # prompts x n of one completions request (each is an engine request)

_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "min_tokens", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "include_stop_str_in_output",
)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingBody(_Strict):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # raylm extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    request_id: str | None = None

    def _sampling(self) -> dict[str, Any]:
        if self.logit_bias:
            raise ServeError("invalid_argument", "logit_bias is not supported", "logit_bias")
        fields = {name: getattr(self, name) for name in _SAMPLING_FIELDS}
        fields["stop"] = self.stop
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingBody):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[dict[str, Any]]:
        """One LLMServer input per prompt of the batch."""
        p = self.prompt
        if isinstance(p, str):
            return [{"prompt": p}]
        if p and all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": p}]
        if p and all(isinstance(x, str) for x in p):
            return [{"prompt": x} for x in p]
        if p and all(isinstance(x, list) for x in p):
            return [{"prompt_token_ids": x} for x in p]
        raise ServeError("invalid_argument", "prompt must be a string, a list of strings, a list "
                         "of token ids or a list of token id lists, and not empty", "prompt")

    def to_requests(self) -> list[dict[str, Any]]:
        num_choices = len(self.prompts()) * self.n
        if num_choices > MAX_CHOICES:
            raise ServeError("invalid_argument", f"prompt: {len(self.prompts())} prompts x n="
                             f"{self.n} is {num_choices} choices; at most {MAX_CHOICES} per "
                             f"request", "prompt")
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise ServeError("invalid_argument", f"{name} is not supported", name)
        if self.best_of is not None and self.best_of != self.n:
            raise ServeError("invalid_argument", "best_of must equal n (or be unset)", "best_of")
        sampling = self._sampling()
        if self.max_tokens is not None:
            sampling["max_tokens"] = self.max_tokens
        if self.logprobs is not None:
            sampling["logprobs"] = self.logprobs
        return [{**inp, "model": self.model, "sampling": sampling} for inp in self.prompts()]


class ChatMessageBody(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ServeError("invalid_argument", "messages: only text content parts are "
                                 "supported", "messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessageBody] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def to_request(self) -> dict[str, Any]:
        sampling = self._sampling()
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is not None:
            sampling["max_tokens"] = max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ServeError("invalid_argument", "top_logprobs requires logprobs=true", "top_logprobs")
        if self.logprobs:
            sampling["logprobs"] = self.top_logprobs or 0
        return {
            "messages": [{"role": m.role, "content": m.text()} for m in self.messages],
            "add_generation_prompt": self.add_generation_prompt,
            "model": self.model,
            "sampling": sampling,
            "max_tokens_default": "context",
        }
