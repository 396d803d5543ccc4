"""`raylm distill --target T (--draft-init D0 | --draft-layers N) --out D [...]`."""
from __future__ import annotations

import argparse

from raylm.cluster.distill.config import DATA_POLICIES, DistillConfig
from raylm.workers.distill.config import TrainConfig
from raylm.workers.distill.losses import LOSSES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="the target checkpoint (directory)")
    init = p.add_mutually_exclusive_group(required=True)
    init.add_argument("--draft-init", help="a small checkpoint of the same tokenizer to start from")
    init.add_argument("--draft-layers", type=int,
                      help="start from the target's embedding, first N layers, norm and head")
    p.add_argument("--out", required=True, help="output directory (HF layout)")
    p.add_argument("--prompts", default=None,
                   help='JSONL with a "prompt" or "text" field per line (default: the packaged '
                        "corpus)")
    p.add_argument("--data-policy", default="on-policy", choices=DATA_POLICIES,
                   help="who samples the continuations: the current draft or the target")
    p.add_argument("--regen-every", type=int, default=100,
                   help="steps between data refreshes (on-policy: from the current draft)")
    p.add_argument("--num-rollouts", type=int, default=64, help="sequences per refresh")
    p.add_argument("--prompt-len", type=int, default=32, help="max prompt tokens")
    p.add_argument("--max-new-tokens", type=int, default=64, help="continuation length")
    p.add_argument("--gen-temperature", type=float, default=1.0)
    p.add_argument("--num-eval-prompts", type=int, default=16, help="held-out prompts")
    p.add_argument("--eval-max-tokens", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=0,
                   help="also save OUT/checkpoints/step-N every N steps (0: final only)")
    p.add_argument("--spec-k", type=int, default=4, help="k of the acceptance measure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    t = TrainConfig()
    p.add_argument("--steps", type=int, default=t.steps)
    p.add_argument("--loss", default=t.loss, choices=LOSSES)
    p.add_argument("--temperature", type=float, default=t.temperature,
                   help="divides both models' logits in the loss")
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--min-lr-ratio", type=float, default=t.min_lr_ratio)
    p.add_argument("--warmup-steps", type=int, default=t.warmup_steps)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--grad-accum", type=int, default=t.grad_accum)
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=t.max_grad_norm)
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="train only the layers and norms (embedding and LM head kept)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    train = TrainConfig(steps=args.steps, loss=args.loss, temperature=args.temperature,
                        lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                        warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, weight_decay=args.weight_decay,
                        max_grad_norm=args.max_grad_norm,
                        freeze_embeddings=args.freeze_embeddings)
    return DistillConfig(
        target=args.target, out=args.out, draft_init=args.draft_init,
        draft_layers=args.draft_layers, prompts=args.prompts, data_policy=args.data_policy,
        regen_every=args.regen_every, num_rollouts=args.num_rollouts,
        prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
        gen_temperature=args.gen_temperature, num_eval_prompts=args.num_eval_prompts,
        eval_max_tokens=args.eval_max_tokens, eval_every=args.eval_every,
        save_every=args.save_every, spec_k=args.spec_k, seed=args.seed, device=args.device,
        train=train)


def run(args: argparse.Namespace) -> int:
    from raylm.cluster.distill.loop import run_distill

    result = run_distill(config_from_args(args), progress=not args.no_progress)
    b, a = result.before, result.after
    print(f"{'held-out greedy (k=' + str(args.spec_k) + ')':<28}{'before':>10}{'after':>10}")
    print(f"{'argmax agreement':<28}{b.agreement:>10.3f}{a.agreement:>10.3f}")
    print(f"{'acceptance rate':<28}{b.acceptance_rate:>10.3f}{a.acceptance_rate:>10.3f}")
    print(f"{'mean acceptance length':<28}{b.mean_acceptance_length:>10.2f}"
          f"{a.mean_acceptance_length:>10.2f}")
    print(f"draft: {result.out}  log: {result.log_path}  plot: {result.plot_path}")
    return 0
