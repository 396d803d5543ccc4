"""`raylm bench structured`: what structured output costs.

1. Library comparison (grammar_libs.py): token-mask time per step for a batch at steady size,
   compile time and output validity, for each installed candidate library.
2. Engine throughput at one batch: the same requests (seeded sampling at temperature 1, fixed
   length) as free text and constrained to a JSON schema, alternating in one run; the ratio of
   their best throughputs is the structured-output overhead (also per CPU second, steadier
   on a shared machine). The schema is open-ended enough (a long array of small records)
   that outputs run to max_tokens like the free-text ones, so both batches stay full.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from raylm.cluster.bench import report

logger = logging.getLogger(__name__)

# 100 records of bounded fields: long enough that max_tokens ends every output.
THROUGHPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 100, "maxItems": 100, "items": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                       "label": {"type": "string", "maxLength": 16},
                       "kind": {"enum": ["alpha", "beta", "gamma"]},
                       "ok": {"type": "boolean"}},
        "required": ["id", "label", "kind", "ok"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local checkpoint directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=64, help="concurrent requests")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--json-schema", default=None,
                        help="JSON schema file for the throughput run (default: a built-in "
                             "open-ended record list)")
    parser.add_argument("--libraries", default="xgrammar,llguidance,outlines-core",
                        help="grammar libraries to compare ('' to skip the comparison)")
    parser.add_argument("--library-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None,
                        help="mask threads for the library comparison (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating free-text / JSON-schema runs (the best of each counts)")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--out", default="bench_structured.json")


def compare_libraries(args: argparse.Namespace) -> list[dict[str, Any]]:
    import os

    from transformers import AutoConfig, AutoTokenizer

    from raylm.cluster.bench.grammar_libs import measure_library

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    threads = args.threads or os.cpu_count() or 1
    results = []
    for name in [n for n in args.libraries.split(",") if n]:
        try:
            results.append(measure_library(name, tokenizer, vocab, [tokenizer.eos_token_id],
                                           args.batch, args.library_steps, threads))
        except ImportError as exc:
            logger.warning("%s is not installed (%s): skipped", name, exc)
    print(report.format_table(
        ["library", "batch", "mask ms/step", "advance ms/step", "compile ms/schema",
         "valid/finished"],
        [[r["library"], r["batch"], r["mask_ms_per_step"], r["advance_ms_per_step"],
          r["compile_ms_per_schema"], f"{r['valid']}/{r['finished']}"] for r in results]))
    return results


def measure_throughput(args: argparse.Namespace) -> dict[str, Any]:
    from raylm.cluster import LLM, SamplingParams

    schema = THROUGHPUT_SCHEMA
    if args.json_schema:
        with open(args.json_schema) as f:
            schema = json.load(f)
    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=args.batch)
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(args.prompt_len)] for i in range(args.batch)]
    free = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len, ignore_eos=True)
            for i in range(args.batch)]
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len,
                                  structured_outputs={"json": schema})
                   for i in range(args.batch)]
    llm.generate(prompts[:2], constrained[:2], use_tqdm=False)  # warm-up, grammar compiled
    runs: dict[str, list[dict[str, float]]] = {"free text": [], "json schema": []}
    # Alternating repeats, best of each: a shared machine's load drifts between runs.
    for _ in range(args.repeats):
        for name, params in (("free text", free), ("json schema", constrained)):
            mask0 = llm.get_stats().get("grammar_mask_seconds", 0.0)
            cpu0, start = time.process_time(), time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            runs[name].append({
                "seconds": elapsed, "cpu_seconds": cpu, "output_tokens": tokens,
                "tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu,
                "mask_seconds": llm.get_stats().get("grammar_mask_seconds", 0.0) - mask0})
    best = {name: max(r, key=lambda x: x["tokens_per_s"]) for name, r in runs.items()}
    ratio = best["json schema"]["tokens_per_s"] / best["free text"]["tokens_per_s"]
    cpu_ratio = (max(r["tokens_per_cpu_s"] for r in runs["json schema"])
                 / max(r["tokens_per_cpu_s"] for r in runs["free text"]))
    print(report.format_table(
        ["run", "output tokens", "seconds", "tokens/s", "tokens/cpu-s", "mask seconds"],
        [[f"{k} #{i}", v["output_tokens"], v["seconds"], v["tokens_per_s"],
          v["tokens_per_cpu_s"], v["mask_seconds"]]
         for k, r in runs.items() for i, v in enumerate(r)]))
    print(f"json schema / free text throughput at batch {args.batch} (best of {args.repeats}): "
          f"{ratio:.3f}x wall, {cpu_ratio:.3f}x per CPU second")
    # What the grammar adds per step, by part (the ratio above is noisy on a shared machine).
    fastest = best["json schema"]
    num_steps = args.output_len  # one token per sequence per step, the first with the prefill
    apply_ms = _apply_ms(args.batch, llm.engine.vocab_size)
    mask_ms = min(r["mask_seconds"] for r in runs["json schema"]) * 1e3 / num_steps
    step_ms = fastest["seconds"] * 1e3 / num_steps
    print(f"per step at batch {args.batch}: mask fill {mask_ms:.2f} ms + mask apply "
          f"{apply_ms:.2f} ms of a {step_ms:.1f} ms step "
          f"({(mask_ms + apply_ms) / step_ms:.1%})")
    return {"batch": args.batch, "output_len": args.output_len, "runs": runs, "ratio": ratio,
            "cpu_ratio": cpu_ratio, "mask_fill_ms_per_step": mask_ms,
            "mask_apply_ms_per_step": apply_ms, "step_ms": step_ms}


def _apply_ms(batch: int, vocab: int, repeats: int = 5) -> float:
    """The sampler's bitmask application on [batch, vocab] logits (best of `repeats`)."""
    import numpy as np
    import torch

    from raylm.workers.logits_processors import apply_token_bitmask

    logits = torch.randn(batch, vocab)
    words = np.random.default_rng(0).integers(-(2**31), 2**31 - 1, (batch, (vocab + 31) // 32),
                                              dtype=np.int32)
    bitmask, rows = torch.from_numpy(words), list(range(batch))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        apply_token_bitmask(logits, rows, bitmask)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def run(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {"model": args.model}
    if args.libraries:
        result["libraries"] = compare_libraries(args)
    if not args.no_throughput:
        result["throughput"] = measure_throughput(args)
    print(f"wrote {report.write_json(args.out, result)}")
    return 0
