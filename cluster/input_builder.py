"""Turns a SchedulerOutput into the runner's ModelInput (flattened, host lists; pure Python)."""
from __future__ import annotations

from dataclasses import dataclass

from raylm.cluster.request import Sequence
from raylm.cluster.scheduler import SchedulerOutput
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
    p = seq.request.params
    if step >= p.min_tokens:
        return []
    ids = list(p.stop_token_ids or [])
    if not p.ignore_eos:
        ids.extend(seq.request.eos_token_ids)
    return ids


def build_sampling_metadata(groups: list[SampleGroup]) -> SamplingMetadata:
    cols: dict[str, list] = {k: [] for k in (
        "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty", "seeds", "step_ids", "num_logprobs")}
    banned, row_seqs = [], []
    for g in groups:
        seq, p, decoder = g.seq, g.seq.request.params, g.seq.request.decoder
        greedy = decoder.is_greedy_row(seq)
        for i in range(g.num_rows):
            # Verification rows score successive positions; n > 1 rows share one position.
            step = seq.num_output_tokens + (i if g.spec_token_ids else 0)
            cols["temperature"].append(0.0 if greedy else p.temperature)
            cols["top_k"].append(0 if greedy else p.top_k)
            cols["top_p"].append(1.0 if greedy else p.top_p)
            cols["min_p"].append(0.0 if greedy else p.min_p)
            cols["repetition_penalty"].append(p.repetition_penalty)
            cols["presence_penalty"].append(p.presence_penalty)
            cols["frequency_penalty"].append(p.frequency_penalty)
            # Each of a request's n sequences draws its own stream from the one seed.
            stream = seq.index + (0 if g.spec_token_ids else i)
            cols["seeds"].append(None if p.seed is None else p.seed * 1_000_003 + stream)
            cols["step_ids"].append(step)
            cols["num_logprobs"].append(decoder.num_logprobs(seq))
            banned.append(_banned_ids(seq, step))
            row_seqs.append(seq)
    meta = SamplingMetadata(**cols)
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
