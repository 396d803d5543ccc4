"""Configuration of a distillation run (frozen, validated on construction)."""
from __future__ import annotations

from dataclasses import dataclass, field

from raylm.workers.distill.config import TrainConfig

DATA_POLICIES = ("on-policy", "target")


@dataclass(frozen=True)
class DistillConfig:
    """Which models, which data, how often to refresh / measure / save.

    Data: every ``regen_every`` steps, ``num_rollouts`` training prompts get a continuation of
    up to ``max_new_tokens`` sampled at ``gen_temperature`` by raylm's engine: from the current
    draft (``on-policy``, DistillSpec's choice: the draft learns on the prefixes it will itself
    propose from) or from the target (``target``). Held out: ``num_eval_prompts`` prompts with
    the target's greedy continuation of ``eval_max_tokens``; greedy acceptance for k =
    ``spec_k`` is measured on them every ``eval_every`` steps."""

    target: str
    out: str
    draft_init: str | None = None
    draft_layers: int | None = None
    prompts: str | None = None  # JSONL with "prompt" or "text"; None: the packaged corpus
    data_policy: str = "on-policy"
    regen_every: int = 100
    num_rollouts: int = 64
    prompt_len: int = 32
    max_new_tokens: int = 64
    gen_temperature: float = 1.0
    num_eval_prompts: int = 16
    eval_max_tokens: int = 64
    eval_every: int = 100
    save_every: int = 0  # 0: only the final checkpoint
    spec_k: int = 4
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if (self.draft_init is None) == (self.draft_layers is None):
            raise ValueError("give exactly one of draft_init (a checkpoint) and draft_layers "
                             "(the first N layers of the target)")
        if self.data_policy not in DATA_POLICIES:
            raise ValueError(f"data_policy must be one of {DATA_POLICIES}, "
                             f"got {self.data_policy!r}")
        for name in ("regen_every", "num_rollouts", "prompt_len", "max_new_tokens",
                     "num_eval_prompts", "eval_max_tokens", "eval_every", "spec_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if self.gen_temperature < 0:
            raise ValueError(f"gen_temperature must be >= 0, got {self.gen_temperature}")
