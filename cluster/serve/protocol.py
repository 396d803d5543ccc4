"""OpenAI-compatible request bodies (pydantic) and their translation into LLMServer requests.

Fields follow the OpenAI API; raylm extras (top_k, min_p, repetition_penalty, min_tokens,
stop_token_ids, ignore_eos, skip_special_tokens, include_stop_str_in_output) are accepted at the
top level of the body, as the `openai` client sends them through `extra_body`."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from raylm.cluster.serve.errors import ServeError
from raylm.cluster.serve.structured_request import ToolCallMode, structured_outputs


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

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        _check_unicode(value)
        return value

MAX_CHOICES = 1024  # prompts x n of one completions request (each is an engine request)

_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "min_tokens", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "include_stop_str_in_output", "prompt_logprobs",
)


# OpenAI / vLLM fields a client may rely on that raylm does not implement: a 400 naming the
# field, never a silent 200 that ignored it (unknown fields are refused too: extra="forbid").
_UNSUPPORTED = ("functions", "function_call", "logit_bias", "suffix")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: the usage so far on every chunk


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
    # structured output (structured_request.py)
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None  # one call is made: true ("may") and false both hold
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    # refused when set (see _UNSUPPORTED)
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    suffix: Any = None
    # raylm extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    prompt_logprobs: int | None = None  # vLLM's extra: top-N per prompt token
    # generate until the context is full instead of refusing a max_tokens that cannot fit
    truncate_max_tokens: bool = False
    _tool_call_mode: ToolCallMode | None = PrivateAttr(default=None)

    def _sampling(self) -> dict[str, Any]:
        for name in _UNSUPPORTED:
            if getattr(self, name) is not None:
                raise ServeError("invalid_argument", f"{name} is not supported by this server",
                                 name)
        fields = {name: getattr(self, name) for name in _SAMPLING_FIELDS}
        fields["stop"] = self.stop
        fields["structured_outputs"], self._tool_call_mode = structured_outputs(
            self, chat=isinstance(self, ChatCompletionRequest))
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def tool_call_mode(self) -> ToolCallMode | None:
        """Set (after to_request) when the output is a tool call: chat with tool_choice
        "required" or a named function."""
        return self._tool_call_mode

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingBody):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None

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
        if self.best_of is not None and self.best_of != self.n:
            raise ServeError("invalid_argument", "best_of must equal n (or be unset)", "best_of")
        sampling = self._sampling()
        extra: dict[str, Any] = {"echo": self.echo, "truncate_max_tokens": self.truncate_max_tokens}
        if self.max_tokens == 0 and (self.echo or self.prompt_logprobs is not None):
            # score the prompt only (lm-eval's loglikelihood): one step, its token dropped
            sampling["max_tokens"] = 1
            extra["drop_output"] = True
        elif self.max_tokens is not None:
            sampling["max_tokens"] = self.max_tokens
        if self.logprobs is not None:
            sampling["logprobs"] = self.logprobs
            if self.echo:  # the echoed prompt carries its logprobs too (OpenAI's legacy format)
                sampling["prompt_logprobs"] = max(self.logprobs, sampling.get("prompt_logprobs") or 0)
        return [{**inp, "model": self.model, "sampling": sampling, **extra}
                for inp in self.prompts()]


class ChatMessageBody(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None  # handed to the chat template

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
            "messages": [{"role": m.role, "content": m.text(),
                          **({"name": m.name} if m.name is not None else {})}
                         for m in self.messages],
            "truncate_max_tokens": self.truncate_max_tokens,
            "add_generation_prompt": self.add_generation_prompt,
            "model": self.model,
            "sampling": sampling,
            "max_tokens_default": "context",
        }


class TokenizeRequest(_Strict):
    """vLLM's `POST /tokenize` body: a text `prompt` or chat `messages` (lm-eval's remote
    tokenizer sends `{"prompt": ..., "add_special_tokens": false}`)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageBody] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def to_request(self) -> dict[str, Any]:
        if (self.prompt is None) == (self.messages is None):
            raise ServeError("invalid_argument", "exactly one of prompt or messages is required",
                             "prompt")
        if self.messages is not None:
            return {"model": self.model, "add_generation_prompt": self.add_generation_prompt,
                    "messages": [{"role": m.role, "content": m.text(),
                                  **({"name": m.name} if m.name is not None else {})}
                                 for m in self.messages]}
        return {"model": self.model, "text": self.prompt,
                "add_special_tokens": self.add_special_tokens}


class DetokenizeRequest(_Strict):
    """vLLM's `POST /detokenize` body."""

    model: str | None = None
    tokens: list[int]
