"""`raylm bench throughput`: offline throughput of raylm against Hugging Face, and the roofline.

raylm gets every request at once (`LLM.generate` on the whole list, continuous batching); the
baseline runs the same requests through transformers in static batches (see hf_baseline.py).
Both report output tokens/s, total (prompt + output) tokens/s, and the fraction of this machine's
measured matmul FLOP/s that their useful FLOPs reach (definition in roofline.py).
"""
from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

from raylm.cluster.cli import json_dict
from raylm.cluster.bench import report, roofline
from raylm.cluster.bench.workload import (
    BenchRequest,
    ModelInfo,
    RunResult,
    load_model_info,
    make_requests,
    summarize,
)

logger = logging.getLogger(__name__)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hf-batch-sizes: expected e.g. 8,16,32, got {text!r}")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--hf-batch-sizes: sizes must be >= 1, got {text!r}")
    return sizes


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by the bench commands: the model, dtype, and the raylm engine settings."""
    parser.add_argument("--model", required=True, help="local checkpoint directory or HF repo id")
    parser.add_argument("--dtype", default="float32", choices=tuple(roofline.DTYPES))
    parser.add_argument("--baseline", default="hf", choices=("hf", "none"),
                        help="also run the Hugging Face transformers baseline")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-dtype", default="auto",
                        choices=("auto", "float32", "float16", "bfloat16"),
                        help="raylm's KV cache dtype (auto = the model's; HF keeps its own)")
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="KV cache bytes on CPU (default: the engine's choice)")
    parser.add_argument("--max-decode-steps", type=int, default=8,
                        help="raylm: greedy decode steps per executor call where a batch allows "
                             "(1 = one step per call; see cluster/multi_step.py)")
    parser.add_argument("--no-png", action="store_true", help="do not write the PNG chart")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=200, help="mean prompt length (tokens)")
    parser.add_argument("--output-len", type=int, default=128, help="mean output length (tokens)")
    parser.add_argument("--fixed-lengths", action="store_true",
                        help="every request exactly --prompt-len / --output-len (no lognormal)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--hf-batch-sizes", type=_batch_sizes, default=[8, 16, 32, 64],
                        help="static batch sizes to try for the HF baseline (best one is used)")
    parser.add_argument("--decoding", default="greedy", choices=("greedy", "sampling", "mixed"),
                        help="sampling: every request temperature 0.8, top_p 0.95 (the HF baseline "
                             "samples with the same settings); mixed: requests cycle through "
                             "greedy, seeded sampling, beam search (4 beams) and contrastive "
                             "search (alpha 0.6, top_k 4)")
    parser.add_argument("--speculative-config", type=json_dict, default=None,
                        help="also run raylm with this speculative decoding config (JSON), side "
                             "by side with plain decoding")
    parser.add_argument("--out", default="bench_throughput.json", help="JSON result path")


def build_llm(args: argparse.Namespace, enable_prefix_caching: bool = True, **engine: Any) -> Any:
    from raylm.cluster import LLM

    return LLM(
        model=args.model,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        enable_prefix_caching=enable_prefix_caching,
        seed=args.seed,
        prefault_kv_cache=True,  # as `raylm serve` does: steady state, not the pool's first touch
        **({"max_decode_steps": getattr(args, "max_decode_steps", 8)} | engine),
    )


def free_memory() -> None:
    """Give a dropped model's memory back before the next one loads."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def greedy_params(output_len: int) -> Any:
    from raylm.cluster import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # --decoding sampling, raylm and HF alike


def sampling_params(output_len: int) -> Any:
    from raylm.cluster import SamplingParams

    return SamplingParams(max_tokens=output_len, ignore_eos=True, **SAMPLING)


def mixed_params(index: int, output_len: int) -> Any:
    """Request i of a mixed batch: the four decoding kinds in turn, all running together."""
    from raylm.cluster import SamplingParams

    kinds = (dict(temperature=0.0),
             dict(temperature=0.8, top_p=0.95, top_k=50, seed=index),
             dict(temperature=0.0, num_beams=4),
             dict(penalty_alpha=0.6, top_k=4))
    return SamplingParams(max_tokens=output_len, ignore_eos=True, **kinds[index % len(kinds)])


def run_raylm(
    args: argparse.Namespace, info: ModelInfo, requests: Sequence[BenchRequest],
    speculative_config: dict | None = None,
) -> RunResult:
    """Time `LLM.generate` on all requests at once (after a short warm-up generate)."""
    logger.info("raylm: building the engine for %s", args.model)
    llm = build_llm(
        args, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        speculative_config=speculative_config,
    )
    warmup = make_requests(info, 2, 16, 4, seed=args.seed + 1, fixed_lengths=True)
    llm.generate([r.prompt_token_ids for r in warmup], greedy_params(4), use_tqdm=False)
    logger.info("raylm: generating %d requests", len(requests))
    if getattr(args, "decoding", "greedy") == "mixed":
        params = [mixed_params(i, r.output_len) for i, r in enumerate(requests)]
    elif getattr(args, "decoding", "greedy") == "sampling":
        params = [sampling_params(r.output_len) for r in requests]
    else:
        params = [greedy_params(r.output_len) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(r.output_len for r in requests)
    if generated != expected:
        raise RuntimeError(f"raylm generated {generated} tokens, the workload asks {expected}")
    del llm
    free_memory()
    return RunResult(
        name="raylm",
        elapsed_s=elapsed,
        num_requests=len(requests),
        prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        output_tokens=generated,
    )


def result_dict(
    result: RunResult, counts: roofline.ParamCounts, peak_flops: float
) -> dict[str, Any]:
    flops_per_s = counts.useful_flops(result.prompt_tokens, result.output_tokens) / result.elapsed_s
    return {
        "elapsed_s": result.elapsed_s,
        "num_requests": result.num_requests,
        "prompt_tokens": result.prompt_tokens,
        "output_tokens": result.output_tokens,
        "output_tokens_per_s": result.output_tokens_per_s,
        "total_tokens_per_s": result.total_tokens_per_s,
        "requests_per_s": result.requests_per_s,
        "useful_flops_per_s": flops_per_s,
        "fraction_of_compute_roofline": flops_per_s / peak_flops,
    }


def _print_summary(data: dict[str, Any]) -> None:
    rows = [
        (
            name,
            r["elapsed_s"],
            r["output_tokens_per_s"],
            r["total_tokens_per_s"],
            r["requests_per_s"],
            r["useful_flops_per_s"] / 1e9,
            f"{100 * r['fraction_of_compute_roofline']:.2f}%",
        )
        for name, r in data["results"].items()
    ]
    headers = ("system", "time s", "out tok/s", "total tok/s", "req/s", "GFLOP/s", "of roofline")
    roof = data["roofline"]
    print(f"\nthroughput: {data['model']} ({data['dtype']}, {data['device']}), "
          f"{data['workload']['num_requests']} requests, mean prompt "
          f"{data['workload']['mean_prompt_len']:.1f} / output "
          f"{data['workload']['mean_output_len']:.1f} tokens")
    print(report.format_table(headers, rows))
    if data.get("output_throughput_ratio") is not None:
        print(f"raylm / hf output tokens/s: {data['output_throughput_ratio']:.2f}x "
              f"(hf static batch size {data['hf']['batch_size']})")
    if data.get("spec_throughput_ratio") is not None:
        print(f"raylm with speculation / without: {data['spec_throughput_ratio']:.2f}x")
    print(f"compute roofline: {roof['matmul_flops'] / 1e9:.1f} GFLOP/s measured "
          f"({roof['matmul_dtype']}, the best of torch.mm and oneDNN on packed weights over "
          "several shapes)")
    p = data["params"]
    print(f"params: body {p['body']:,}, lm_head {p['lm_head']:,}, input embedding "
          f"{p['input_embedding']:,}")
    print(f"definition: {roofline.FLOPS_DEFINITION}\n")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = load_model_info(args.model)
    requests = make_requests(
        info, args.num_prompts, args.prompt_len, args.output_len, args.seed, args.fixed_lengths
    )
    device = roofline.bench_device()
    matmul_dtype = "float32" if device == "cpu" else args.dtype
    logger.info("measuring the %s roofline (%s matmul, memory bandwidth)", device, matmul_dtype)
    peak = roofline.matmul_flops(device, matmul_dtype, info.hidden_size, info.intermediate_size)
    bandwidth = roofline.memory_bandwidth(device)
    counts = roofline.count_params(args.model)

    runs = {"raylm": run_raylm(args, info, requests)}
    if args.speculative_config is not None:
        runs["raylm spec"] = run_raylm(args, info, requests, args.speculative_config)
    # The peak is the best this machine does: measured again after the runs, the better of the
    # two, so that a window disturbed by something else (a process still exiting) cannot
    # lower the denominator and flatter the fraction.
    peak = max(peak, roofline.matmul_flops(device, matmul_dtype, info.hidden_size,
                                           info.intermediate_size))
    results = {name: result_dict(run, counts, peak) for name, run in runs.items()}
    data: dict[str, Any] = {
        "command": "throughput",
        "model": args.model,
        "dtype": args.dtype,
        "device": device,
        "decoding": args.decoding,
        "kv_cache_dtype": args.kv_cache_dtype,
        "engine": {
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "block_size": args.block_size,
        },
        "workload": summarize(requests) | {"seed": args.seed, "fixed_lengths": args.fixed_lengths},
        "params": counts.as_dict(),
        "roofline": {
            "matmul_flops": peak,
            "matmul_dtype": matmul_dtype,
            "memory_bandwidth_bytes_per_s": bandwidth,
            "flops_definition": roofline.FLOPS_DEFINITION,
        },
        "results": results,
        "output_throughput_ratio": None,
        "spec_throughput_ratio": (
            results["raylm spec"]["output_tokens_per_s"] / results["raylm"]["output_tokens_per_s"]
            if "raylm spec" in results else None),
    }
    if args.baseline == "hf":
        from raylm.cluster.bench.hf_baseline import run_hf_baseline

        hf_result, details = run_hf_baseline(
            args.model, requests, args.dtype, device, args.hf_batch_sizes,
            sampling=SAMPLING if args.decoding == "sampling" else None,
        )
        results["hf"] = result_dict(hf_result, counts, peak)
        data["hf"] = details
        data["output_throughput_ratio"] = (
            results["raylm"]["output_tokens_per_s"] / results["hf"]["output_tokens_per_s"]
        )
    _print_summary(data)
    out = report.write_json(args.out, data)
    if not args.no_png:
        report.bar_chart(
            report.png_path_for(out),
            f"raylm bench throughput ({device}, {args.dtype})",
            [
                ("output tokens/s", {k: v["output_tokens_per_s"] for k, v in results.items()}),
                ("total tokens/s", {k: v["total_tokens_per_s"] for k, v in results.items()}),
                ("fraction of matmul roofline",
                 {k: v["fraction_of_compute_roofline"] for k, v in results.items()}),
            ],
        )
    return 0
