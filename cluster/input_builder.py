"""Turns a SchedulerOutput into the runner's ModelInput (flattened, host lists; pure Python)."""
from __future__ import annotations

from raylm.cluster.request import Sequence
from raylm.cluster.scheduler import SchedulerOutput
from raylm.workers.model_input import ModelInput, SamplingMetadata


def build_sampling_metadata(rows: list[tuple[Sequence, int]]) -> SamplingMetadata:
    """One entry per sampled row: (sequence, index of the output token being sampled)."""
    params = [seq.request.params for seq, _ in rows]
    seeds = []
    for (seq, _), p in zip(rows, params):
        # Each of a request's n sequences draws its own stream from the one seed.
        seeds.append(None if p.seed is None else p.seed * 1_000_003 + seq.index)
    meta = SamplingMetadata(
        temperature=[p.temperature for p in params],
        top_k=[p.top_k for p in params],
        top_p=[p.top_p for p in params],
        min_p=[p.min_p for p in params],
        repetition_penalty=[p.repetition_penalty for p in params],
        presence_penalty=[p.presence_penalty for p in params],
        frequency_penalty=[p.frequency_penalty for p in params],
        seeds=seeds,
        step_ids=[step for _, step in rows],
        num_logprobs=[-1 if p.logprobs is None else p.logprobs for p in params],
    )
    banned = [_banned_ids(seq, step) for seq, step in rows]
    if any(banned):
        meta.banned_token_ids = banned
    if meta.needs_penalties:
        meta.prompt_token_ids = [seq.prompt_token_ids for seq, _ in rows]
        meta.output_token_ids = [seq.output_token_ids for seq, _ in rows]
    return meta


def _banned_ids(seq: Sequence, step: int) -> list[int]:
    """Before min_tokens, the tokens that would end the sequence cannot be sampled (as HF)."""
    p = seq.request.params
    if step >= p.min_tokens:
        return []
    ids = list(p.stop_token_ids or [])
    if not p.ignore_eos:
        ids.extend(seq.request.eos_token_ids)
    return ids


def build_model_input(sched: SchedulerOutput, block_size: int) -> tuple[ModelInput, list[Sequence]]:
    """Returns the step's ModelInput and, per sampled row, the sequence it samples for."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_lens, seq_lens, block_tables, logits_indices = [], [], [], []
    sample_rows: list[tuple[Sequence, int]] = []
    for s in sched.scheduled:
        seq, start, n = s.seq, s.start_pos, s.num_new_tokens
        end = start + n
        blocks = seq.block_ids
        input_ids.extend(seq.token_ids[start:end])
        if n == 1:
            positions.append(start)
            slot_mapping.append(blocks[start // block_size] * block_size + start % block_size)
        else:
            pos = range(start, end)
            positions.extend(pos)
            slot_mapping.extend([blocks[p // block_size] * block_size + p % block_size for p in pos])
        query_lens.append(n)
        seq_lens.append(end)
        block_tables.append(blocks)
        if s.samples:
            logits_indices.append(len(input_ids) - 1)
            sample_rows.append((seq, seq.num_output_tokens))
    inp = ModelInput(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=block_tables,
        logits_indices=logits_indices,
        sampling=build_sampling_metadata(sample_rows),
        copy_blocks=list(sched.copy_blocks),
    )
    return inp, [seq for seq, _ in sample_rows]
