"""What greedy speculation would accept, measured exactly with one teacher-forced forward.

The held-out set is prompts with the target's greedy continuation. Under greedy verification
the draft's proposal at a position is conditioned on the accepted prefix, which *is* the target's
greedy prefix, so the draft's argmax at each position of a teacher-forced forward over
prompt + continuation is exactly what it would propose there. From the per-position matches:

- agreement: fraction of positions where draft argmax == target token;
- k-block speculation replayed: the prefill emits token 0; each target step checks up to k
  drafted tokens, accepts the leading matches and emits one more (correction or bonus).
  acceptance_rate = accepted / drafted and mean_acceptance_length = 1 + accepted / steps, the
  definitions of raylm's spec_acceptance_rate / spec_mean_acceptance_length stats.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raylm.workers.distill.batch import Batch, Sample
from raylm.workers.distill.hf_models import logits_at


@dataclass(frozen=True)
class Acceptance:
    agreement: float
    acceptance_rate: float
    mean_acceptance_length: float


def replay_speculation(matches: list[list[bool]], k: int) -> Acceptance:
    """``matches[s][j]``: the draft's proposal for continuation token j of sequence s is right."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_match = num_pos = drafted = accepted = steps = 0
    for m in matches:
        num_match += sum(m)
        num_pos += len(m)
        j = 1  # token 0 comes from the prefill
        while j < len(m):
            n = min(k, len(m) - j)
            a = 0
            while a < n and m[j + a]:
                a += 1
            drafted += n
            accepted += a
            steps += 1
            j += a + 1
    return Acceptance(agreement=num_match / max(num_pos, 1),
                      acceptance_rate=accepted / max(drafted, 1),
                      mean_acceptance_length=1.0 + accepted / max(steps, 1))


@torch.inference_mode()
def measure_acceptance(draft: torch.nn.Module, samples: list[Sample], k: int, pad_id: int,
                       batch_size: int = 16) -> Acceptance:
    """Greedy acceptance of ``draft`` on samples whose continuation is the target's greedy one."""
    was_training = draft.training
    draft.eval()
    device = next(draft.parameters()).device
    matches: list[list[bool]] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = Batch.collate(chunk, pad_id, device)
        proposed = logits_at(draft, batch).argmax(-1)  # [num_positions]
        truth = torch.tensor([t for s in chunk for t in s.generated_ids], device=device)
        hits = (proposed == truth).tolist()  # once per eval batch, off the training path
        start = 0
        for s in chunk:
            matches.append(hits[start:start + s.num_generated])
            start += s.num_generated
    draft.train(was_training)
    return replay_speculation(matches, k)
