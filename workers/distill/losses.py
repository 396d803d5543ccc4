"""Divergences between the target's (p) and the draft's (q) next-token distributions.

All take logits at the positions being trained (the generated ones; the prompt is masked out
before), divide them by ``temperature``, and return the mean over positions. Each is 0 exactly
when p == q. Why several: forward KL (mode covering) is the classic distillation loss; reverse KL
and TVD target what speculation rewards (greedy acceptance wants the draft's argmax on the
target's; the sampled acceptance rate is 1 - TVD(p, q)); JSD is the bounded middle ground.
DistillSpec (Zhou et al., 2023) compares them; which wins here is in the issue 14 note.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "jsd", "tvd")


def _log_probs(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    assert target_logits.shape == draft_logits.shape, (target_logits.shape, draft_logits.shape)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(target_logits.float() / temperature, dim=-1)  # [num_positions, vocab]
    log_q = F.log_softmax(draft_logits.float() / temperature, dim=-1)  # [num_positions, vocab]
    return log_p, log_q


def forward_kl(target_logits: torch.Tensor, draft_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q)."""
    log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean()


def reverse_kl(target_logits: torch.Tensor, draft_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(q || p) = sum_v q (log q - log p)."""
    log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
    return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1).mean()


def jensen_shannon(target_logits: torch.Tensor, draft_logits: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """JSD = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2; at most log 2."""
    log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    kl_qm = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def total_variation(target_logits: torch.Tensor, draft_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """TVD = sum_v |p - q| / 2; 1 - TVD is the expected acceptance of one sampled draft token."""
    log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
    return (0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)).mean()


_BY_NAME: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": forward_kl, "rkl": reverse_kl, "jsd": jensen_shannon, "tvd": total_variation,
}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """``loss(target_logits [N, V], draft_logits [N, V], temperature) -> scalar``."""
    if name not in _BY_NAME:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return _BY_NAME[name]
