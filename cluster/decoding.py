"""Per-request decoding strategies: what each sampled row means and what happens next.

The engine asks a request's decoder, per sequence that samples this step, how many draws to
take from its logits row, how many logprobs and whether its hidden state are needed; then hands
back the results in ``on_sampled``. A decoder changes sequences only through ``EngineOps``
(append a token, fork, finish), so every strategy shares one KV and stop-condition path.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Protocol

from raylm.cluster.request import Request, Sequence

if TYPE_CHECKING:
    import torch

Logprobs = tuple[list[int], list[float]]  # (ids, logprobs): the chosen token first, then top-N
# The index of a decoder's working sequence (a live beam, a contrastive candidate): it is not one
# of the request's outputs, and RequestOutput leaves it out.
WORKING_SEQ_INDEX = -1


class EngineOps(Protocol):
    """What the engine lets a decoder do to sequences."""

    def append_token(self, seq: Sequence, token: int, logprobs: Logprobs | None) -> bool:
        """Append a generated token, apply stop conditions; returns True if seq finished."""

    def fork(self, seq: Sequence, index: int) -> Sequence:
        """A new running sequence sharing all of seq's blocks and tokens (copy on write)."""

    def finish(self, seq: Sequence, reason: str, stop_reason: Any = None) -> None:
        """End a sequence now and free its blocks."""


class Decoder(abc.ABC):
    """Base: one draw per row, the request's own sampling parameters."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.params = request.params

    def num_samples(self, seq: Sequence) -> int:
        return 1

    def num_logprobs(self, seq: Sequence) -> int:
        """-1 = none; N >= 0: the chosen token's logprob plus the top N."""
        return -1 if self.params.logprobs is None else self.params.logprobs

    def wants_hidden_states(self, seq: Sequence) -> bool:
        return False

    def wants_prompt_hidden_states(self, seq: Sequence) -> bool:
        """Whether the hidden states of every prompt token fed come to on_prompt_hidden_states."""
        return False

    def on_prompt_hidden_states(self, seq: Sequence, first_pos: int,
                                hidden: "torch.Tensor") -> None:
        """Final hidden states [num_rows, hidden] of prompt positions first_pos, first_pos + 1, ...
        computed this step (only called when wants_prompt_hidden_states)."""

    def is_greedy_row(self, seq: Sequence) -> bool:
        """Rows whose token the decoder picks itself run greedy (no randomness spent)."""
        return False

    @abc.abstractmethod
    def on_sampled(self, seq: Sequence, tokens: list[int], logprobs: list[Logprobs | None],
                   hidden: "torch.Tensor | None", ops: EngineOps) -> None:
        """The draws of this step for ``seq`` (num_samples of them), with their logprobs when
        asked and the row's final hidden state [hidden_size] when asked."""

    def done(self) -> bool:
        return self.request.is_finished


class SamplingDecoder(Decoder):
    """Greedy and random sampling with n >= 1: the prompt is computed once; its first logits
    row yields n draws, and the n sequences then share the prompt's blocks."""

    def __init__(self, request: Request) -> None:
        super().__init__(request)
        self.forked = request.params.n == 1

    def num_samples(self, seq: Sequence) -> int:
        return 1 if self.forked else self.params.n

    def on_sampled(self, seq, tokens, logprobs, hidden, ops) -> None:
        if not self.forked:
            self.forked = True
            # Fork before appending: the children share the prompt, not the root's first token.
            children = [ops.fork(seq, index=i) for i in range(1, len(tokens))]
            for child, token, lp in zip(children, tokens[1:], logprobs[1:]):
                ops.append_token(child, token, lp)
        ops.append_token(seq, tokens[0], logprobs[0])


def make_decoder(request: Request) -> Decoder:
    kind = request.params.sampling_type
    if kind == "beam":
        from raylm.cluster.beam_search import BeamSearchDecoder

        return BeamSearchDecoder(request)
    if kind == "contrastive":
        from raylm.cluster.contrastive_search import ContrastiveDecoder

        return ContrastiveDecoder(request)
    return SamplingDecoder(request)
