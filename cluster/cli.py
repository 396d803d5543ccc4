"""The `raylm` command line: make-model, generate, serve, distill, bench {throughput,latency,serve,kernels,structured,...}."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Subcommands that live in their own modules: name -> (module, help). Each module exposes
# add_arguments(parser) and run(args) -> int; importing lazily keeps `raylm --help` fast.
_BENCH = {
    "throughput": ("raylm.cluster.bench.throughput", "offline throughput against HF generate"),
    "latency": ("raylm.cluster.bench.latency", "batch-1 decode latency against the bandwidth floor"),
    "serve": ("raylm.cluster.bench.serve", "load generator against a running server"),
    "kernels": ("raylm.cluster.bench.kernels", "Triton kernel roofline (GPU only)"),
    "dispatch": ("raylm.cluster.bench.dispatch", "per-step control overhead of the Ray executor"),
    "scale-up": ("raylm.cluster.bench.scale_up", "time from overload to a second replica serving"),
    "structured": ("raylm.cluster.bench.structured",
                   "structured output: grammar libraries' mask cost, JSON-schema throughput"),
}
_SERVE = ("raylm.cluster.serve.serve_cli", "serve a model over gRPC and OpenAI HTTP with Ray Serve")
_DISTILL = ("raylm.cluster.distill.cli", "train a draft model against a target for speculation")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local checkpoint directory or HF repo id")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache (CPU)")
    p.add_argument("--kv-cache-dtype", default="auto",
                   choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree (ranks run as Ray worker actors when > 1)")
    p.add_argument("--speculative-config", type=json_dict, default=None,
                   help='speculative decoding as JSON, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4}\'')


def json_dict(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
                enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
                tensor_parallel_size=args.tp, speculative_config=args.speculative_config)


def _cmd_make_model(args: argparse.Namespace) -> int:
    from raylm.workers.make_model import make_model

    if args.pair:
        from raylm.workers.make_pair import make_spec_pair

        overrides = {} if args.draft_layers is None else {"num_hidden_layers": args.draft_layers}
        target, draft = make_spec_pair(args.out, arch=args.arch, preset=args.preset,
                                       extra_layers=args.extra_layers,
                                       residual_scale=args.residual_scale, seed=args.seed,
                                       **overrides)
        print(f"wrote a matched speculative pair ({args.arch}, {args.preset}): target {target}, "
              f"draft {draft}")
        return 0
    path = make_model(args.out, arch=args.arch, preset=args.preset, seed=args.seed)
    print(f"wrote a random-weight {args.arch} checkpoint ({args.preset}) to {path}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from raylm.cluster import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed)
    prompts = args.prompt or ["Hello"]
    with LLM(args.model, **engine_kwargs(args)) as llm:
        for out in llm.generate(prompts, params):
            c = out.outputs[0]
            print(f"--- prompt: {out.prompt!r} ({len(out.prompt_token_ids)} tokens)")
            print(c.text)
            print(f"--- {len(c.token_ids)} tokens, finish_reason={c.finish_reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a small random-weight HF checkpoint + tokenizer")
    p.add_argument("out")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "demo", "bench"])
    p.add_argument("--pair", action="store_true",
                   help="write OUT/target and OUT/draft: a draft that agrees with its target "
                        "(the target adds layers with small residual writes; see make_pair.py)")
    p.add_argument("--extra-layers", type=int, default=6, help="--pair: target layers beyond "
                                                                 "the draft's")
    p.add_argument("--draft-layers", type=int, default=None,
                   help="--pair: the draft's layers (default: the preset's)")
    p.add_argument("--residual-scale", type=float, default=0.05,
                   help="--pair: scale of the extra layers' output projections (smaller = the "
                        "draft agrees more)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_model)

    p = sub.add_parser("generate", help="generate text offline")
    _add_engine_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.set_defaults(func=_cmd_generate)

    module, help_text = _SERVE
    p = sub.add_parser("serve", help=help_text)
    _lazy(p, module)

    module, help_text = _DISTILL
    p = sub.add_parser("distill", help=help_text)
    _lazy(p, module)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in _BENCH.items():
        _lazy(bench.add_parser(name, help=help_text), module)
    return parser


def _lazy(p: argparse.ArgumentParser, module_name: str) -> None:
    module = importlib.import_module(module_name)
    module.add_arguments(p)
    p.set_defaults(func=module.run)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("RAYLM_ATTENTION_BACKEND") == "triton":
        import torch

        if not torch.cuda.is_available():  # Triton on CPU = its interpreter, set before import
            os.environ.setdefault("TRITON_INTERPRET", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
