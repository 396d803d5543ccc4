"""The distillation driver: build the draft, refresh data with the engine, train, measure,
save. One call of ``run_distill`` is one `raylm distill` run."""
from __future__ import annotations

import logging
import pathlib
import shutil
import tempfile
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from raylm.cluster.distill.config import DistillConfig
from raylm.cluster.distill.curve import Curve
from raylm.cluster.distill.data import (
    generate_samples,
    load_texts,
    split_prompts,
    tokenize_prompts,
)
from raylm.workers.distill.acceptance import Acceptance, measure_acceptance
from raylm.workers.distill.hf_models import (
    check_same_vocab,
    draft_from_target,
    load_causal_lm,
    save_checkpoint,
)
from raylm.workers.distill.trainer import DistillTrainer

logger = logging.getLogger(__name__)

LOG_NAME, PLOT_NAME = "distill_log.json", "distill_curve.png"


@dataclass(frozen=True)
class DistillResult:
    out: pathlib.Path
    before: Acceptance
    after: Acceptance
    log_path: pathlib.Path
    plot_path: pathlib.Path


def run_distill(cfg: DistillConfig, progress: bool = True) -> DistillResult:
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = tokenize_prompts(tokenizer, load_texts(cfg.prompts), cfg.prompt_len)
    train_prompts, eval_prompts = split_prompts(prompts, cfg.num_eval_prompts, cfg.seed)
    # Held out: the target's greedy continuations, generated once.
    eval_samples = generate_samples(cfg.target, eval_prompts, cfg.eval_max_tokens, 0.0,
                                    cfg.seed, device)

    target = load_causal_lm(cfg.target, device, trainable=False)
    if cfg.draft_init is not None:
        draft = load_causal_lm(cfg.draft_init, device, trainable=True)
        check_same_vocab(target, draft)
    else:
        draft = draft_from_target(target, cfg.draft_layers).train()
    save_dtype = _checkpoint_dtype(cfg.draft_init or cfg.target)
    trainer = DistillTrainer(cfg.train, target, draft, pad_id, seed=cfg.seed)
    out = pathlib.Path(cfg.out)

    def measure() -> Acceptance:
        return measure_acceptance(draft, eval_samples, cfg.spec_k, pad_id)

    curve = Curve()
    before = measure()
    curve.evals.append((0, before))
    logger.info("before: %s", before)
    snapshot = pathlib.Path(tempfile.mkdtemp(prefix="raylm-distill-policy-"))
    rng = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.train.steps), desc="distill", unit="step", disable=not progress)
    try:
        buffer = None
        for step in bar:
            if step % cfg.regen_every == 0:
                buffer = trainer.score(_rollouts(cfg, train_prompts, step, rng, draft,
                                                 snapshot, cfg.target, device))
            loss = trainer.step(buffer)
            curve.losses.append(loss)
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.train.steps:
                acc = measure()
                curve.evals.append((done, acc))
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc.acceptance_rate:.3f}",
                                len=f"{acc.mean_acceptance_length:.2f}")
            elif done % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{curve.evals[-1][1].acceptance_rate:.3f}")
            if cfg.save_every and done % cfg.save_every == 0 and done != cfg.train.steps:
                save_checkpoint(draft, out / "checkpoints" / f"step-{done}", cfg.target, save_dtype)
    finally:
        bar.close()
        shutil.rmtree(snapshot, ignore_errors=True)
    save_checkpoint(draft, out, cfg.draft_init or cfg.target, save_dtype)
    after = curve.evals[-1][1]
    extra = {"config": _jsonable(asdict(cfg)), "device": device,
             "before": asdict(before), "after": asdict(after)}
    log_path, plot_path = out / LOG_NAME, out / PLOT_NAME
    curve.write_json(log_path, extra)
    curve.write_png(plot_path, f"raylm distill: {cfg.train.loss}, {cfg.data_policy} data")
    logger.info("after: %s; wrote %s", after, out)
    return DistillResult(out, before, after, log_path, plot_path)


def _rollouts(cfg: DistillConfig, train_prompts: list[list[int]], step: int,
              rng: torch.Generator, draft: torch.nn.Module, snapshot: pathlib.Path,
              target: str, device: str):
    """Fresh continuations of ``num_rollouts`` training prompts from the data policy: the
    current draft's weights (saved to ``snapshot`` for the engine) or the target."""
    picks = torch.randperm(len(train_prompts), generator=rng)[:cfg.num_rollouts].tolist()
    while len(picks) < cfg.num_rollouts:  # fewer prompts than rollouts: repeat (new seeds)
        picks += picks[:cfg.num_rollouts - len(picks)]
    prompts = [train_prompts[i] for i in picks]
    if cfg.data_policy == "on-policy":
        policy = str(save_checkpoint(draft, snapshot, cfg.draft_init or target))
    else:
        policy = target
    seed = cfg.seed + 1_000_003 * (step // cfg.regen_every + 1)
    return generate_samples(policy, prompts, cfg.max_new_tokens, cfg.gen_temperature, seed,
                            device)


def _checkpoint_dtype(path: str) -> torch.dtype | None:
    """The dtype the source checkpoint stores (the trainer computes in fp32 whatever it is)."""
    import json

    config = json.loads((pathlib.Path(path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value if isinstance(value, (int, float, str, bool, type(None), list)) else str(value)
