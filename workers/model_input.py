"""The step contract between the scheduler (cluster/) and the model runner (workers/).

Plain Python, no torch: the scheduler builds it, the runner turns it into tensors once per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingMetadata:
    """Per sampled row (row i of the logits) sampling parameters, as host lists."""

    temperature: list[float]  # 0.0 = greedy
    top_k: list[int]  # 0 = off
    top_p: list[float]  # 1.0 = off
    min_p: list[float]  # 0.0 = off
    repetition_penalty: list[float]  # 1.0 = off (HF semantics: prompt + output tokens)
    presence_penalty: list[float]  # 0.0 = off (OpenAI semantics: output tokens)
    frequency_penalty: list[float]  # 0.0 = off
    seeds: list[int | None]  # None = engine RNG; else randomness derived from (seed, step_ids[i])
    step_ids: list[int]  # index of the output token being sampled (num output tokens so far)
    num_logprobs: list[int]  # -1 = none; N >= 0 = the chosen token's logprob + top-N
    # Token histories, only filled when some row uses a penalty (else None).
    prompt_token_ids: list[list[int]] | None = None
    output_token_ids: list[list[int]] | None = None
    # Per row, token ids masked out before sampling (EOS / stop ids before min_tokens), or None.
    banned_token_ids: list[list[int]] | None = None
    # Structured output: rows whose tokens a grammar restricts, and their allowed tokens
    # (np.ndarray [len(grammar_rows), ceil(vocab / 32)] int32; bit t % 32 of word t // 32).
    grammar_rows: list[int] | None = None
    grammar_bitmask: object | None = None

    @property
    def num_rows(self) -> int:
        return len(self.temperature)

    @property
    def all_greedy(self) -> bool:
        return all(t == 0.0 for t in self.temperature)

    @property
    def needs_penalties(self) -> bool:
        return any(r != 1.0 for r in self.repetition_penalty) or any(
            p != 0.0 for p in self.presence_penalty
        ) or any(f != 0.0 for f in self.frequency_penalty)

    @property
    def max_num_logprobs(self) -> int:
        return max(self.num_logprobs, default=-1)

    @property
    def argmax_only(self) -> bool:
        """Every row's token is the argmax of its raw logits and nothing else is asked: no
        logprobs, penalties, grammar or banned tokens (what Sampler's greedy rows then do)."""
        return (self.max_num_logprobs < 0 and self.all_greedy and not self.grammar_rows
                and not (self.banned_token_ids and any(self.banned_token_ids))
                and not self.needs_penalties)


@dataclass
class ModelInput:
    """One step: the tokens to feed for each scheduled sequence and where their KV goes."""

    input_ids: list[int]  # [num_tokens]
    positions: list[int]  # [num_tokens]
    slot_mapping: list[int]  # [num_tokens], flat KV slot of each token
    query_lens: list[int]  # [num_seqs], tokens fed this step
    seq_lens: list[int]  # [num_seqs], cached tokens after this step
    block_tables: list[list[int]]  # [num_seqs][num_blocks_of_seq]
    logits_indices: list[int]  # [num_sampled], token rows whose logits are sampled
    sampling: SamplingMetadata  # one entry per logits index
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before forward
    return_hidden_states: bool = False  # return the final normed hidden state of sampled rows
    # Prompt logprobs: (first token row, num rows, top-N, the prompt token each row predicts).
    prompt_logprob_rows: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    # Token rows (into input_ids) whose final normed hidden states come back as
    # ModelOutput.token_hidden_states, whether or not they sample (contrastive search's prompt).
    hidden_state_rows: list[int] = field(default_factory=list)
    # Speculative verification: per sequence (first logits row, its draft token ids). Its
    # len(drafts) + 1 rows score the positions after the last real token and after each draft;
    # ModelOutput.sampled_token_ids then holds the emitted tokens on those rows, -1 past them.
    spec_groups: list[tuple[int, list[int]]] = field(default_factory=list)
    # The draft model's q for each spec group's drafts ([num_groups, k_max, vocab] tensor), when
    # some group samples; None = point-mass proposals (n-gram) or greedy-only verification.
    spec_draft_probs: object | None = None
    # Return the processed distribution each sampled row drew from (the draft model's q).
    return_sampling_probs: bool = False
    # Multi-step decode (a decode batch of plain greedy rows, cluster/multi_step.py): run up to
    # this many steps, each feeding the last one's tokens; the block tables already hold every
    # position the run reaches. The runner may run fewer (ModelOutput.more_steps says how many).
    num_steps: int = 1
    # [num_sampled] per row, the token ids after which that row needs no more steps (the run
    # ends once every row has produced one of its own); only read when num_steps > 1.
    stop_token_ids: list[list[int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


@dataclass
class ModelOutput:
    """What the runner hands back, on the host."""

    sampled_token_ids: list[int]  # [num_sampled]
    # A multi-step run's tokens after the first step: [steps - 1][num_sampled]
    more_steps: list[list[int]] = field(default_factory=list)
    # When logprobs were asked: per sampled row, (ids, logprobs) with the chosen token first,
    # then the top-N; None for rows that did not ask.
    logprobs: list[tuple[list[int], list[float]] | None] | None = None
    hidden_states: object | None = None  # torch.Tensor [num_sampled, hidden] when asked
    # Per prompt_logprob_rows entry, per row: (ids, logprobs), the actual next prompt token first.
    prompt_logprobs: list[list[tuple[list[int], list[float]]]] | None = None
    token_hidden_states: object | None = None  # torch.Tensor [len(hidden_state_rows), hidden]
    sampling_probs: object | None = None  # torch.Tensor [num_sampled, vocab] when asked
