"""Turns a SchedulerOutput into the runner's ModelInput (flattened, host lists; pure Python)."""
from __future__ import annotations

from dataclasses import dataclass

from raylm.cluster.request import Sequence
from raylm.cluster.scheduler import SchedulerOutput
from raylm.cluster.stop_checker import ending_token_ids
from raylm.workers.model_input import ModelInput, SamplingMetadata


@dataclass
class SampleGroup:
    """The sampled rows [first_row, first_row + num_rows) of one sequence's logits row."""

    seq: Sequence
    first_row: int
    num_rows: int
    # Speculative verification: the drafts fed after the sequence's tokens; row j scores the
    # position after draft j - 1 (row 0: after the last real token).
    spec_token_ids: tuple[int, ...] = ()


@dataclass
class HiddenSpan:
    """Prompt rows of one sequence whose hidden states its decoder wants: positions
    [first_pos, first_pos + num_rows) are token rows [first_row, first_row + num_rows)."""

    seq: Sequence
    first_pos: int
    first_row: int
    num_rows: int


def prompt_hidden_spans(sched: SchedulerOutput) -> list[HiddenSpan]:
    """In step order; ModelOutput.token_hidden_states holds their rows one span after another."""
    spans, row = [], 0
    for s in sched.scheduled:
        end = min(s.start_pos + s.num_new_tokens, s.seq.num_prompt_tokens)
        if end > s.start_pos and s.seq.request.decoder.wants_prompt_hidden_states(s.seq):
            spans.append(HiddenSpan(s.seq, s.start_pos, row, end - s.start_pos))
        row += s.num_new_tokens
    return spans


def _banned_ids(seq: Sequence, step: int) -> list[int]:
    """Before min_tokens, the tokens that would end the sequence cannot be sampled (as HF)."""
    return ending_token_ids(seq) if step < seq.request.params.min_tokens else []


def build_sampling_metadata(groups: list[SampleGroup]) -> SamplingMetadata:
    """Per-row columns, built column by column over the groups (one comprehension each, no
    per-row appends): at a few hundred running sequences this is on every step's path."""
    seqs = [g.seq for g in groups]
    params = [seq.request.params for seq in seqs]
    greedy = [seq.request.decoder.is_greedy_row(seq) for seq in seqs]
    counts = [g.num_rows for g in groups]
    if all(c == 1 for c in counts):
        def rows(values: list) -> list:
            return values
    else:
        def rows(values: list) -> list:
            return [v for v, c in zip(values, counts) for _ in range(c)]
    # Verification rows score successive positions; n > 1 rows share one position and each of a
    # request's n sequences draws its own stream from the one seed.
    base_steps = [seq.num_output_tokens for seq in seqs]
    steps, streams = [], []
    for g, step in zip(groups, base_steps):
        if g.num_rows == 1:
            steps.append(step)
            streams.append(g.seq.index)
        elif g.spec_token_ids:
            steps.extend(range(step, step + g.num_rows))
            streams.extend([g.seq.index] * g.num_rows)
        else:
            steps.extend([step] * g.num_rows)
            streams.extend(range(g.seq.index, g.seq.index + g.num_rows))
    row_params = rows(params)
    row_greedy = rows(greedy)
    meta = SamplingMetadata(
        temperature=[0.0 if gr else p.temperature for p, gr in zip(row_params, row_greedy)],
        top_k=[0 if gr else p.top_k for p, gr in zip(row_params, row_greedy)],
        top_p=[1.0 if gr else p.top_p for p, gr in zip(row_params, row_greedy)],
        min_p=[0.0 if gr else p.min_p for p, gr in zip(row_params, row_greedy)],
        repetition_penalty=[p.repetition_penalty for p in row_params],
        presence_penalty=[p.presence_penalty for p in row_params],
        frequency_penalty=[p.frequency_penalty for p in row_params],
        seeds=[None if p.seed is None else p.seed * 1_000_003 + st
               for p, st in zip(row_params, streams)],
        step_ids=steps,
        num_logprobs=rows([seq.request.decoder.num_logprobs(seq) for seq in seqs]),
    )
    row_seqs = rows(seqs)
    if any(p.min_tokens > st for p, st in zip(row_params, steps)):
        banned = [_banned_ids(seq, st) for seq, st in zip(row_seqs, steps)]
        if any(banned):
            meta.banned_token_ids = banned
    if meta.needs_penalties:
        meta.prompt_token_ids = [seq.prompt_token_ids for seq in row_seqs]
        # A verification row's history includes the drafts before its position.
        meta.output_token_ids = [g.seq.output_token_ids + list(g.spec_token_ids[:i])
                                 for g in groups for i in range(g.num_rows)]
    return meta


def build_model_input(sched: SchedulerOutput, block_size: int
                      ) -> tuple[ModelInput, list[SampleGroup], list[Sequence]]:
    """Returns the step's ModelInput, per sequence that samples its rows of the logits, and the
    sequences of ModelInput.prompt_logprob_rows in order."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_lens, seq_lens, block_tables, logits_indices = [], [], [], []
    groups: list[SampleGroup] = []
    prompt_rows: list[tuple[int, int, int, list[int]]] = []
    prompt_seqs: list[Sequence] = []
    spec_groups: list[tuple[int, list[int]]] = []
    want_hidden = False
    for s in sched.scheduled:
        seq, start, n = s.seq, s.start_pos, s.num_new_tokens
        end = start + n
        blocks = seq.block_ids
        spec = seq.spec_token_ids
        input_ids.extend((seq.token_ids + spec)[start:end] if spec else seq.token_ids[start:end])
        if n == 1:
            positions.append(start)
            slot_mapping.append(blocks[start // block_size] * block_size + start % block_size)
        else:
            pos = range(start, end)
            positions.extend(pos)
            slot_mapping.extend([blocks[p // block_size] * block_size + p % block_size for p in pos])
        top_n = seq.request.params.prompt_logprobs
        last = min(end, seq.num_prompt_tokens - 1)  # rows predicting a prompt token
        if top_n is not None and start < last:
            first_row = len(input_ids) - n
            prompt_rows.append((first_row, last - start, top_n, seq.token_ids[start + 1 : last + 1]))
            prompt_seqs.append(seq)
        query_lens.append(n)
        seq_lens.append(end)
        block_tables.append(blocks)
        if s.samples and spec:
            num_rows = len(spec) + 1
            spec_groups.append((len(logits_indices), list(spec)))
            groups.append(SampleGroup(seq, len(logits_indices), num_rows, tuple(spec)))
            logits_indices.extend(range(len(input_ids) - num_rows, len(input_ids)))
        elif s.samples:
            decoder = seq.request.decoder
            num_rows = decoder.num_samples(seq)
            groups.append(SampleGroup(seq, len(logits_indices), num_rows))
            logits_indices.extend([len(input_ids) - 1] * num_rows)
            want_hidden = want_hidden or decoder.wants_hidden_states(seq)
    inp = ModelInput(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=block_tables,
        logits_indices=logits_indices,
        sampling=build_sampling_metadata(groups),
        copy_blocks=list(sched.copy_blocks),
        return_hidden_states=want_hidden,
        hidden_state_rows=[sp.first_row + i for sp in prompt_hidden_spans(sched)
                           for i in range(sp.num_rows)],
        prompt_logprob_rows=prompt_rows,
        spec_groups=spec_groups,
    )
    return inp, groups, prompt_seqs
