"""LLMServer: the Serve deployment whose replicas each own one AsyncEngine (one model instance).

The ingress talks to it through a streaming DeploymentHandle. Every item crossing the
boundary is a small dict, so nothing engine-specific is pickled:
  step item:  {"request_id", "prompt_tokens", "cached_tokens", "finished",
               "choices": [{"index", "text", "token_ids", "logprobs", "finish_reason"}]}
              (text / token_ids / logprobs are the deltas since the previous item)
  error item: {"error": {"kind", "message", "param"}}  (always the only item of its stream)
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, AsyncIterator

from ray import serve

from raylm.cluster.engine_process import freeze_startup_objects
from raylm.cluster.serve.errors import ServeError, error_from_exception
from raylm.cluster.serve.metrics import ServerMetrics
from raylm.cluster.serve.prefix_hash import PrefixIndex, index_capacity, request_prefix_digests
from raylm.cluster.serve.ttft_window import RecentLatencies

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0  # how often the replica publishes engine gauges
# Text longer than max_model_len * this many characters cannot fit the context: real tokens
# average 3-5 characters, the longest (runs of spaces or dashes) a few dozen.
MAX_CHARS_PER_TOKEN = 64
# The prefix digests reported to the router are capped so one report stays well under a
# megabyte (8-byte ints) however large the KV pool is.
MAX_REPORTED_DIGESTS = 16384
TTFT_P90_WINDOW_S = 30.0  # the autoscaler's TTFT signal: p90 of the last this many seconds


def check_text(name: str, value: str) -> None:
    """Reject text that is not valid Unicode (JSON can carry lone surrogates; they cannot be
    tokenized or encoded back into a response)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name}: the text is not valid Unicode (a lone surrogate)") from None


def resolve_model(model: str | None) -> str:
    """The model to load; None means the built-in demo model (built on this node)."""
    if model:
        return model
    from raylm.workers.make_model import demo_model_dir

    return str(demo_model_dir())


async def _quietly(awaitable) -> None:
    try:
        await awaitable
    except Exception:
        logger.debug("cleanup step failed", exc_info=True)


def _use_assigned_cpus() -> None:
    """Compute with as many threads as CPUs this replica reserved. Ray starts workers with
    OMP_NUM_THREADS=1 unless told otherwise, which would leave a CPU replica on one core."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    if cpus >= 1:
        torch.set_num_threads(int(cpus))
    logger.info("LLMServer computes with %d threads (%.1f CPUs reserved)",
                torch.get_num_threads(), cpus)


@serve.deployment(name="LLMServer", max_ongoing_requests=256, health_check_period_s=10)
class LLMServer:
    def __init__(self, engine_args: dict[str, Any]) -> None:
        from raylm.cluster import AsyncEngine

        engine_args = dict(engine_args)
        engine_args["model"] = resolve_model(engine_args.get("model"))
        _use_assigned_cpus()
        if engine_args.get("engine_process") is None:
            import torch

            from raylm.cluster.engine_process import by_default

            engine_args["engine_process"] = by_default(engine_args.get("device") or "cpu",
                                                       torch.get_num_threads())
        logger.info("the engine core runs %s", "in a process of its own"
                    if engine_args["engine_process"] else "on a step thread of this replica")
        self.engine = AsyncEngine(**engine_args)
        self.tokenizer = self.engine.tokenizer
        self.model_name: str = self.engine.model_name
        self.metrics = ServerMetrics(self.model_name)
        self._stats_task: asyncio.Task | None = None
        stats = self.engine.get_stats()
        self.prefix_index = PrefixIndex(index_capacity(
            stats["num_total_blocks"], int(engine_args.get("block_size", 16)), MAX_REPORTED_DIGESTS))
        self.recent_ttft = RecentLatencies(TTFT_P90_WINDOW_S)
        self._num_routing_reports = 0
        # without a prefix cache there is nothing to route to: report no prefixes
        self._prefix_caching = bool(engine_args.get("enable_prefix_caching", True))
        freeze_startup_objects()

    # --- generation ---------------------------------------------------------------------------

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's step items (see the module docstring). Every failure, before
        or after the first token, ends the stream with one error item: the stream never breaks
        without saying why."""
        self._ensure_stats_task()
        try:
            prompt = self._prompt(request)
            sampling = self._sampling_params(request.get("sampling") or {}, prompt,
                                             request.get("max_tokens_default"))
        except Exception as exc:  # bad input: one error item, the stream ends
            yield error_from_exception(exc).to_dict()
            return
        if self._prefix_caching:  # what the router sees of this request is now held here
            self.prefix_index.add(request_prefix_digests(request))
        # The engine's id is ours alone: a client reusing its id cannot touch another request.
        engine_id = uuid.uuid4().hex
        client_id = request.get("request_id") or engine_id
        num_logprobs = sampling.logprobs
        timer = self.metrics.timer()
        finished = False
        stream = self.engine.generate(
            prompt, sampling, request_id=engine_id, priority=int(request.get("priority", 0)),
            max_tokens_must_fit=not request.get("truncate_max_tokens", False))
        first = True
        try:
            async for out in stream:
                item = self._step_item(out, client_id, num_logprobs)
                first = timer.first_token is None
                timer.on_tokens(sum(len(c["token_ids"]) for c in item["choices"]))
                if first and timer.first_token is not None:
                    self.recent_ttft.add(timer.first_token - timer.arrival)
                finished = out.finished
                if not item["choices"] and not finished:
                    continue
                if request.get("drop_output"):  # max_tokens 0: the prompt was all it wanted
                    for c in item["choices"]:
                        c.update(text="", token_ids=[], logprobs=[] if num_logprobs is not None
                                 else None)
                    item["completion_tokens"] = 0
                if first:
                    first = False
                    self._add_prompt_fields(item, out, prompt, request, sampling.prompt_logprobs)
                yield item
                if finished:
                    timer.on_finish(out.outputs[0].finish_reason if out.outputs else None)
        except Exception as exc:  # the engine refused it, failed it, or died
            yield error_from_exception(exc).to_dict()
        finally:
            if not finished:
                # client gone or cancelled: make sure the engine frees the request's blocks
                await _quietly(stream.aclose())
                await _quietly(self.engine.abort(engine_id))

    def _add_prompt_fields(self, item: dict[str, Any], out, prompt: str | list[int],
                           request: dict[str, Any], num_prompt_logprobs: int | None) -> None:
        """On a stream's first item: the prompt's text (echo) and its logprobs (entry 0, with
        no context, has logprob None). The prompt is fully computed once a token exists."""
        if request.get("echo"):
            item["prompt_text"] = (prompt if isinstance(prompt, str)
                                   else self.tokenizer.decode(out.prompt_token_ids))
        if num_prompt_logprobs is None or out.prompt_logprobs is None:
            return
        ids = out.prompt_token_ids
        entries = [{"token_id": int(ids[0]), "token": self.tokenizer.decode([ids[0]]),
                    "logprob": None, "top": None}]
        entries += self._logprobs(ids[1:], out.prompt_logprobs[1:], num_prompt_logprobs) or []
        item["prompt_logprobs"] = entries

    def _step_item(self, out, client_id: str, num_logprobs: int | None) -> dict[str, Any]:
        choices = []
        for comp in out.outputs:
            if not comp.delta_token_ids and not comp.delta_text and comp.finish_reason is None:
                continue
            choices.append({
                "index": comp.index,
                "text": comp.delta_text,
                "token_ids": list(comp.delta_token_ids),
                "logprobs": self._logprobs(comp.delta_token_ids, comp.delta_logprobs,
                                           num_logprobs),
                "finish_reason": comp.finish_reason,
            })
        return {
            "request_id": client_id,
            "prompt_tokens": len(out.prompt_token_ids),
            "cached_tokens": out.num_cached_tokens,
            "completion_tokens": out.num_generated_tokens,
            "finished": out.finished,
            "choices": choices,
        }

    def _prompt(self, request: dict[str, Any]) -> str | list[int]:
        model = request.get("model")
        if model is not None:
            check_text("model", model)
        if model and model != self.model_name:
            raise ServeError("not_found", f"model '{model}' is not served here; this server "
                             f"serves '{self.model_name}'", "model")
        inputs = [k for k in ("prompt", "prompt_token_ids", "messages") if request.get(k) is not None]
        if len(inputs) != 1:
            raise ServeError("invalid_argument",
                             "input: exactly one of prompt, token_ids or messages is required",
                             "prompt")
        if request.get("prompt") is not None:
            if not isinstance(request["prompt"], str) or not request["prompt"]:
                raise ValueError("prompt must be a non-empty string")
            check_text("prompt", request["prompt"])
            self._check_chars("prompt", len(request["prompt"]))
            return request["prompt"]
        if request.get("prompt_token_ids") is not None:
            ids = request["prompt_token_ids"]
            vocab = len(self.tokenizer)
            if (not isinstance(ids, list) or not ids
                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
                raise ValueError("prompt_token_ids must be a non-empty list of integers")
            if any(t < 0 or t >= vocab for t in ids):
                raise ValueError(f"prompt_token_ids must be a non-empty list of ids in [0, {vocab})")
            return ids
        return self.render_chat(request["messages"], request.get("add_generation_prompt", True))

    def _check_chars(self, name: str, num_chars: int) -> None:
        """Refuse text that cannot fit the context before tokenizing it: tokenizing megabytes
        takes seconds of this replica's event loop, which every stream shares."""
        limit = self.engine.max_model_len * MAX_CHARS_PER_TOKEN
        if num_chars > limit:
            raise ValueError(f"{name}: {num_chars} characters cannot fit the model's context of "
                             f"{self.engine.max_model_len} tokens (at most {limit} characters "
                             f"are accepted)")

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of chat messages rendered with the model's chat template."""
        if not messages:
            raise ValueError("messages must be a non-empty list")
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("messages: each message needs a string role and content")
            check_text("messages", m["role"])
            check_text("messages", m["content"])
        self._check_chars("messages", sum(len(m["content"]) for m in messages))
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("messages: the model has no chat template; send a prompt instead")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        # the template already holds the special tokens (BOS...): do not add them twice
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _sampling_params(self, fields: dict[str, Any], prompt: str | list[int],
                         max_tokens_default: str | None):
        """SamplingParams from the set fields; `max_tokens_default="context"` (chat) fills an
        unset max_tokens with the room left in the context instead of SamplingParams' 16."""
        from raylm.cluster import SamplingParams

        fields = {k: v for k, v in fields.items() if v is not None}
        if "max_tokens" not in fields and max_tokens_default == "context":
            num_prompt = len(prompt) if isinstance(prompt, list) else len(
                self.tokenizer(prompt)["input_ids"])
            fields["max_tokens"] = max(1, self.engine.max_model_len - num_prompt)
        return SamplingParams(**fields)

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None,
                  num_top: int | None) -> list[dict[str, Any]] | None:
        if logprobs is None or num_top is None:
            return None
        entries = []
        for token_id, position in zip(token_ids, logprobs):
            top = sorted(position.items(), key=lambda kv: kv[1], reverse=True)[:num_top]
            entries.append({
                "token_id": int(token_id),
                "token": self.tokenizer.decode([token_id]),
                "logprob": float(position.get(token_id, float("-inf"))),
                "top": [{"token_id": int(t), "token": self.tokenizer.decode([t]), "logprob": float(lp)}
                        for t, lp in top],
            })
        return entries

    # --- other RPCs ---------------------------------------------------------------------------

    async def tokenize(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            if request.get("messages") is not None:
                ids = self.render_chat(request["messages"], request.get("add_generation_prompt", True))
            elif isinstance(request.get("text"), str):
                self._check_chars("text", len(request["text"]))
                ids = list(self.tokenizer(request["text"], add_special_tokens=request.get(
                    "add_special_tokens", True))["input_ids"])
            else:
                raise ValueError("text: one of text or chat is required")
        except Exception as exc:
            return error_from_exception(exc).to_dict()
        return {"token_ids": ids, "tokens": self.tokenizer.convert_ids_to_tokens(ids)}

    async def detokenize(self, request: dict[str, Any]) -> dict[str, Any]:
        """Text of token ids (vLLM's /detokenize); ids outside the vocabulary are an error."""
        ids = request.get("tokens")
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab] if isinstance(ids, list) else None
        if bad is None or bad:
            return ServeError("invalid_argument", f"tokens: ids must be in [0, {vocab}); got "
                              f"{bad[:5] if bad else ids!r}", "tokens").to_dict()
        return {"prompt": self.tokenizer.decode(ids)}

    async def tokenizer_info(self) -> dict[str, Any]:
        """What vLLM's GET /tokenizer_info reports: special tokens, chat template, limits."""
        tok = self.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token, "bos_token": tok.bos_token,
            "pad_token": tok.pad_token, "unk_token": tok.unk_token,
            "chat_template": getattr(tok, "chat_template", None),
            "model_max_length": int(self.engine.max_model_len),
            "vocab_size": len(tok),
        }

    async def model_info(self) -> dict[str, Any]:
        eos = self.tokenizer.eos_token_id
        return {
            "model": self.model_name,
            "max_model_len": int(self.engine.max_model_len),
            "vocab_size": len(self.tokenizer),
            "eos_token_id": int(eos) if eos is not None else 0,
            "has_chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
        }

    def get_stats(self) -> dict[str, Any]:
        """The engine's counters (tests and operators use it to check that blocks were freed),
        and which replica answered (with several replicas, a handle call lands on any one)."""
        return {**self.engine.get_stats(),
                "replica_id": serve.get_replica_context().replica_id.unique_id}

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve's router polls this (request_routing_stats_period_s): the prefixes this
        replica holds and its load, for PrefixAwareRouter. Async so that it runs on the event
        loop that updates the index, never beside it in a thread."""
        stats = self.engine.get_stats()
        self._num_routing_reports += 1
        return {"seq": self._num_routing_reports, "num_running": stats["num_running"],
                "num_waiting": stats["num_waiting"], "kv_usage": stats["kv_usage"],
                "prefix_digests": self.prefix_index.snapshot()}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve averages these over look_back_period_s for LLMAutoscalingPolicy."""
        stats = self.engine.get_stats()
        return {"num_waiting": float(stats["num_waiting"]), "kv_usage": float(stats["kv_usage"]),
                "ttft_p90_s": self.recent_ttft.percentile(0.9)}

    def check_health(self) -> None:
        """Serve calls this periodically; raising gets the replica replaced."""
        self.engine.check_health()

    # --- metrics ------------------------------------------------------------------------------

    def _ensure_stats_task(self) -> None:
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.get_running_loop().create_task(self._publish_stats())

    async def _publish_stats(self) -> None:
        while True:
            try:
                self.metrics.record_stats(self.engine.get_stats())
            except Exception:  # metrics must never take the replica down
                logger.exception("could not publish engine stats")
            await asyncio.sleep(STATS_INTERVAL_S)

    def __del__(self) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
