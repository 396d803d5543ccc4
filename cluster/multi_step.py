"""Multi-step decode: several greedy decode steps of one batch in one executor call.

A batch-1 decode step on the 2-core CPU takes ~3.8 ms, of which ~0.26 ms is the Python around
the compiled step (the previous step's update, scheduling, the step's inputs and tensors). When
the batch is nothing but plain greedy decode rows and nothing waits to be admitted, the next
steps' inputs are known in advance: each feeds the last one's tokens one position on. The engine
then reserves the KV slots of up to ``SchedulerConfig.max_decode_steps`` steps, the executor runs
them in one call (workers/models/llama_cpu_step.py: the compiled CPU step loops in C++), and the
engine applies each step's tokens in order as if they had come one step at a time.

Only where nobody streams (``LLM.generate``: ``EngineCore.step(emit_deltas=False)``): a served
stream keeps its one-token deltas and an arriving request its admission at the next step. The
tokens are the one-step engine's, bitwise (the same compiled step on the same inputs). What a
run may cost: the steps after a sequence stops on a stop string (the run ends early on a stop
token id; max_tokens and max_model_len bound its length); their KV lands in the sequence's own
reserved blocks, freed with it.
"""
from __future__ import annotations

from raylm.cluster.decoding import SamplingDecoder
from raylm.cluster.kv_cache_manager import KVCacheManager
from raylm.cluster.scheduler import SchedulerOutput
from raylm.cluster.stop_checker import ending_token_ids
from raylm.workers.model_input import ModelInput


def plan_run(sched: SchedulerOutput, inp: ModelInput, kv: KVCacheManager, max_steps: int,
             max_model_len: int) -> int:
    """How many decode steps this step's executor call may run (1: the step alone). Above 1 the
    KV slots of every step are reserved and ``inp`` carries the run (num_steps, stop ids)."""
    if max_steps <= 1 or not _decode_batch(sched, inp):
        return 1
    steps = max_steps
    for s in sched.scheduled:
        seq, p = s.seq, s.seq.request.params
        # after step j the sequence has num_output_tokens + j + 1 tokens: stop at the limit
        steps = min(steps, p.max_tokens - seq.num_output_tokens, max_model_len - seq.num_tokens)
    if steps <= 1:
        return 1
    for s in sched.scheduled:
        # The scheduler counted this step's token as computed: the later steps feed positions
        # num_tokens .. num_tokens + steps - 2.
        copies = kv.allocate_slots(s.seq, steps - 1)
        if copies is None:
            return 1  # what was reserved for earlier rows stays theirs: their next steps use it
        assert not copies, "a plain greedy sequence shares no partial block"
    inp.block_tables = [s.seq.block_ids for s in sched.scheduled]
    inp.num_steps = steps
    # the ids that end a sequence now (none before min_tokens: then the run goes on; the
    # engine's stop rules still apply to every token)
    inp.stop_token_ids = [ending_token_ids(s.seq)
                          if s.seq.num_output_tokens >= s.seq.request.params.min_tokens else []
                          for s in sched.scheduled]
    return steps


def next_step(sched: SchedulerOutput) -> None:
    """The run's next step fed each running sequence's last token: count it as computed."""
    for s in sched.scheduled:
        if not s.seq.is_finished:
            s.seq.num_computed_tokens += 1


def _decode_batch(sched: SchedulerOutput, inp: ModelInput) -> bool:
    """Every row a plain greedy decode (one token fed, one argmax drawn, no grammar, n = 1) and
    nothing else asked of the step."""
    if (sched.copy_blocks or sched.preempted or inp.num_tokens != inp.num_seqs
            or len(inp.logits_indices) != inp.num_seqs or not inp.sampling.argmax_only
            or inp.return_hidden_states or inp.hidden_state_rows or inp.prompt_logprob_rows
            or inp.spec_groups or inp.return_sampling_probs):
        return False
    for s in sched.scheduled:
        seq = s.seq
        decoder = seq.request.decoder
        if (s.num_new_tokens != 1 or not s.samples or seq.spec_token_ids
                or seq.grammar is not None or type(decoder) is not SamplingDecoder
                or decoder.num_samples(seq) != 1 or len(seq.request.seqs) != 1):
            return False
    return True
