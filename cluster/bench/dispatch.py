"""`raylm bench dispatch`: what the tensor-parallel control path costs per step.

Side by side, in one run, on one group of `--tp` Ray worker actors:
- channel round trip: an empty message broadcast to every rank through the shared-memory
  channel and rank 0's reply (the per-step control cost with no model work);
- Ray call round trip: one plain actor call to rank 0 (what dispatching each step with Ray calls
  would cost, per rank);
- step dispatch overhead: over a batch-1 greedy decode, the executor's wall time per step minus
  rank 0's own compute time (pickling, channel, wake-ups, reply);
- all-reduce latency of one decode step's hidden state, and how many a decode step issues
  (2 per layer + 1 for the embedding, plus the LM head's gather), to say where tp time goes.
"""
from __future__ import annotations

import argparse
import logging
import statistics
from typing import Any

from raylm.cluster.bench import report

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local checkpoint directory or HF repo id")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--num-round-trips", type=int, default=2000)
    parser.add_argument("--output-len", type=int, default=64, help="decode steps timed")
    parser.add_argument("--out", default="bench_dispatch.json", help="JSON result path")


def _percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_us": 1e6 * statistics.median(ordered),
            "p99_us": 1e6 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def run(args: argparse.Namespace) -> int:
    from raylm.cluster import LLM, SamplingParams

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with LLM(args.model, dtype=args.dtype, tensor_parallel_size=args.tp,
             distributed_executor_backend="ray", enable_prefix_caching=False) as llm:
        executor = llm.engine.executor
        channel = _percentiles(executor.ping(args.num_round_trips))
        ray_call = _percentiles(executor.ray_call_latency(min(args.num_round_trips, 500)))
        llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=args.output_len,
                                                     ignore_eos=True))
        stats = llm.get_stats()
        step_us, step_p50_us = stats["executor_dispatch_us_mean"], stats["executor_dispatch_us_p50"]
        cfg = executor.hf_config
        all_reduce_s = executor.all_reduce_latency(cfg.hidden_size) if args.tp > 1 else 0.0
        num_collectives = 2 * cfg.num_hidden_layers + 1 + 1 if args.tp > 1 else 0
    data: dict[str, Any] = {
        "command": "dispatch", "model": args.model, "tp": args.tp, "dtype": args.dtype,
        "channel_round_trip": channel, "ray_call_round_trip": ray_call,
        "step_dispatch_overhead_us": step_us, "step_dispatch_overhead_p50_us": step_p50_us,
        "all_reduce_us": 1e6 * all_reduce_s,
        "collectives_per_decode_step": num_collectives,
        "collective_us_per_decode_step": 1e6 * all_reduce_s * num_collectives,
    }
    print(f"\ntp={args.tp} control path ({args.model}):")
    print(report.format_table(("what", "p50 us", "p99 us"), [
        ("shared-memory channel round trip", channel["p50_us"], channel["p99_us"]),
        ("one Ray actor call round trip", ray_call["p50_us"], ray_call["p99_us"]),
    ]))
    print(f"step dispatch overhead (decode): p50 {step_p50_us:.0f} us/step, mean {step_us:.0f}")
    print(f"Ray call / channel: {ray_call['p50_us'] / channel['p50_us']:.1f}x")
    if args.tp > 1:
        print(f"all-reduce of one hidden row: {1e6 * all_reduce_s:.0f} us x {num_collectives} "
              f"collectives per decode step = {1e6 * all_reduce_s * num_collectives:.0f} us/step")
    report.write_json(args.out, data)
    return 0
