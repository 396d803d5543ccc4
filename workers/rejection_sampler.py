"""Lossless verification of speculative (draft) tokens: the tokens a request emits have exactly
the target model's distribution, however good or bad the proposals were.

Per sequence with k proposed tokens d_0..d_{k-1} the target scored k + 1 positions; row j of
``target_probs`` is the target's (already processed: temperature, top-k/p, min-p, penalties)
distribution p_j for the token after d_{j-1}.
- Greedy sequences accept the longest prefix of drafts equal to the target's argmax and emit the
  argmax at the first mismatch (or after the last draft: the bonus token): the output equals
  plain greedy decoding token for token.
- Sampled sequences accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first
  rejection they emit a token drawn from norm(max(p_j - q_j, 0)); when every draft is accepted
  they emit a bonus token drawn from p_k. ``draft_probs=None`` means point-mass proposals (n-gram
  lookup: q_j = one-hot(d_j)), for which the residual is p_j with d_j removed.
Randomness is per sequence: a seeded sequence derives its uniforms and its draw from
(seed, step id of the position), so its output does not depend on the batch it ran in.
"""
from __future__ import annotations

import torch

from raylm.kernels.row_pick import argmax_rows, sample_rows
from raylm.workers.sampler import _seeded

_MIN_EXP = 1e-20
_DRAW_SALT = 0x5DEECE66D  # separates the accept uniforms' seeds from the draw's


def _accept_uniforms(num_seqs: int, k: int, seeds: list[int | None], step_ids: list[int],
                     device: torch.device) -> torch.Tensor:  # [num_seqs, k] ~ U(0, 1)
    """The accept tests' uniforms: seeded sequences from their (seed, step) generators."""
    u = torch.rand(num_seqs, max(k, 1), device=device)[:, :k]
    for i, seed in enumerate(seeds):
        if seed is None:
            continue
        for j in range(k):
            u[i, j] = torch.rand((), generator=_seeded(seed, step_ids[i] + j, device), device=device)
    return u


def _draw(probs: torch.Tensor,  # [rows, vocab], unnormalised, each row summing to > 0
          seeds: list[int | None], step_ids: list[int]) -> torch.Tensor:  # [rows] int64
    """One draw per row; a seeded row's from its (seed, step) generator. CPU fp32: one uniform
    and an inverse-CDF walk (as the sampler); elsewhere the exponential race."""
    device = probs.device
    if device.type == "cpu" and probs.dtype == torch.float32:
        u = torch.rand(len(seeds), dtype=torch.float64)
        for i, seed in enumerate(seeds):
            if seed is not None:
                u[i] = torch.rand((), dtype=torch.float64,
                                  generator=_seeded(seed ^ _DRAW_SALT, step_ids[i]))
        return sample_rows(probs, u)
    e = torch.empty_like(probs)
    if any(seed is None for seed in seeds):
        e.exponential_()
    for i, seed in enumerate(seeds):
        if seed is not None:
            e[i].exponential_(generator=_seeded(seed ^ _DRAW_SALT, step_ids[i], device))
    return argmax_rows(probs / e.clamp_min_(_MIN_EXP))


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [num_seqs, k] int64
    target_probs: torch.Tensor,  # [num_seqs, k + 1, vocab] float32
    draft_probs: torch.Tensor | None,  # [num_seqs, k, vocab] float32; None = point masses
    is_greedy: torch.Tensor,  # [num_seqs] bool
    seeds: list[int | None],
    step_ids: list[int],  # per sequence, the step id (output index) of its first position
    num_draft_tokens: torch.Tensor | None = None,  # [num_seqs] int64, <= k; None = all k
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (tokens [num_seqs, k + 1] int64, num_emitted [num_seqs] int64): each sequence
    emits tokens[i, :num_emitted[i]] (accepted drafts, then the correction or bonus token);
    the rest of the row is -1. A sequence with n_i < k drafts uses positions 0..n_i only (its
    draft ids past n_i are ignored and its row n_i is a bonus position)."""
    num_seqs, k = draft_token_ids.shape
    vocab = target_probs.shape[-1]
    device = target_probs.device
    assert target_probs.shape == (num_seqs, k + 1, vocab), target_probs.shape
    greedy = is_greedy.tolist()
    if all(greedy):
        # Only the argmax matters (target_probs may even be logits): no randomness, no residual.
        return _greedy(draft_token_ids, argmax_rows(target_probs), num_draft_tokens)
    u = _accept_uniforms(num_seqs, k, seeds, step_ids, device)

    # Acceptance of each draft position.
    p_draft = target_probs[:, :k].gather(2, draft_token_ids.unsqueeze(2)).squeeze(2)  # [S, k]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(2, draft_token_ids.unsqueeze(2)).squeeze(2)
    accepted = u * q_draft < p_draft  # u < p/q without dividing by a q of 0: [S, k]
    argmax = argmax_rows(target_probs)  # [S, k + 1]
    greedy_accept = draft_token_ids == argmax[:, :k]
    accepted = torch.where(is_greedy.unsqueeze(1), greedy_accept, accepted)
    has_draft = torch.ones_like(accepted)
    if num_draft_tokens is not None:
        has_draft = torch.arange(k, device=device).unsqueeze(0) < num_draft_tokens.unsqueeze(1)
        accepted &= has_draft
    # Length of the accepted prefix: positions before the first rejection.
    num_accepted = accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [S]
    final = argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)  # [S], right for greedy rows

    # The sampled sequences' token after the accepted prefix, drawn at that position only: from
    # the residual norm(max(p_j - q_j, 0)) at a rejection at j, from p_k after a fully accepted
    # run or past a sequence's drafts (a bonus position: no q).
    rows = [i for i, g in enumerate(greedy) if not g]  # at least one: not all greedy
    sampled = torch.tensor(rows, dtype=torch.int64, device=device)  # [R]
    pos = num_accepted[sampled]  # [R]
    p_next = target_probs[sampled, pos]  # [R, vocab]
    residual = p_next
    if k > 0:
        j = pos.clamp(max=k - 1)
        at_draft = (pos < k) & has_draft[sampled, j]  # [R]
        if draft_probs is None:
            q_next = torch.zeros_like(p_next)
            q_next.scatter_(1, draft_token_ids[sampled, j].unsqueeze(1), 1.0)
        else:
            q_next = draft_probs[sampled, j]  # [R, vocab]
        residual = (p_next - q_next * at_draft.unsqueeze(1)).clamp_min_(0.0)
        # A residual of all zeros (p == q) is never reached by a rejection; keep it drawable.
        empty = residual.sum(dim=1, keepdim=True) <= 0
        residual = torch.where(empty, p_next, residual)
    row_seeds = [seeds[i] for i in rows]
    # a seeded draw's generator needs its position (a host sync); unseeded draws need none
    positions = pos.tolist() if any(s is not None for s in row_seeds) else [0] * len(rows)
    final[sampled] = _draw(residual, row_seeds, [step_ids[i] + j for i, j in zip(rows, positions)])

    return _emit(draft_token_ids, num_accepted, final)


def _greedy(draft_token_ids: torch.Tensor, argmax: torch.Tensor,
            num_draft_tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    k = draft_token_ids.shape[1]
    accepted = draft_token_ids == argmax[:, :k]  # [S, k]
    if num_draft_tokens is not None:
        accepted &= torch.arange(k, device=argmax.device).unsqueeze(0) < num_draft_tokens.unsqueeze(1)
    num_accepted = accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [S]
    return _emit(draft_token_ids, num_accepted, argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1))


def _emit(draft_token_ids: torch.Tensor, num_accepted: torch.Tensor, final: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [accepted drafts..., final, -1...] and how many tokens each emits."""
    num_seqs, k = draft_token_ids.shape
    device = draft_token_ids.device
    positions = torch.arange(k + 1, device=device).unsqueeze(0)  # [1, k + 1]
    tokens = torch.full((num_seqs, k + 1), -1, dtype=torch.int64, device=device)
    keep = positions < num_accepted.unsqueeze(1)
    tokens[:, :k] = torch.where(keep[:, :k], draft_token_ids, tokens[:, :k])
    tokens.scatter_(1, num_accepted.unsqueeze(1), final.unsqueeze(1))
    return tokens, num_accepted + 1
