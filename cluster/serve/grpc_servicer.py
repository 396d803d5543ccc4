"""Translation between the raylm.v1.Generation messages and LLMServer's request/step dicts.

The ingress deployment implements the servicer methods (Serve's gRPC proxy routes
`/raylm.v1.Generation/<Method>` to the ingress method of the same name); this module keeps the
proto plumbing out of it."""
from __future__ import annotations

from typing import Any

from raylm.cluster.serve.errors import ServeError
from raylm.proto import generation_pb2 as pb

# SamplingOptions fields that map 1:1 onto SamplingParams fields (scalars, proto3 optional).
_OPTIONAL_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "min_tokens", "ignore_eos",
    "include_stop_str_in_output", "skip_special_tokens", "logprobs",
)


def _chat(chat: pb.ChatMessages) -> dict[str, Any]:
    return {
        "messages": [{"role": m.role, "content": m.content} for m in chat.messages],
        "add_generation_prompt": chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True,
    }


def sampling_fields(options: pb.SamplingOptions) -> dict[str, Any]:
    """Only the fields the client set, so SamplingParams' defaults apply to the rest."""
    fields = {name: getattr(options, name) for name in _OPTIONAL_FIELDS if options.HasField(name)}
    if options.stop:
        fields["stop"] = list(options.stop)
    if options.stop_token_ids:
        fields["stop_token_ids"] = list(options.stop_token_ids)
    if options.HasField("structured_output"):
        fields["structured_outputs"] = _structured_output(options.structured_output)
    return fields


def _structured_output(so: pb.StructuredOutput) -> dict[str, Any]:
    """SamplingParams.structured_outputs' dict form; the engine validates it (INVALID_ARGUMENT
    naming structured_outputs when the schema / regex / grammar is bad)."""
    kind = so.WhichOneof("kind")
    if kind is None:
        raise ServeError("invalid_argument", "structured_output: set one of json_schema, "
                         "json_object, regex, choice or grammar", "structured_output")
    if kind == "json_schema":
        return {"json": so.json_schema}
    if kind == "choice":
        return {"choice": list(so.choice.choices)}
    return {kind: getattr(so, kind)}


def generate_request(request: pb.GenerateRequest) -> dict[str, Any]:
    which = request.WhichOneof("input")
    if which is None:
        raise ServeError("invalid_argument", "input: set one of prompt, token_ids or chat", "input")
    out: dict[str, Any] = {"model": request.model or None, "request_id": request.request_id or None,
                           "sampling": sampling_fields(request.sampling),
                           "truncate_max_tokens": request.sampling.truncate_max_tokens}
    if which == "prompt":
        out["prompt"] = request.prompt
    elif which == "token_ids":
        out["prompt_token_ids"] = list(request.token_ids.ids)
    else:
        out.update(_chat(request.chat))
    return out


def tokenize_request(request: pb.TokenizeRequest) -> dict[str, Any]:
    which = request.WhichOneof("input")
    out: dict[str, Any] = {}
    if request.HasField("add_special_tokens"):
        out["add_special_tokens"] = request.add_special_tokens
    if which == "text":
        out["text"] = request.text
    elif which == "chat":
        out.update(_chat(request.chat))
    return out


def _choice(c: dict[str, Any]) -> pb.Choice:
    logprobs = [
        pb.PositionLogprobs(
            chosen=pb.TokenLogprob(token_id=e["token_id"], logprob=e["logprob"], token=e["token"]),
            top=[pb.TokenLogprob(token_id=t["token_id"], logprob=t["logprob"], token=t["token"])
                 for t in e["top"]])
        for e in (c["logprobs"] or [])
    ]
    return pb.Choice(index=c["index"], text=c["text"], token_ids=c["token_ids"], logprobs=logprobs,
                     finish_reason=c["finish_reason"] or "")


def usage(item: dict[str, Any]) -> pb.Usage:
    prompt, completion = item["prompt_tokens"], item["completion_tokens"]
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=prompt + completion, cached_prompt_tokens=item.get("cached_tokens", 0))


def stream_response(item: dict[str, Any]) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(request_id=item["request_id"], finished=item["finished"],
                                    choices=[_choice(c) for c in item["choices"]])
    if item["finished"]:
        msg.usage.CopyFrom(usage(item))
    return msg


class UnaryCollector:
    """Concatenates step items into one GenerateResponse."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._choices: dict[int, dict[str, Any]] = {}
        self._last: dict[str, Any] | None = None

    def add(self, item: dict[str, Any]) -> None:
        self._last = item
        for c in item["choices"]:
            acc = self._choices.setdefault(c["index"], {"index": c["index"], "text": "",
                                                        "token_ids": [], "logprobs": None,
                                                        "finish_reason": None})
            acc["text"] += c["text"]
            acc["token_ids"] += c["token_ids"]
            if c["logprobs"] is not None:
                acc["logprobs"] = (acc["logprobs"] or []) + c["logprobs"]
            acc["finish_reason"] = c["finish_reason"] or acc["finish_reason"]

    def response(self) -> pb.GenerateResponse:
        assert self._last is not None, "a generation stream ends with a finished item"
        return pb.GenerateResponse(
            request_id=self._last["request_id"], model=self._model,
            choices=[_choice(c) for _, c in sorted(self._choices.items())], usage=usage(self._last))


def model_info(info: dict[str, Any]) -> pb.ModelInfo:
    return pb.ModelInfo(**info)
