"""The trainer's configuration (frozen, validated on construction)."""
from __future__ import annotations

from dataclasses import dataclass

from raylm.workers.distill.losses import LOSSES


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the draft. One step = ``grad_accum`` micro-batches of ``batch_size``
    sequences, token-weighted, then one AdamW update; the learning rate warms up linearly for
    ``warmup_steps`` and then follows a cosine down to ``lr * min_lr_ratio`` at ``steps``."""

    steps: int = 2000
    loss: str = "fkl"
    temperature: float = 1.0
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Keep the token embedding and LM head as initialised (from the target with --draft-layers):
    # the draft then learns only its layers and norms, which also skips the head's weight
    # gradient, the largest matmul of a small draft's backward.
    freeze_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("weight_decay must be >= 0 and max_grad_norm > 0")
