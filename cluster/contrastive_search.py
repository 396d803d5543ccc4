"""Contrastive search inside the engine (Su et al. 2022; `penalty_alpha > 0`, `top_k > 1`).

Each step the ``top_k`` tokens of the current logits are candidates, with their model
probabilities ``p(v)``. Each candidate runs as a one-token continuation of the committed sequence
(a fork sharing its blocks; the k forks are scheduled together), which yields the candidate's
final hidden state ``h_v`` and its own next-token logits. The step keeps

    argmax_v  (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j)

over the hidden states ``h_j`` of every earlier token (prompt included); ties go to the more
probable candidate. The winner becomes the committed sequence (its logits give the next
candidates) and the other forks are freed.

The request's past hidden states live here, on the engine side, as one tensor. The prompt's come
from the prefill (the decoder asks for the hidden states of every prompt token), so prompt
positions must really be computed: the request gets a unique prefix-cache salt.

Candidate forks are working sequences, not outputs (``WORKING_SEQ_INDEX``, which RequestOutput
leaves out), and the candidate token joins their token ids without the stop checks until it wins
(an end token is a candidate like any other: its hidden state must be computed to be scored).
Scores use the model's raw probabilities; repetition/presence/frequency penalties do not apply.
"""
from __future__ import annotations

import itertools

import torch

from raylm.cluster.decoding import WORKING_SEQ_INDEX, Decoder, EngineOps, Logprobs
from raylm.cluster.request import Request, Sequence

_salts = itertools.count()


class ContrastiveDecoder(Decoder):
    def __init__(self, request: Request) -> None:
        super().__init__(request)
        self.top_k = self.params.top_k
        self.alpha = self.params.penalty_alpha
        self.end_ids = set(self.params.stop_token_ids or [])
        if not self.params.ignore_eos:
            self.end_ids |= set(request.eos_token_ids)
        # Cached prompt blocks would come without hidden states: never hit the prefix cache.
        request.cache_salt = f"contrastive-{request.request_id}-{next(_salts)}"
        self.head = request.seqs[0]  # the committed sequence
        self.context: torch.Tensor | None = None  # [capacity, hidden] float32, past hidden states
        self.num_context = 0  # positions of self.context filled so far
        # The candidates of the current step, best probability first.
        self.candidates: list[Sequence] = []
        self.cand_tokens: list[int] = []
        self.cand_logprobs: list[float] = []
        self.cand_row: Logprobs = ([], [])  # the committed sequence's raw top row
        self.reports: dict[int, tuple[torch.Tensor, Logprobs]] = {}  # seq_id -> (hidden, row)

    # -- what rows ask for --------------------------------------------------------------------
    def is_greedy_row(self, seq: Sequence) -> bool:
        return True

    def num_logprobs(self, seq: Sequence) -> int:
        return max(self.top_k + len(self.end_ids), self.params.logprobs or 0)

    def wants_hidden_states(self, seq: Sequence) -> bool:
        return True

    def wants_prompt_hidden_states(self, seq: Sequence) -> bool:
        return True

    # -- hidden-state history ------------------------------------------------------------------
    def _store(self, first_pos: int, hidden: torch.Tensor) -> None:
        """hidden: [num_rows, hidden] for positions first_pos, ...; already known ones (from a
        recompute after preemption, or a candidate's copy of the prompt) are kept as they are."""
        if self.context is None:
            capacity = self.request.num_prompt_tokens + self.params.max_tokens
            self.context = torch.empty(capacity, hidden.shape[-1], dtype=torch.float32,
                                       device=hidden.device)
        skip = max(0, self.num_context - first_pos)
        if skip >= hidden.shape[0]:
            return
        assert first_pos + skip == self.num_context, "hidden states arrive in position order"
        rows = hidden[skip:].float()  # [num_new, hidden]
        self.context[self.num_context: self.num_context + rows.shape[0]] = rows
        self.num_context += rows.shape[0]

    def on_prompt_hidden_states(self, seq: Sequence, first_pos: int,
                                hidden: torch.Tensor) -> None:
        self._store(first_pos, hidden)

    # -- steps --------------------------------------------------------------------------------
    def on_sampled(self, seq, tokens, logprobs, hidden, ops) -> None:
        assert logprobs[0] is not None and hidden is not None
        if seq is self.head:
            if not self.candidates:  # a stale report of a recomputed head is ignored
                self._spawn(logprobs[0], ops)
            return
        assert seq in self.candidates, seq
        self.reports[seq.seq_id] = (hidden, logprobs[0])
        if len(self.reports) == len(self.candidates):
            self._resolve(ops)

    def _spawn(self, row: Logprobs, ops: EngineOps) -> None:
        """The committed sequence's logits row: fork one one-token continuation per candidate."""
        ids, values = row[0][1:], row[1][1:]  # [0] is the argmax, repeated in the top list
        top = list(zip(ids, values))
        if self.head.num_output_tokens < self.params.min_tokens:
            top = [(t, lp) for t, lp in top if t not in self.end_ids]
        top = top[: self.top_k]
        self.cand_row = (ids, values)
        self.cand_tokens = [t for t, _ in top]
        self.cand_logprobs = [lp for _, lp in top]
        self.candidates = []
        for token in self.cand_tokens:
            child = ops.fork(self.head, index=WORKING_SEQ_INDEX)
            # Tentative: committed through ops.append_token (stop checks, text) only if it wins.
            child.token_ids.append(token)
            self.candidates.append(child)

    def _resolve(self, ops: EngineOps) -> None:
        assert self.context is not None and self.num_context == self.head.num_tokens
        hiddens = torch.stack([self.reports[c.seq_id][0] for c in self.candidates]).float()
        # [num_candidates, hidden] against [num_context, hidden]
        cand = torch.nn.functional.normalize(hiddens, dim=-1)
        past = torch.nn.functional.normalize(self.context[: self.num_context], dim=-1)
        degeneration = (cand @ past.T).max(dim=-1).values  # [num_candidates]
        probs = torch.tensor(self.cand_logprobs, dtype=torch.float32, device=cand.device).exp()
        scores = ((1.0 - self.alpha) * probs - self.alpha * degeneration).tolist()
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: lower rank
        winner = self.candidates[best]
        self._store(self.num_context, hiddens[best: best + 1])

        ops.finish(self.head, "length")
        for c in self.candidates:
            if c is not winner:
                ops.finish(c, "length")
        row = self.reports[winner.seq_id][1]
        self.reports.clear()
        self.candidates = []
        token = winner.token_ids.pop()  # commit the tentative token through the stop checks
        n = self.params.logprobs or 0
        lps = ([token, *self.cand_row[0][:n]], [self.cand_logprobs[best], *self.cand_row[1][:n]])
        winner.index = 0
        # The winner continues the head's stream: what was already emitted is not emitted again.
        winner.num_emitted_tokens = self.head.num_emitted_tokens
        winner.num_emitted_chars = self.head.num_emitted_chars
        self.head = winner
        self.request.seqs = [winner]
        if not ops.append_token(winner, token, lps):
            self._spawn(row, ops)
