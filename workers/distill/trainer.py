"""The distillation trainer: the frozen target scores sequences once, the draft learns to match
its token distributions at the generated positions (AdamW, warmup + cosine, accumulation)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raylm.workers.distill.batch import Batch, Sample
from raylm.workers.distill.config import TrainConfig
from raylm.workers.distill.hf_models import logits_at
from raylm.workers.distill.losses import get_loss


@dataclass(frozen=True)
class ScoredBuffer:
    """Sequences and the target's logits at their generated positions. Scoring once per data
    refresh (not once per step) keeps the target's forward off the training loop: every
    sequence is drawn many times between refreshes."""

    samples: list[Sample]
    target_logits: list[torch.Tensor]  # per sample: [num_generated, vocab] fp32

    def draw(self, num: int, generator: torch.Generator) -> list[int]:
        return torch.randint(len(self.samples), (num,), generator=generator).tolist()


def params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of ``config.lr`` at optimizer step ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DistillTrainer:
    def __init__(self, config: TrainConfig, target: torch.nn.Module, draft: torch.nn.Module,
                 pad_id: int, seed: int = 0) -> None:
        self.config = config
        self.target = target.eval().requires_grad_(False)
        self.draft = draft.train()
        self.pad_id = pad_id
        self.device = next(draft.parameters()).device
        self.loss_fn = get_loss(config.loss)
        if config.freeze_embeddings:
            draft.get_input_embeddings().requires_grad_(False)
            draft.get_output_embeddings().requires_grad_(False)
        params = [p for p in draft.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # norms and biases
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(config, s))
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0

    @torch.inference_mode()
    def score(self, samples: list[Sample], batch_size: int = 16) -> ScoredBuffer:
        logits: list[torch.Tensor] = []
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            rows = logits_at(self.target, Batch.collate(chunk, self.pad_id, self.device)).float()
            logits.extend(rows.split([s.num_generated for s in chunk]))  # [num_generated, vocab]
        return ScoredBuffer(list(samples), [t.clone() for t in logits])

    def step(self, buffer: ScoredBuffer) -> float:
        """One optimizer step on ``grad_accum`` micro-batches drawn from ``buffer``; returns
        the token-weighted mean loss."""
        cfg = self.config
        picks = [buffer.draw(cfg.batch_size, self.generator) for _ in range(cfg.grad_accum)]
        num_total = sum(buffer.samples[i].num_generated for pick in picks for i in pick)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for pick in picks:
            batch = Batch.collate([buffer.samples[i] for i in pick], self.pad_id, self.device)
            target = torch.cat([buffer.target_logits[i] for i in pick])  # [num_positions, vocab]
            draft = logits_at(self.draft, batch)  # [num_positions, vocab]
            # Token-weighted: accumulation gives the gradient of one large batch.
            loss = self.loss_fn(target, draft, cfg.temperature) * (batch.num_positions / num_total)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params_of(self.optimizer), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return total
