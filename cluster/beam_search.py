"""Beam search inside the engine, with Hugging Face semantics (`generate(num_beams=...,
do_sample=False)`).

The live beams of a request are sequences that share their common prefix blocks (forks; a shared
partial block is copied on write). Every round each live beam's logits row reports its best
tokens by logprob. The round resolves once *all* live beams have reported (a preempted beam
recomputes and catches up; the others simply wait, fully computed, so the scheduler skips them):

1. candidates = (beam score + token logprob) over all beams, best first;
2. among the best ``num_beams`` candidates, those that end (an end token, or the length limit)
   become finished hypotheses, scored ``sum_logprobs / generated_len ** length_penalty``; the
   ``num_beams`` best hypotheses are kept;
3. the best ``num_beams`` candidates that do not end become the next beams: a parent chosen k
   times is forked k - 1 times, a parent not chosen is finished (its blocks freed);
4. the search stops at the length limit, when ``early_stopping is True`` and ``num_beams``
   hypotheses exist, or when (HF's heuristic) the best live beam can no longer beat the worst
   hypothesis. The request's outputs are then the ``n`` best hypotheses, in rank order.

Live beams are working sequences (``WORKING_SEQ_INDEX``): a request streams nothing while it
searches, then its final RequestOutput carries the hypotheses whole. Hypotheses are real finished
sequences (a fork of the parent with the final token appended), so
their text, logprobs and finish reason come from the engine's one stop-condition path; they own
no blocks. Penalties (repetition/presence/frequency) do not apply to beam scores: the scores are
the model's raw logprobs, as HF's with no logits processors.
"""
from __future__ import annotations

from dataclasses import dataclass

from raylm.cluster.decoding import WORKING_SEQ_INDEX, Decoder, EngineOps, Logprobs
from raylm.cluster.request import Request, Sequence


@dataclass
class _Candidate:
    score: float  # the parent beam's sum logprob + this token's logprob
    parent: Sequence
    token: int
    logprob: float
    row: Logprobs  # the parent row's top (ids, logprobs), for users who asked for logprobs


@dataclass
class _Hypothesis:
    score: float  # length-penalized
    seq: Sequence  # finished, owns no blocks


class BeamSearchDecoder(Decoder):
    def __init__(self, request: Request) -> None:
        super().__init__(request)
        p = self.params
        self.num_beams = p.num_beams
        self.end_ids = set(p.stop_token_ids or [])
        if not p.ignore_eos:
            self.end_ids |= set(request.eos_token_ids)
        self.beams: list[Sequence] = list(request.seqs)  # live, best first
        for beam in self.beams:
            beam.index = WORKING_SEQ_INDEX
        self.reports: dict[int, list[tuple[int, float]]] = {}  # seq_id -> its (token, logprob)s
        self.rows: dict[int, Logprobs] = {}  # seq_id -> its raw top row
        self.hyps: list[_Hypothesis] = []  # best first, at most num_beams
        self.cannot_improve = False  # HF's early-stop heuristic, sticky once satisfied

    # -- what each beam row asks the sampler for ---------------------------------------------
    def is_greedy_row(self, seq: Sequence) -> bool:
        return True

    def num_logprobs(self, seq: Sequence) -> int:
        # A beam's best num_beams continuations that do not end lie within its top
        # num_beams + len(end_ids) tokens.
        return max(self.num_beams + len(self.end_ids), self.params.logprobs or 0)

    # -- one report per live beam per round ---------------------------------------------------
    def on_sampled(self, seq, tokens, logprobs, hidden, ops) -> None:
        assert seq in self.beams, seq
        assert logprobs[0] is not None, "beam rows always ask for logprobs"
        ids, values = logprobs[0]
        top = list(zip(ids[1:], values[1:]))  # [0] is the argmax, repeated in the top list
        if seq.num_output_tokens < self.params.min_tokens:
            top = [(t, lp) for t, lp in top if t not in self.end_ids]  # HF's min_new_tokens
        self.reports[seq.seq_id] = top
        self.rows[seq.seq_id] = (ids[1:], values[1:])
        if all(b.seq_id in self.reports for b in self.beams):
            self._resolve(ops)

    def _max_new_tokens(self, ops: EngineOps) -> int:
        limit = self.params.max_tokens
        max_model_len = getattr(ops, "max_model_len", None)
        if max_model_len is not None:
            limit = min(limit, max_model_len - self.request.num_prompt_tokens)
        return limit

    def _resolve(self, ops: EngineOps) -> None:
        limit = self._max_new_tokens(ops)
        new_len = self.beams[0].num_output_tokens + 1  # all live beams have the same length
        at_limit = new_len >= limit
        candidates = [
            _Candidate(beam.cumulative_logprob + lp, beam, token, lp, self.rows[beam.seq_id])
            for beam in self.beams for token, lp in self.reports[beam.seq_id]]
        candidates.sort(key=lambda c: -c.score)  # stable: ties keep beam rank, then token rank
        self.reports.clear()
        self.rows.clear()

        can_add = not self.cannot_improve and not (
            self.params.early_stopping is True and len(self.hyps) >= self.num_beams)
        for c in candidates[: self.num_beams]:
            if (c.token in self.end_ids or at_limit) and can_add:
                self._offer(c, new_len, ops)
        nexts = [] if at_limit else [c for c in candidates if c.token not in self.end_ids]
        self.beams = self._advance(nexts[: self.num_beams], new_len, can_add, ops)

        if not self.cannot_improve and len(self.hyps) >= self.num_beams and self.beams:
            lp = self.params.length_penalty
            best_len = limit if self.params.early_stopping == "never" and lp > 0 else new_len
            best_possible = self.beams[0].cumulative_logprob / best_len ** lp
            self.cannot_improve = not best_possible > self.hyps[-1].score
        full = len(self.hyps) >= self.num_beams
        if (at_limit or not self.beams or self.cannot_improve
                or (self.params.early_stopping is True and full)):
            self._conclude(ops)
        else:
            self.request.seqs = list(self.beams)

    def _advance(self, chosen: list[_Candidate], new_len: int, can_add: bool,
                 ops: EngineOps) -> list[Sequence]:
        """The chosen candidates become the next beams (best first); other parents end."""
        seqs: list[Sequence] = []
        used: set[int] = set()
        # Fork before any parent appends: a fork copies the parent's tokens as they are now.
        for c in chosen:
            if c.parent.seq_id in used:
                seqs.append(ops.fork(c.parent, index=WORKING_SEQ_INDEX))
            else:
                used.add(c.parent.seq_id)
                seqs.append(c.parent)
        for beam in self.beams:
            if beam.seq_id not in used:
                ops.finish(beam, "length")
        live = []
        for seq, c in zip(seqs, chosen):
            if ops.append_token(seq, c.token, self._token_logprobs(c)):
                # Ended by something only the engine sees (a stop string): a hypothesis.
                if can_add:
                    self._insert(seq, new_len)
            else:
                live.append(seq)
        return live

    def _token_logprobs(self, c: _Candidate) -> Logprobs:
        n = self.params.logprobs or 0
        ids, values = c.row
        return [c.token, *ids[:n]], [c.logprob, *values[:n]]

    def _offer(self, c: _Candidate, new_len: int, ops: EngineOps) -> None:
        """A candidate that ends: a finished hypothesis, if it makes the best num_beams."""
        score = c.score / new_len ** self.params.length_penalty
        if len(self.hyps) >= self.num_beams and not score > self.hyps[-1].score:
            return
        seq = ops.fork(c.parent, index=WORKING_SEQ_INDEX)
        if not ops.append_token(seq, c.token, self._token_logprobs(c)):
            ops.finish(seq, "length")
        self._insert(seq, new_len)

    def _insert(self, seq: Sequence, new_len: int) -> None:
        score = seq.cumulative_logprob / new_len ** self.params.length_penalty
        if len(self.hyps) >= self.num_beams and not score > self.hyps[-1].score:
            return
        # After the existing ones on ties, as HF's top-k over (finished, new).
        pos = next((i for i, h in enumerate(self.hyps) if score > h.score), len(self.hyps))
        self.hyps.insert(pos, _Hypothesis(score, seq))
        del self.hyps[self.num_beams:]

    def _conclude(self, ops: EngineOps) -> None:
        """End the search: free the live beams; the n best hypotheses are the outputs."""
        for beam in self.beams:
            ops.finish(beam, "length")
        self.beams = []
        best = [h.seq for h in self.hyps[: self.params.n]]
        for i, seq in enumerate(best):
            seq.index = i
        self.request.seqs = best
