"""OpenAI response bodies, assembled from LLMServer's step items (see llm_server.py).

`streams` below are async iterators of step items, one per prompt; an error item is turned
into a ServeError before any byte of the response is sent, so the client gets a proper status."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from raylm.cluster.serve.errors import ServeError, error_from_exception
from raylm.cluster.serve.structured_request import ToolCallMode

ItemStream = AsyncIterator[dict[str, Any]]


async def start_stream(stream: ItemStream) -> tuple[dict[str, Any], ItemStream]:
    """Read the first item (raising its error, if it is one) and return it with the rest."""
    first = await stream.__anext__()
    if "error" in first:
        raise ServeError.from_dict(first)
    return first, stream


async def _items(first: dict[str, Any], rest: ItemStream) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for item in rest:
        if "error" in item:
            raise ServeError.from_dict(item)
        yield item


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class _Accumulator:
    """Per-choice text/tokens/logprobs and the request's usage."""

    def __init__(self) -> None:
        self.choices: dict[int, dict[str, Any]] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0

    def add(self, item: dict[str, Any], index_offset: int) -> None:
        self.prompt_tokens = item["prompt_tokens"]
        self.cached_tokens = item.get("cached_tokens", 0)
        for c in item["choices"]:
            acc = self.choices.setdefault(c["index"] + index_offset, {
                "text": "", "token_ids": [], "logprobs": None, "finish_reason": None})
            acc["text"] += c["text"]
            acc["token_ids"] += c["token_ids"]
            self.completion_tokens += len(c["token_ids"])
            if c["logprobs"] is not None:
                acc["logprobs"] = (acc["logprobs"] or []) + c["logprobs"]
            if c["finish_reason"] is not None:
                acc["finish_reason"] = c["finish_reason"]


def completion_logprobs(entries: list[dict[str, Any]] | None, text_start: int = 0) -> dict | None:
    """OpenAI's legacy format; an echoed prompt's first token has logprob and top None."""
    if entries is None:
        return None
    offsets, pos = [], text_start
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else {t["token"]: t["logprob"] for t in e["top"]}
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict | None:
    if entries is None:
        return None

    def one(e: dict[str, Any]) -> dict[str, Any]:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode())}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e["top"]]} for e in entries]}


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def vllm_prompt_logprobs(entries: list[dict[str, Any]] | None) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token_id: {logprob,
    decoded_token}} holding the actual token and the top-N."""
    if entries is None:
        return None
    return [None if e["top"] is None else {
        str(t["token_id"]): {"logprob": t["logprob"], "decoded_token": t["token"]}
        for t in [{"token_id": e["token_id"], "logprob": e["logprob"], "token": e["token"]},
                  *e["top"]]} for e in entries]


class _Echo:
    """What a completions choice starts with when the prompt is echoed (per prompt of a batch)."""

    def __init__(self, first: dict[str, Any], echo: bool) -> None:
        self.text = first.get("prompt_text", "") if echo else ""
        self.entries = first.get("prompt_logprobs") if echo else None
        self.prompt_logprobs = vllm_prompt_logprobs(first.get("prompt_logprobs"))

    def logprobs(self, entries: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if entries is None or self.entries is None:
            return entries
        return self.entries + entries


def _completion_choice(index: int, text: str, entries, finish_reason, echo: _Echo) -> dict:
    choice = {"index": index, "text": echo.text + text,
              "logprobs": completion_logprobs(echo.logprobs(entries)),
              "finish_reason": finish_reason}
    if echo.prompt_logprobs is not None:
        choice["prompt_logprobs"] = echo.prompt_logprobs
    return choice


async def completion_response(starts: list[tuple[dict, ItemStream]], n: int, model: str,
                              echo: bool = False) -> dict:
    acc = _Accumulator()
    prompt_tokens = cached = 0
    echoes: dict[int, _Echo] = {}
    for prompt_index, (first, rest) in enumerate(starts):
        acc.prompt_tokens = 0
        echoes[prompt_index] = _Echo(first, echo)
        async for item in _items(first, rest):
            acc.add(item, prompt_index * n)
        prompt_tokens += acc.prompt_tokens
        cached += acc.cached_tokens
    choices = [_completion_choice(i, c["text"], c["logprobs"], c["finish_reason"],
                                  echoes[i // n])
               for i, c in sorted(acc.choices.items())]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(prompt_tokens, acc.completion_tokens, cached)}


async def _ending_with_error(chunks: AsyncIterator[str], streams: list[ItemStream]
                             ) -> AsyncIterator[str]:
    """An SSE stream that fails after its first bytes cannot change its status: it ends with
    an error event (OpenAI's error body) and `data: [DONE]`, so a client knows it is cut short.
    The upstream streams are closed however it ends (the engine aborts what is left)."""
    try:
        async for chunk in chunks:
            yield chunk
    except ServeError as err:
        yield _sse(err.openai_body())
        yield SSE_DONE
    except Exception as exc:  # noqa: BLE001 - never a stream cut without a word
        yield _sse(error_from_exception(exc).openai_body())
        yield SSE_DONE
    finally:
        for stream in streams:
            await stream.aclose()


def completion_stream(starts: list[tuple[dict, ItemStream]], n: int, model: str,
                      include_usage: bool, echo: bool = False, continuous_usage: bool = False
                      ) -> AsyncIterator[str]:
    """`continuous_usage` (vLLM's stream_options.continuous_usage_stats): the usage so far on
    every chunk, besides the final usage chunk of `include_usage`."""
    return _ending_with_error(
        _completion_chunks(starts, n, model, include_usage, echo, continuous_usage),
        [rest for _, rest in starts])


def chat_stream(first: dict, rest: ItemStream, model: str, include_usage: bool,
                continuous_usage: bool = False, tool_mode: ToolCallMode | None = None
                ) -> AsyncIterator[str]:
    return _ending_with_error(_chat_chunks(first, rest, model, include_usage, continuous_usage,
                                           tool_mode), [rest])


async def _completion_chunks(starts: list[tuple[dict, ItemStream]], n: int, model: str,
                             include_usage: bool, echo: bool, continuous_usage: bool
                             ) -> AsyncIterator[str]:
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = completion_tokens = cached = 0
    no_echo = _Echo({}, False)
    for prompt_index, (first, rest) in enumerate(starts):
        last = first
        first_echo, opened = _Echo(first, echo), set()
        async for item in _items(first, rest):
            last = item
            for c in item["choices"]:
                completion_tokens += len(c["token_ids"])
                # the echoed prompt opens each choice's first chunk
                this_echo = no_echo if c["index"] in opened else first_echo
                opened.add(c["index"])
                usage = ({"usage": _usage(prompt_tokens + item["prompt_tokens"],
                                          completion_tokens, cached)} if continuous_usage else {})
                yield _sse({"id": rid, "object": "text_completion", "created": created,
                            "model": model, "choices": [_completion_choice(
                                c["index"] + prompt_index * n, c["text"], c["logprobs"],
                                c["finish_reason"], this_echo)], **usage})
        prompt_tokens += last["prompt_tokens"]
        cached += last.get("cached_tokens", 0)
    if include_usage:
        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": _usage(prompt_tokens, completion_tokens, cached)})
    yield SSE_DONE


def tool_call(text: str, mode: ToolCallMode) -> dict[str, Any]:
    """A complete constrained output as one OpenAI tool call (named function: the text is
    its arguments; "required": the text is {"name": ..., "arguments": {...}})."""
    if mode.function is not None:
        name, arguments = mode.function, text
    else:
        call = json.loads(text)
        name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _chat_message(text: str, finish_reason: str | None, mode: ToolCallMode | None
                  ) -> tuple[dict[str, Any], str | None]:
    """(message, finish_reason); an output cut short (length, abort) stays plain text."""
    if mode is None or finish_reason != "stop":
        return {"role": "assistant", "content": text}, finish_reason
    return ({"role": "assistant", "content": None, "tool_calls": [tool_call(text, mode)]},
            "tool_calls")


async def chat_response(first: dict, rest: ItemStream, model: str,
                        tool_mode: ToolCallMode | None = None) -> dict:
    acc = _Accumulator()
    async for item in _items(first, rest):
        acc.add(item, 0)
    choices = []
    for i, c in sorted(acc.choices.items()):
        message, finish_reason = _chat_message(c["text"], c["finish_reason"], tool_mode)
        choices.append({"index": i, "message": message,
                        "logprobs": chat_logprobs(c["logprobs"]), "finish_reason": finish_reason})
    body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(acc.prompt_tokens, acc.completion_tokens, acc.cached_tokens)}
    if first.get("prompt_logprobs") is not None:  # vLLM's extra, at the top level for chat
        body["prompt_logprobs"] = vllm_prompt_logprobs(first["prompt_logprobs"])
    return body


async def _chat_chunks(first: dict, rest: ItemStream, model: str, include_usage: bool,
                       continuous_usage: bool, tool_mode: ToolCallMode | None
                       ) -> AsyncIterator[str]:
    """With `tool_mode` a choice's text is held back until it is complete, then sent as one
    tool_calls delta (its name and whole arguments) with finish_reason "tool_calls"."""
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[dict], **extra: Any) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": choices, **extra})

    opened: set[int] = set()
    held: dict[int, str] = {}  # tool mode: each choice's text so far
    last, completion_tokens = first, 0
    async for item in _items(first, rest):
        last = item
        for c in item["choices"]:
            if c["index"] not in opened:  # OpenAI opens each choice with its role
                opened.add(c["index"])
                yield chunk([{"index": c["index"], "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            completion_tokens += len(c["token_ids"])
            finish_reason = c["finish_reason"]
            delta = {"content": c["text"]} if c["text"] or finish_reason is None else {}
            if tool_mode is not None:
                held[c["index"]] = held.get(c["index"], "") + c["text"]
                if finish_reason is None:
                    continue
                if finish_reason == "stop":
                    call = {"index": 0, **tool_call(held[c["index"]], tool_mode)}
                    delta, finish_reason = {"tool_calls": [call]}, "tool_calls"
                else:
                    delta = {"content": held[c["index"]]}
            usage = ({"usage": _usage(item["prompt_tokens"], completion_tokens,
                                      item.get("cached_tokens", 0))} if continuous_usage else {})
            yield chunk([{"index": c["index"], "delta": delta,
                          "logprobs": chat_logprobs(c["logprobs"]),
                          "finish_reason": finish_reason}], **usage)
    if include_usage:
        yield chunk([], usage=_usage(last["prompt_tokens"], completion_tokens,
                                     last.get("cached_tokens", 0)))
    yield SSE_DONE
