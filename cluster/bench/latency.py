"""`raylm bench latency`: batch-1 decode time per token against the memory-bandwidth floor.

A batch-1 decode step must read every non-embedding weight once, so it cannot be faster than
floor = weight bytes / streaming-read bandwidth (both measured, see roofline.py). The fraction of
the floor achieved is floor / measured time per token (1.0 = at the hardware limit).

Method, the same for raylm and Hugging Face: one greedy request of `output_len` tokens; the time
from the first output token to the last one, over the output_len - 1 decode steps between them,
is the decode time per token (prefill excluded); the time to the first token is reported too.
raylm's times are the engine's own per-request timestamps (RequestOutput.metrics); HF's come from
a streamer that `model.generate` calls after every step. Each figure is the median of
`--num-iters` runs after a warm-up run. HF runs with min_new_tokens = max_new_tokens (EOS
suppressed, like ignore_eos) and its default KV cache; raylm runs with prefix caching off, so
repeating the prompt does not skip its prefill.

The floor is measured side by side with the decode: every timed run sits between two bandwidth
windows, and its fraction uses the faster (stricter) of the two. On a shared VM the bandwidth of
one buffer moves by almost 2x from minute to minute (35-65 GB/s over 166 MB on the 2-core dev
VM), and the decode moves with it; a floor measured minutes away from the run it judges says more
about the neighbours than about the engine. The fraction reported is the median of the runs'
paired fractions; the floor over all windows (the strictest) is reported next to it.

raylm runs greedy decode several steps per executor call (``--max-decode-steps``, default 8;
cluster/multi_step.py), as ``LLM.generate`` does; ``--ab-decode-steps PAIRS`` also times that
against one step per call side by side (two engines in one process, alternating requests).
"""
from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raylm.cluster.bench import report, roofline
from raylm.cluster.cli import json_dict
from raylm.cluster.bench.throughput import (
    add_engine_arguments,
    build_llm,
    free_memory,
    greedy_params,
)
from raylm.cluster.bench.workload import BenchRequest, load_model_info, make_requests

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--tp", type=_tp_list, default=[1],
                        help="tensor-parallel degrees to time side by side, e.g. 1,2")
    parser.add_argument("--speculative-config", type=json_dict, default=None,
                        help="also time each degree with this speculative decoding config "
                             "(JSON), side by side with plain decoding")
    parser.add_argument("--ab-decode-steps", type=int, default=0, metavar="PAIRS",
                        help="also time --max-decode-steps against one step per executor call "
                             "side by side: two engines in this process, PAIRS alternating "
                             "requests in random order (0: skip)")
    parser.add_argument("--out", default="bench_latency.json", help="JSON result path")


@dataclass(frozen=True)
class TokenTimes:
    """Timestamps (seconds, one clock) of one request: submitted, first token, last token."""

    start: float
    first_token: float
    last_token: float


def measure_decode(
    generate: Callable[[], TokenTimes], output_len: int, num_iters: int,
    floor: Callable[[], float],
) -> dict[str, Any]:
    """Median time to first token, decode seconds per token and fraction of the floor over
    `num_iters` runs, each run between two `floor()` windows (seconds per token at the
    bandwidth measured then) and judged against the stricter of its two."""
    generate()  # warm-up
    floors = [floor()]
    per_token = []
    ttfts = []
    for _ in range(num_iters):
        t = generate()
        floors.append(floor())
        ttfts.append(t.first_token - t.start)
        per_token.append((t.last_token - t.first_token) / (output_len - 1))
    paired = [min(floors[i], floors[i + 1]) / per_token[i] for i in range(num_iters)]
    return {
        "ttft_s": statistics.median(ttfts),
        "decode_s_per_token": statistics.median(per_token),
        "fraction_of_memory_floor": statistics.median(paired),
        "run_fractions_of_floor": paired,
        "floor_windows_s_per_token": floors,
    }


def _tp_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tp: a comma-separated list of ints, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--tp: degrees must be >= 1, got {text!r}")
    return values


def _timed_generate(llm, request: BenchRequest, params) -> TokenTimes:
    """One greedy request through ``llm``, timed by the engine's own per-request timestamps."""
    out = llm.generate([request.prompt_token_ids], params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == request.output_len, "ignore_eos forces the length"
    m = out.metrics
    if m is None or m.first_token_time is None or m.finished_time is None:
        raise RuntimeError("the engine returned no per-request timestamps (metrics)")
    return TokenTimes(m.arrival_time, m.first_token_time, m.last_token_time or m.finished_time)


def _raylm_decode(args: argparse.Namespace, request: BenchRequest, floor: Callable[[], float],
                  tp: int = 1, speculative_config: dict | None = None) -> dict[str, Any]:
    llm = build_llm(args, enable_prefix_caching=False, max_num_seqs=1, tensor_parallel_size=tp,
                    speculative_config=speculative_config)
    params = greedy_params(request.output_len)

    def generate() -> TokenTimes:
        return _timed_generate(llm, request, params)

    logger.info("raylm tp=%d: timing batch-1 decode (%d iterations)", tp, args.num_iters)
    result = measure_decode(generate, request.output_len, args.num_iters, floor)
    stats = llm.get_stats()
    # multi-step decode (cluster/multi_step.py, --max-decode-steps): model steps per call
    result["model_steps_per_executor_call"] = (stats["num_model_steps"]
                                               / max(1, stats["num_executor_calls"]))
    if "executor_dispatch_us_mean" in stats:
        result["dispatch_us_per_step"] = stats["executor_dispatch_us_mean"]
    if speculative_config is not None:
        result["spec_acceptance_rate"] = stats["spec_acceptance_rate"]
        result["spec_mean_acceptance_length"] = stats["spec_mean_acceptance_length"]
        result["spec_draft_time_fraction"] = stats["spec_draft_time_fraction"]
    llm.shutdown()
    del llm
    free_memory()
    return result


def ab_decode_steps(args: argparse.Namespace, request: BenchRequest) -> dict[str, Any]:
    """Batch-1 decode per token with args.max_decode_steps against one step per executor call:
    two engines in one process, args.ab_decode_steps pairs of requests, each pair in random
    order (a noisy machine drifts between pairs, not inside one)."""
    engines = {steps: build_llm(args, enable_prefix_caching=False, max_num_seqs=1,
                                max_decode_steps=steps)
               for steps in (args.max_decode_steps, 1)}
    params = greedy_params(request.output_len)

    def per_token(llm) -> float:
        t = _timed_generate(llm, request, params)
        return (t.last_token - t.first_token) / (request.output_len - 1)

    for llm in engines.values():
        per_token(llm)  # warm-up
    rng = random.Random(args.seed)
    times: dict[int, list[float]] = {steps: [] for steps in engines}
    logger.info("timing %d pairs: %d decode steps per call against 1", args.ab_decode_steps,
                args.max_decode_steps)
    for _ in range(args.ab_decode_steps):
        order = list(engines)
        rng.shuffle(order)
        for steps in order:
            times[steps].append(per_token(engines[steps]))
    for llm in engines.values():
        llm.shutdown()
    del engines
    free_memory()
    multi, single = times[args.max_decode_steps], times[1]
    ratios = [m / s for m, s in zip(multi, single)]
    return {"max_decode_steps": args.max_decode_steps, "pairs": len(ratios),
            "ms_per_token": 1e3 * statistics.median(multi),
            "one_step_ms_per_token": 1e3 * statistics.median(single),
            "median_time_ratio": statistics.median(ratios),
            "faster_in": sum(r < 1 for r in ratios)}


def _step_clock() -> Any:
    """A transformers streamer that records when generate hands out each new token: `.times`."""
    from transformers.generation.streamers import BaseStreamer  # lazy: keeps the CLI start fast

    class StepClock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: object) -> None:  # first call: the prompt; then one per step
            self.times.append(time.monotonic())

        def end(self) -> None:
            pass

    return StepClock()


def _hf_decode(args: argparse.Namespace, request: BenchRequest, device: str,
               floor: Callable[[], float]) -> dict[str, Any]:
    from raylm.cluster.bench.hf_baseline import generate_batch, load_hf_model

    model = load_hf_model(args.model, args.dtype, device)

    def generate() -> TokenTimes:
        clock = _step_clock()
        start = time.monotonic()
        generate_batch(model, [request], device, streamer=clock)
        assert len(clock.times) == request.output_len + 1, "one put for the prompt, one per token"
        return TokenTimes(start, clock.times[1], clock.times[-1])

    logger.info("hf: timing batch-1 decode (%d iterations)", args.num_iters)
    result = measure_decode(generate, request.output_len, args.num_iters, floor)
    del model
    free_memory()
    return result


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.output_len < 2:
        raise ValueError(f"output_len must be >= 2 to time decode steps, got {args.output_len}")
    if args.num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {args.num_iters}")
    info = load_model_info(args.model)
    request = make_requests(
        info, 1, args.prompt_len, args.output_len, args.seed, fixed_lengths=True
    )[0]
    device = roofline.bench_device()
    counts = roofline.count_params(args.model)
    weight_bytes = counts.decode_weight_bytes(args.dtype)
    logger.info("the floor: %s memory bandwidth over %.1f MB (the decode weights' size), "
                "measured before and after every timed run", device, weight_bytes / 1e6)

    def floor() -> float:
        return weight_bytes / roofline.memory_bandwidth(device, num_bytes=weight_bytes)

    measured = {}
    for tp in args.tp:
        name = "raylm" if tp == 1 else f"raylm tp={tp}"
        measured[name] = _raylm_decode(args, request, floor, tp)
        if args.speculative_config is not None:
            measured[f"{name} spec"] = _raylm_decode(args, request, floor, tp,
                                                     args.speculative_config)
    if args.baseline == "hf":
        measured["hf"] = _hf_decode(args, request, device, floor)
    ab = ab_decode_steps(args, request) if args.ab_decode_steps > 0 else None
    windows = [f for m in measured.values() for f in m["floor_windows_s_per_token"]]
    floor_s = min(windows)  # the strictest floor of the command: its fastest window
    bandwidth = weight_bytes / floor_s
    results: dict[str, dict[str, Any]] = {}
    for name, m in measured.items():
        results[name] = m | {
            "ms_per_token": 1e3 * m["decode_s_per_token"],
            "tokens_per_s": 1.0 / m["decode_s_per_token"],
            "fraction_of_strictest_floor": floor_s / m["decode_s_per_token"],
        }
    data: dict[str, Any] = {
        "command": "latency",
        "model": args.model,
        "dtype": args.dtype,
        "device": device,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "num_iters": args.num_iters,
        "max_decode_steps": args.max_decode_steps,
        "decode_steps_ab": ab,
        "params": counts.as_dict(),
        "roofline": {
            "memory_bandwidth_bytes_per_s": bandwidth,
            "decode_weight_bytes": weight_bytes,
            "floor_ms_per_token": 1e3 * floor_s,
            "num_windows": len(windows),
            "slowest_window_gb_per_s": weight_bytes / 1e9 / max(windows),
            "bytes_definition": roofline.BYTES_DEFINITION,
        },
        "results": results,
        "tp": args.tp,
        "decode_speed_ratio": (
            results["hf"]["decode_s_per_token"] / results["raylm"]["decode_s_per_token"]
            if "hf" in results and "raylm" in results else None
        ),
    }
    _print_summary(data)
    out = report.write_json(args.out, data)
    if not args.no_png:
        report.bar_chart(
            report.png_path_for(out),
            f"raylm bench latency, batch 1 ({device}, {args.dtype})",
            [
                ("decode ms/token", {k: v["ms_per_token"] for k, v in results.items()}
                 | {"floor": 1e3 * floor_s}),
                ("fraction of memory floor",
                 {k: v["fraction_of_memory_floor"] for k, v in results.items()}),
            ],
        )
    return 0


def _print_summary(data: dict[str, Any]) -> None:
    roof = data["roofline"]
    rows = [
        (name, r["ms_per_token"], r["tokens_per_s"], 1e3 * r["ttft_s"],
         f"{100 * r['fraction_of_memory_floor']:.1f}%",
         f"{100 * r['fraction_of_strictest_floor']:.1f}%")
        for name, r in data["results"].items()
    ]
    print(f"\nbatch-1 latency: {data['model']} ({data['dtype']}, {data['device']}), prompt "
          f"{data['prompt_len']} tokens, {data['output_len']} output tokens")
    print(report.format_table(
        ("system", "decode ms/token", "tokens/s", "TTFT ms", "of floor (paired)",
         "of strictest floor"), rows))
    if data["decode_speed_ratio"] is not None:
        print(f"raylm decode speed / hf: {data['decode_speed_ratio']:.2f}x")
    for name, r in data["results"].items():
        if "model_steps_per_executor_call" in r:
            print(f"{name}: {r['model_steps_per_executor_call']:.2f} model steps per executor "
                  f"call (--max-decode-steps {data['max_decode_steps']}; 1: one per call)")
        if name.endswith(" spec"):
            plain = data["results"][name.removesuffix(" spec")]
            print(f"{name}: {plain['decode_s_per_token'] / r['decode_s_per_token']:.2f}x the "
                  f"decode speed without speculation (acceptance "
                  f"{100 * r['spec_acceptance_rate']:.0f}%, mean acceptance length "
                  f"{r['spec_mean_acceptance_length']:.2f}, draft "
                  f"{100 * r['spec_draft_time_fraction']:.0f}% of step time)")
    ab = data.get("decode_steps_ab")
    if ab is not None:
        print(f"side by side, {ab['pairs']} pairs: {ab['max_decode_steps']} decode steps per call "
              f"{ab['ms_per_token']:.3f} ms/token, one per call {ab['one_step_ms_per_token']:.3f}: "
              f"{ab['median_time_ratio']:.3f} of the time (median of pairs), faster in "
              f"{ab['faster_in']} of {ab['pairs']}")
    base = data["results"].get("raylm")
    for name, r in data["results"].items():
        if name.startswith("raylm tp=") and not name.endswith(" spec") and base is not None:
            print(f"{name} decode speed / tp=1: "
                  f"{base['decode_s_per_token'] / r['decode_s_per_token']:.2f}x "
                  f"(executor dispatch {r.get('dispatch_us_per_step', 0):.0f} us/step)")
    print(f"strictest memory floor: {roof['floor_ms_per_token']:.3f} ms/token = "
          f"{roof['decode_weight_bytes'] / 1e6:.1f} MB of weights at "
          f"{roof['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, the fastest of "
          f"{roof['num_windows']} bandwidth windows (slowest "
          f"{roof['slowest_window_gb_per_s']:.1f} GB/s); \"of floor (paired)\" judges each run "
          f"against the faster of the two windows around it (median over runs)")
    print(f"definition: {roofline.BYTES_DEFINITION}\n")
