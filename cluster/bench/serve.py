"""`raylm bench serve`: a load generator against a running `raylm serve` (gRPC or OpenAI HTTP).

Each load level (a Poisson arrival rate, or a fixed number of concurrent clients) sends
`--num-requests` streaming requests with a fixed output length (ignore_eos), and reports
throughput and p50/p90/p99 of time to first token (TTFT), inter-token latency (ITL) and
end-to-end latency. Writes JSON and a PNG of latency against load.

    raylm bench serve --protocol grpc --rates 1,4,16 --num-requests 64
    raylm bench serve --protocol http --concurrency 1,8,32
    raylm bench serve --workload shared-prefix --router prefix,pow2   # serve_routers.py

The clients (grpc, http, in-process engine) are in serve_clients.py.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

from raylm.cluster.bench import serve_routers
from raylm.cluster.bench.cpu_meter import CpuMeter
from raylm.cluster.bench.serve_clients import CLIENTS, Sample
from raylm.cluster.bench.report import (format_table, png_path_for, pooled_ratio_interval,
                                        write_json)
from raylm.cluster.config import parse_stream_interval

_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
          "boxing matches near the river bank under bright autumn skies").split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", default="grpc",
                        help="grpc, http, engine (the in-process AsyncEngine, no serving path), "
                             "or a comma list taking turns level by level, e.g. engine,grpc,http")
    parser.add_argument("--model", default=None,
                        help="checkpoint for the 'engine' protocol (the server's model) and "
                             "for --router (default: the demo model)")
    parser.add_argument("--engine-max-num-seqs", type=int, default=256,
                        help="max_num_seqs of the in-process engine (match the server's)")
    parser.add_argument("--engine-stream-interval", type=parse_stream_interval, default=1,
                        help="stream_interval of the in-process engine (default 1, "
                             "AsyncEngine's own; 'auto' is raylm serve's default)")
    parser.add_argument("--engine-process", choices=["on", "off"], default="off",
                        help="the in-process engine's core in a process of its own (as the "
                             "server's at --engine-process auto) or in a step thread")
    parser.add_argument("--engine-dtype", default="auto",
                        help="dtype of the in-process engine (match the server's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=9000)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--app-name", default="raylm", help="Serve application (gRPC metadata)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rates", default=None, help="Poisson arrival rates in req/s, e.g. 1,4,16")
    load.add_argument("--concurrency", default=None, help="concurrent clients, e.g. 1,8,32")
    parser.add_argument("--num-requests", type=int, default=64, help="requests per load level")
    parser.add_argument("--input-len", type=int, default=32, help="prompt length in words")
    parser.add_argument("--output-len", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every load level this many times, the protocols taking "
                             "turns level by level; figures are pooled over the rounds (a "
                             "noisy machine's drift then falls on every protocol alike)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_results/serve.json", help="JSON path (PNG next to it)")
    serve_routers.add_arguments(parser)


def _prompts(count: int, length: int, seed: int, salt: str = "") -> list[str]:
    """Seeded word prompts; ``salt`` (a run/protocol-unique first word) keeps the server's
    prefix cache from serving one protocol's or an earlier run's prompts to another."""
    rng = random.Random(seed)
    return [" ".join([salt] * bool(salt) + [rng.choice(_WORDS) for _ in range(length)])
            for _ in range(count)]





async def _one(client, prompt: str, samples: list[Sample]) -> None:
    sample = Sample()
    samples.append(sample)
    try:
        await client.request(prompt, sample)
    except Exception as exc:  # a failed request is reported, not fatal to the run
        sample.error = f"{type(exc).__name__}: {exc}"


async def _run_level(client, prompts: list[str], rate: float | None, concurrency: int | None,
                     seed: int) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    start = time.perf_counter()
    if rate is not None:
        rng = random.Random(seed)
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(_one(client, prompt, samples)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    else:
        queue = list(reversed(prompts))

        async def worker() -> None:
            while queue:
                await _one(client, queue.pop(), samples)

        await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
    return samples, time.perf_counter() - start


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}


def summarize(samples: list[Sample], duration_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.num_output_tokens for s in ok)
    return {
        "num_requests": len(samples), "num_errors": len(samples) - len(ok),
        "errors": sorted({s.error for s in samples if s.error})[:5],
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_token_throughput": tokens / duration_s if duration_s > 0 else 0.0,
        "ttft_s": _percentiles([s.ttft for s in ok if s.ttft is not None]),
        "itl_s": _percentiles([x for s in ok for x in s.itls]),
        "e2e_s": _percentiles([s.e2e for s in ok if s.e2e is not None]),
    }


def _plot(path: Path, load_name: str, runs: dict[str, list[dict[str, Any]]]) -> Path:
    """Latency percentiles against load, one colour per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("ttft_s", "itl_s", "e2e_s"),
                              ("TTFT", "inter-token", "end-to-end")):
        for color, (protocol, levels) in zip(("C0", "C1", "C2", "C3"), runs.items()):
            xs = [lv["load"] for lv in levels]
            for q, style in (("p50", "o-"), ("p99", "^:")):
                ys = [lv[key][q] * 1e3 if lv[key][q] is not None else float("nan")
                      for lv in levels]
                ax.plot(xs, ys, style, color=color, label=f"{protocol} {q}")
        ax.set_xlabel(load_name)
        ax.set_ylabel(f"{label} latency (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.rates:
        loads, load_name = [float(x) for x in args.rates.split(",")], "rate (req/s)"
    else:
        loads, load_name = [int(x) for x in (args.concurrency or "1,8").split(",")], "concurrency"
    if any(x <= 0 for x in loads):
        raise ValueError("--rates/--concurrency: load levels must be > 0")
    if args.num_requests < 1:
        raise ValueError("--num-requests must be >= 1")
    if args.rounds < 1:
        raise ValueError("--rounds must be >= 1")
    protocols = [p.strip() for p in args.protocol.split(",")]
    unknown = [p for p in protocols if p not in CLIENTS]
    if unknown:
        raise ValueError(f"--protocol: unknown {unknown}; choose from {sorted(CLIENTS)}")
    run_id = f"{os.getpid():x}{time.time_ns() % 10**6:x}"
    # per protocol, per load level: the samples and seconds of every round
    pooled = {p: [([], 0.0) for _ in loads] for p in protocols}
    rounds: list[dict[str, list[dict[str, Any]]]] = []
    clients = {}
    try:
        for protocol in protocols:
            clients[protocol] = CLIENTS[protocol](args)
            # Warm-up outside the measurement: first connections, proxies, first steps.
            await _run_level(clients[protocol], _prompts(4, args.input_len, args.seed - 1,
                                                         salt=f"{run_id}warm{protocol}"),
                             None, 4, args.seed - 1)
        for r in range(args.rounds):
            this_round: dict[str, list[dict[str, Any]]] = {p: [] for p in protocols}
            for i, load in enumerate(loads):
                # Protocols take turns level by level, and each round starts with the next one,
                # so a drift of the machine's speed falls on all of them alike.
                for protocol in protocols[r % len(protocols):] + protocols[:r % len(protocols)]:
                    # The same seeded prompts for every protocol (ratios compare like with
                    # like), each salted so that no protocol hits another's prefix-cache entries.
                    salt = f"{run_id}{protocol}r{r}"
                    prompts = (serve_routers.workload_prompts(args, salt)
                               if args.workload == "shared-prefix" else
                               _prompts(args.num_requests, args.input_len,
                                        args.seed + i + 7919 * r, salt=salt))
                    meter = CpuMeter()
                    samples, duration = await _run_level(
                        clients[protocol], prompts, load if args.rates else None,
                        None if args.rates else int(load), args.seed + i)
                    this_round[protocol].append({"load": load, **summarize(samples, duration),
                                                 "cpu": meter.stop().to_dict()})
                    so_far, seconds = pooled[protocol][i]
                    pooled[protocol][i] = (so_far + samples, seconds + duration)
            rounds.append({p: sorted(levels, key=lambda lv: loads.index(lv["load"]))
                           for p, levels in this_round.items()})
    finally:
        for client in clients.values():
            await client.close()
    runs = {}
    for protocol in protocols:
        runs[protocol] = []
        for i, load in enumerate(loads):
            samples, seconds = pooled[protocol][i]
            cpus = [rd[protocol][i]["cpu"] for rd in rounds]
            runs[protocol].append({"load": load, **summarize(samples, seconds),
                                   "cpu": {k: _mean([c[k] for c in cpus]) for k in cpus[0]}})
    return {"protocols": protocols, "load": load_name, "input_len_words": args.input_len,
            "output_len": args.output_len, "num_rounds": args.rounds, "runs": runs,
            "rounds": rounds}


def _mean(values: list[Any]) -> Any:
    known = [v for v in values if v is not None]
    if not known:
        return None
    mean = sum(known) / len(known)
    return round(mean) if all(isinstance(v, int) for v in known) else mean


def _vs_engine(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per served protocol and load: throughput / engine's and TTFT p50 added over the
    engine's, of the pooled rounds and of each round (its spread tells the noise)."""
    if "engine" not in result["runs"]:
        return []

    def compare(lv: dict[str, Any], base: dict[str, Any]) -> tuple[float, float | None]:
        ttft, base_ttft = lv["ttft_s"]["p50"], base["ttft_s"]["p50"]
        return (lv["output_token_throughput"] / base["output_token_throughput"],
                None if ttft is None or base_ttft is None else (ttft - base_ttft) * 1e3)

    rows = []
    for protocol in result["protocols"]:
        if protocol == "engine":
            continue
        for i, (lv, base) in enumerate(zip(result["runs"][protocol], result["runs"]["engine"])):
            fraction, added = compare(lv, base)
            per_round = [compare(rd[protocol][i], rd["engine"][i]) for rd in result["rounds"]]
            paired = [(_tokens(rd[protocol][i]), rd[protocol][i]["duration_s"],
                       _tokens(rd["engine"][i]), rd["engine"][i]["duration_s"])
                      for rd in result["rounds"]]
            rows.append({"protocol": protocol, "load": lv["load"],
                         "throughput_fraction": fraction, "ttft_p50_added_ms": added,
                         "throughput_fraction_ci95": pooled_ratio_interval(paired),
                         "throughput_fraction_rounds": [f for f, _ in per_round],
                         "ttft_p50_added_ms_rounds": [a for _, a in per_round]})
    return rows


def _tokens(level: dict[str, Any]) -> float:
    return level["output_token_throughput"] * level["duration_s"]


def _interval(bounds: tuple[float, float] | None) -> str:
    return "-" if bounds is None else f"{bounds[0]:.3g}..{bounds[1]:.3g}"


def _spread(values: list[float | None]) -> str:
    known = sorted(v for v in values if v is not None)
    if len(known) < 2:
        return "-"
    return f"{known[0]:.3g}..{known[-1]:.3g}"


def run(args: argparse.Namespace) -> int:
    if args.router:
        return serve_routers.run_routers(args)
    result = asyncio.run(_bench(args))
    rows = [[protocol, lv["load"], lv["num_errors"], lv["request_throughput"],
             lv["output_token_throughput"],
             *(lv[k][q] * 1e3 if lv[k][q] is not None else None
               for k in ("ttft_s", "itl_s", "e2e_s") for q in ("p50", "p99")),
             lv["cpu"]["process_cores"], lv["cpu"]["machine_busy_cores"]]
            for protocol, levels in result["runs"].items() for lv in levels]
    print(format_table(["protocol", result["load"], "errors", "req/s", "tok/s", "TTFT p50 ms",
                        "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "e2e p50 ms", "e2e p99 ms",
                        "bench CPUs", "busy CPUs"], rows))
    num_cpus = next(iter(result["runs"].values()))[0]["cpu"]["num_cpus"]
    print("bench CPUs: cores this process used (the load generator; for 'engine' also the "
          f"engine it runs); busy CPUs: cores busy machine-wide, of {num_cpus}")
    vs = _vs_engine(result)
    if vs:
        result["vs_engine"] = vs
        print(format_table(
            ["protocol", result["load"], "tok/s / engine's", "95% interval", "per round",
             "TTFT p50 added ms", "per round"],
            [[r["protocol"], r["load"], r["throughput_fraction"],
              _interval(r["throughput_fraction_ci95"]),
              _spread(r["throughput_fraction_rounds"]), r["ttft_p50_added_ms"],
              _spread(r["ttft_p50_added_ms_rounds"])] for r in vs]))
        if result["num_rounds"] > 1:
            print(f"pooled over {result['num_rounds']} rounds (protocols take turns level by "
                  "level); '95% interval': of the pooled ratio, resampling whole rounds "
                  "(from 3 rounds); 'per round': the lowest..highest of the rounds' own figures")
    out = write_json(args.out, result)
    png = _plot(png_path_for(out), result["load"], result["runs"])
    print(f"wrote {out} and {png}")
    errors = [lv["num_errors"] for levels in result["runs"].values() for lv in levels]
    return 0 if not any(errors) else 1
