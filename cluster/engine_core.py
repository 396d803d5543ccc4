"""The engine loop body: add requests, step (schedule -> execute -> update), emit outputs.

Synchronous and single-threaded; LLM drives it directly, AsyncEngine from a step thread.
"""
from __future__ import annotations

import itertools
import logging
import time

from raylm.cluster.config import EngineConfig, auto_stream_interval
from raylm.cluster.errors import QueueFullError
from raylm.cluster.decoding import Logprobs
from raylm.cluster.executor import make_executor
from raylm.cluster.grammar_matcher import GrammarMatchers
from raylm.cluster.input_builder import SampleGroup, build_model_input, prompt_hidden_spans
from raylm.cluster.kv_cache_manager import KVCacheManager
from raylm.cluster import multi_step
from raylm.cluster.output_builder import make_request_output
from raylm.cluster.outputs import RequestOutput
from raylm.cluster.request import Request, Sequence
from raylm.cluster.request_factory import RequestFactory
from raylm.cluster.sampling_params import SamplingParams
from raylm.cluster.scheduler import Scheduler, SchedulerOutput
from raylm.cluster.speculation import Speculator
from raylm.cluster.stop_checker import StopChecker
from raylm.workers.model_input import ModelOutput

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
        self.speculator = None
        # several greedy decode steps per executor call where nobody streams (multi_step.py)
        self._multi_step = (bool(self.executor.info.get("multi_step_decode"))
                            and config.speculative is None)
        if config.speculative is not None:
            draft = None
            if config.speculative.method == "draft_model":
                from raylm.cluster.draft_proposer import DraftProposer

                draft = DraftProposer(config.speculative.model, config, num_blocks,
                                      self.tokenizer)
            self.speculator = Speculator(config.speculative, self.max_model_len, draft)
        self.intake = RequestFactory(self.tokenizer, self.executor.model_path, self.vocab_size,
                                     self.max_model_len, config.scheduler.max_num_seqs)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        # RequestOutputs handed out (streamed deltas and final outputs): per generated token,
        # what stream_interval saves in messages
        self.num_stream_outputs = 0
        self.num_delta_steps = 0  # steps taken up to now: streams get deltas on its multiples
        # executor calls and the model steps they ran (more than the calls: multi-step runs)
        self.num_executor_calls = 0
        self.num_model_steps = 0
        self.num_aborted = 0  # requests ended by their caller (cancel, disconnect)
        self.num_failed = 0  # requests ended by an error in their own processing
        logger.info("engine ready in %.1fs: %s, max_model_len %d, %d KV blocks -> max %.1f "
                    "concurrent sequences at full length", time.monotonic() - t0,
                    self.executor.model_path, self.max_model_len, num_blocks,
                    num_blocks * block_size / self.max_model_len)

    # -- requests ---------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0,
                     max_tokens_must_fit: bool = False, prompt_text: str | None = None) -> Request:
        """A validated Request (see RequestFactory.make); does not enqueue."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        return self.intake.make(prompt, params, request_id, priority,
                                max_tokens_must_fit=max_tokens_must_fit, prompt_text=prompt_text)

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
        self.num_aborted += 1
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        request.finished_time = time.monotonic()
        try:
            return make_request_output(request, final=True)
        except Exception:  # noqa: BLE001 - its caller is gone; the blocks are freed already
            logger.exception("could not build the final output of aborted %s", request_id)
            return None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- one step ---------------------------------------------------------------------------
    def step(self, emit_deltas: bool = True) -> list[RequestOutput]:
        """One batch. A fault in one request's own work (its input, its sampled tokens, its
        output) ends that request with an error output; only faults of the executor, which
        runs the whole batch, propagate (the engine is then dead)."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self._num_base_tokens())
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        draft_probs = self.speculator.fill_drafts(sched) if self.speculator is not None else None
        step_start = time.perf_counter()  # the target's step; fill_drafts times the draft
        failed: list[RequestOutput] = []
        try:
            inp, groups, prompt_seqs = build_model_input(sched, self.kv.block_size)
        except Exception:  # noqa: BLE001 - find the request(s) at fault, run the rest
            failed = self._fail_bad_inputs(sched)
            if sched.is_empty:
                return failed
            inp, groups, prompt_seqs = build_model_input(sched, self.kv.block_size)
            # q's rows followed the dropped sequences too; point-mass verification of the same
            # drafts is still lossless (only less accepting).
            draft_probs = None
        inp.spec_draft_probs = draft_probs
        if self.intake.grammars is not None:
            mask = self.intake.grammars.step_bitmask(groups)
            if mask is not None:
                inp.sampling.grammar_rows, inp.sampling.grammar_bitmask = mask
        if not emit_deltas and self._multi_step and not self.scheduler.waiting:
            multi_step.plan_run(sched, inp, self.kv, self.config.scheduler.max_decode_steps,
                                self.max_model_len)
        out = self.executor.execute(inp)
        self.num_executor_calls += 1
        self.num_model_steps += 1 + len(out.more_steps)
        if self.speculator is not None:
            self.speculator.observe_step(inp.num_tokens, time.perf_counter() - step_start)
        if out.prompt_logprobs:
            for seq, (start, *_), rows in zip(prompt_seqs, inp.prompt_logprob_rows,
                                              out.prompt_logprobs):
                self._guarded(seq.request, failed, self._record_prompt_logprobs,
                              seq, inp.positions[start], rows)
        outputs = self._update(sched, groups, out, emit_deltas, failed)
        for tokens in out.more_steps:  # a multi-step run: its later steps, in order
            multi_step.next_step(sched)
            outputs += self._update(sched, groups, ModelOutput(sampled_token_ids=tokens),
                                    emit_deltas, failed)
        return failed + outputs

    def _num_base_tokens(self) -> int:
        """Tokens the next step feeds without speculation (an estimate for the k policy). Stops
        counting at the budget: a long waiting queue costs nothing per step."""
        budget = self.config.scheduler.max_num_batched_tokens
        gap = sum(s.num_tokens - s.num_computed_tokens for s in self.scheduler.running)
        for seq in self.scheduler.waiting:
            if gap >= budget:
                break
            gap += seq.num_tokens
        return min(gap, budget)

    def _fail_bad_inputs(self, sched: SchedulerOutput) -> list[RequestOutput]:
        """Build each scheduled sequence's input alone; fail the requests whose input cannot be
        built and drop them from `sched` (copies into their freed blocks are harmless)."""
        failed = []
        for s in list(sched.scheduled):
            request = s.seq.request
            if request.is_finished:
                continue
            try:
                build_model_input(SchedulerOutput(scheduled=[s]), self.kv.block_size)
            except Exception as exc:  # noqa: BLE001 - this request's fault alone
                failed.append(self._fail(request, exc))
        sched.scheduled = [s for s in sched.scheduled if not s.seq.is_finished]
        if not failed:
            raise RuntimeError("the step's input failed to build, but no single request's did")
        return failed

    def _guarded(self, request: Request, failed: list[RequestOutput], fn, *args) -> bool:
        """Run one request's piece of step work; on an exception fail that request alone."""
        if request.is_finished:
            return False
        try:
            fn(*args)
            return True
        except Exception as exc:  # noqa: BLE001 - reported to that request's caller
            failed.append(self._fail(request, exc))
            return False

    def _fail(self, request: Request, exc: BaseException) -> RequestOutput:
        """End a request after an unexpected error in its own processing; free its blocks."""
        logger.error("request %s failed; the engine goes on", request.request_id, exc_info=exc)
        self.requests.pop(request.request_id, None)
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "error")
        request.finished_time = time.monotonic()
        self.num_failed += 1
        # No detokenizing here: that may be what failed. The message names no file or code.
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, [],
                             finished=True,
                             error=f"the engine failed while processing this request "
                                   f"({type(exc).__name__})")

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, first_pos: int, rows) -> None:
        """Row i predicts prompt token first_pos + 1 + i; entry 0 (no context) stays None.
        A preempted sequence recomputes its prompt: positions already recorded are kept."""
        record = seq.request.prompt_logprobs
        for i, (ids, values) in enumerate(rows):
            if first_pos + 1 + i == len(record):
                record.append(dict(zip(ids, values)))

    def _update(self, sched: SchedulerOutput, groups: list[SampleGroup], out,
                emit_deltas: bool, failed: list[RequestOutput]) -> list[RequestOutput]:
        now = time.monotonic()
        for s in sched.scheduled:
            if not s.seq.is_finished and not s.seq.spec_token_ids:  # speculators: after accept
                self.kv.cache_full_blocks(s.seq)
        if out.token_hidden_states is not None:
            first = 0
            for span in prompt_hidden_spans(sched):
                rows = out.token_hidden_states[first:first + span.num_rows]
                self._guarded(span.seq.request, failed, span.seq.request.decoder.on_prompt_hidden_states,
                              span.seq, span.first_pos, rows)
                first += span.num_rows
        touched: dict[str, Request] = {}
        for g in groups:
            seq, request = g.seq, g.seq.request
            if seq.is_finished or request.is_finished:
                continue
            rows = range(g.first_row, g.first_row + g.num_rows)
            tokens = [out.sampled_token_ids[r] for r in rows]
            lps = [out.logprobs[r] if out.logprobs is not None else None for r in rows]
            hidden = out.hidden_states[g.first_row] if out.hidden_states is not None else None
            if request.first_token_time is None:
                request.first_token_time = now
            if g.spec_token_ids:
                done = self._guarded(request, failed, self.speculator.accept, seq, tokens, self,
                                     self.kv)
            else:
                done = self._guarded(request, failed, request.decoder.on_sampled,
                                     seq, tokens, lps, hidden, self)
            if done:
                touched[request.request_id] = request
        outputs = []
        interval = self._stream_interval() if emit_deltas else 1
        self.num_delta_steps += 1
        for request in touched.values():
            if request.request_id not in self.requests:
                continue  # failed after it was touched
            try:
                emitted = self._request_output(request, now, emit_deltas, interval)
                self.num_stream_outputs += len(emitted)
                outputs.extend(emitted)
            except Exception as exc:  # noqa: BLE001 - e.g. detokenizing its text
                failed.append(self._fail(request, exc))
        return outputs

    def _stream_interval(self) -> int:
        """Steps per streamed delta this step (the config's, or the "auto" policy's for the
        number of requests running now)."""
        if self.config.stream_interval != "auto":
            return self.config.stream_interval
        return auto_stream_interval(len(self.scheduler.running), self.config.model.device)

    def _request_output(self, request: Request, now: float, emit_deltas: bool, interval: int
                        ) -> list[RequestOutput]:
        if request.is_finished:
            request.finished_time = now
            out = make_request_output(request, final=True)
            self.requests.pop(request.request_id, None)
            return [out]
        # A stream's first delta goes at once, later ones on every interval-th step of the
        # engine: all streams on the same steps, so the consumer wakes once per interval.
        if emit_deltas and (not request.streamed_any or self.num_delta_steps % interval == 0):
            request.streamed_any = True
            return [make_request_output(request, final=False)]
        return []

    # -- EngineOps: how decoders change sequences --------------------------------------------
    def append_token(self, seq: Sequence, token: int, logprobs: Logprobs | None) -> bool:
        seq.token_ids.append(token)
        self.num_generation_tokens += 1
        if logprobs is not None:
            ids, values = logprobs
            seq.cumulative_logprob += values[0]
            seq.output_logprobs.append(dict(zip(ids, values)))
        grammar_done = seq.grammar is not None and GrammarMatchers.advance(seq.grammar, token)
        finish = self.stop_checker.check(seq, token)
        if grammar_done and (finish is None or finish[0] == "length"):
            # Complete: only EOS could follow, so end now (one step sooner) as if it came.
            if finish is None:
                seq.detokenizer.flush()
            finish = ("stop", None)
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
        if seq.grammar is not None:
            child.grammar = GrammarMatchers.fork(seq.grammar)
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
            "num_stream_outputs": self.num_stream_outputs,
            "num_executor_calls": self.num_executor_calls,
            "num_model_steps": self.num_model_steps,
            "num_aborted": self.num_aborted,
            "num_failed": self.num_failed,
            **self.executor.get_stats(),
            **(self.intake.grammars.get_stats() if self.intake.grammars is not None else {}),
            **(self.speculator.get_stats() if self.speculator is not None else {}),
        }

    def check_integrity(self) -> None:
        self.kv.check_integrity()

    def check_health(self) -> None:
        """Raise if the executor lost a worker (cheap: no step is run). A lost draft worker
        only turns speculation off."""
        self.executor.check_health()
        if self.speculator is not None:
            self.speculator.check()

    def shutdown(self) -> None:
        if self.speculator is not None and self.speculator.draft is not None:
            self.speculator.draft.close()
        self.executor.shutdown()
