"""The engine loop body: add requests, step (schedule -> execute -> update), emit outputs.

Synchronous and single-threaded; LLM drives it directly, AsyncEngine from a step thread.
"""
from __future__ import annotations

import itertools
import logging
import time

from raylm.cluster.config import EngineConfig
from raylm.cluster.errors import QueueFullError
from raylm.cluster.decoding import Logprobs, make_decoder
from raylm.cluster.executor import make_executor
from raylm.cluster.input_builder import SampleGroup, build_model_input, prompt_hidden_spans
from raylm.cluster.kv_cache_manager import KVCacheManager
from raylm.cluster.output_builder import make_request_output
from raylm.cluster.outputs import RequestOutput
from raylm.cluster.request import Request, Sequence
from raylm.cluster.sampling_params import SamplingParams
from raylm.cluster.scheduler import Scheduler, SchedulerOutput
from raylm.cluster.stop_checker import StopChecker

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        t0 = time.monotonic()
        self.executor = make_executor(config)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.executor.model_path)
        except BaseException:
            self.executor.shutdown()  # worker actors must not outlive a failed start
            raise
        hf_config = self.executor.hf_config
        self.vocab_size = hf_config.vocab_size
        block_size = config.cache.block_size
        num_blocks = self.executor.num_blocks
        model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(config.model.max_model_len or model_max, model_max,
                                 num_blocks * block_size)
        self.kv = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.stop_checker = StopChecker(self.tokenizer, self.max_model_len)
        self.eos_token_ids = _eos_token_ids(self.tokenizer, self.executor.model_path)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        logger.info("engine ready in %.1fs: %s, max_model_len %d, %d KV blocks -> max %.1f "
                    "concurrent sequences at full length", time.monotonic() - t0,
                    self.executor.model_path, self.max_model_len, num_blocks,
                    num_blocks * block_size / self.max_model_len)

    # -- requests ---------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0) -> Request:
        """Tokenize and validate; raises ValueError naming the field. Does not enqueue."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            text, token_ids = None, list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
                raise ValueError("prompt_token_ids must be a list of ints")
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids: {bad[0]} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        else:
            raise ValueError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; the model's context "
                             f"(max_model_len) is {self.max_model_len}, leaving no room to generate")
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        request = Request(request_id, text, token_ids, params, priority=priority,
                          eos_token_ids=self.eos_token_ids)
        request.decoder = make_decoder(request)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
            request.cache_salt = request_id  # cached positions would have no logits
        return request

    def add_request(self, request: Request) -> None:
        limit = self.config.scheduler.max_queued_requests
        if limit is not None and len(self.scheduler.waiting) >= limit:
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests are queued "
                                 f"(max_queued_requests={limit})")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.stop_checker.attach(seq)
            self.scheduler.add(seq)
        self.num_prompt_tokens += request.num_prompt_tokens

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.aborted = True
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        request.finished_time = time.monotonic()
        return make_request_output(request, final=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- one step ---------------------------------------------------------------------------
    def step(self, emit_deltas: bool = True) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        inp, groups, prompt_seqs = build_model_input(sched, self.kv.block_size)
        out = self.executor.execute(inp)
        if out.prompt_logprobs:
            for seq, (start, *_), rows in zip(prompt_seqs, inp.prompt_logprob_rows,
                                              out.prompt_logprobs):
                self._record_prompt_logprobs(seq, inp.positions[start], rows)
        return self._update(sched, groups, out, emit_deltas)

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, first_pos: int, rows) -> None:
        """Row i predicts prompt token first_pos + 1 + i; entry 0 (no context) stays None.
        A preempted sequence recomputes its prompt: positions already recorded are kept."""
        record = seq.request.prompt_logprobs
        for i, (ids, values) in enumerate(rows):
            if first_pos + 1 + i == len(record):
                record.append(dict(zip(ids, values)))

    def _update(self, sched: SchedulerOutput, groups: list[SampleGroup], out,
                emit_deltas: bool) -> list[RequestOutput]:
        now = time.monotonic()
        for s in sched.scheduled:
            self.kv.cache_full_blocks(s.seq)
        if out.token_hidden_states is not None:
            first = 0
            for span in prompt_hidden_spans(sched):
                span.seq.request.decoder.on_prompt_hidden_states(
                    span.seq, span.first_pos, out.token_hidden_states[first:first + span.num_rows])
                first += span.num_rows
        touched: dict[str, Request] = {}
        for g in groups:
            seq, request = g.seq, g.seq.request
            if seq.is_finished:
                continue
            rows = range(g.first_row, g.first_row + g.num_rows)
            tokens = [out.sampled_token_ids[r] for r in rows]
            lps = [out.logprobs[r] if out.logprobs is not None else None for r in rows]
            hidden = out.hidden_states[g.first_row] if out.hidden_states is not None else None
            if request.first_token_time is None:
                request.first_token_time = now
            request.decoder.on_sampled(seq, tokens, lps, hidden, self)
            touched[request.request_id] = request
        outputs = []
        for request in touched.values():
            if request.is_finished:
                request.finished_time = now
                self.requests.pop(request.request_id, None)
                outputs.append(make_request_output(request, final=True))
            elif emit_deltas:
                request.num_unstreamed_steps += 1
                first = request.num_unstreamed_steps == 1 and not request.streamed_any
                if first or request.num_unstreamed_steps >= self.config.stream_interval:
                    request.num_unstreamed_steps = 0
                    request.streamed_any = True
                    outputs.append(make_request_output(request, final=False))
        return outputs

    # -- EngineOps: how decoders change sequences --------------------------------------------
    def append_token(self, seq: Sequence, token: int, logprobs: Logprobs | None) -> bool:
        seq.token_ids.append(token)
        self.num_generation_tokens += 1
        if logprobs is not None:
            ids, values = logprobs
            seq.cumulative_logprob += values[0]
            seq.output_logprobs.append(dict(zip(ids, values)))
        finish = self.stop_checker.check(seq, token)
        if finish is not None:
            self.scheduler.finish(seq, *finish)
            return True
        return False

    def fork(self, seq: Sequence, index: int) -> Sequence:
        child = Sequence(seq.request, list(seq.token_ids), seq.num_prompt_tokens, index=index)
        child.cumulative_logprob = seq.cumulative_logprob
        child.output_logprobs = list(seq.output_logprobs)
        child.num_cached_tokens = seq.num_cached_tokens
        child.detokenizer = seq.detokenizer.clone()
        self.kv.fork(seq, child)
        seq.request.seqs.append(child)
        self.scheduler.add_running(child)
        return child

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        if not seq.is_finished:
            self.scheduler.finish(seq, reason, stop_reason)

    # -- introspection ----------------------------------------------------------------------
    def get_stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_free_blocks": self.kv.num_free_blocks,
            "num_total_blocks": self.kv.num_total_blocks,
            "kv_usage": self.kv.usage,
            "prefix_cache_hit_rate": self.kv.prefix_hit_rate,
            "prefix_cache_hit_tokens": self.kv.num_hit_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generation_tokens": self.num_generation_tokens,
            **self.executor.get_stats(),
        }

    def check_integrity(self) -> None:
        self.kv.check_integrity()

    def check_health(self) -> None:
        """Raise if the executor lost a worker (cheap: no step is run)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()


def _eos_token_ids(tokenizer, model_path) -> frozenset[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_path)
        eos = gen.eos_token_id
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    except OSError:
        pass
    return frozenset(ids)
