"""`raylm bench serve --router prefix,pow2`: request routers side by side, in one run.

For each router the bench deploys the raylm app on this machine (a local Ray, `--replicas`
replicas with `--num-cpus-per-replica` each, fresh replicas so no router inherits another's
cache), sends the same workload over OpenAI HTTP with `--concurrency` clients, and reads every
replica's counters. Per router it reports the prefix-cache hit rate (cached prompt tokens /
prompt tokens, summed over replicas), TTFT p50/p90, throughput, and how requests spread over the
replicas; a PNG puts the routers next to each other.

Workloads: `shared-prefix` — `--num-prefixes` system prompts of `--prefix-len` words shared by
many users, each request one of them (seeded) plus a distinct question of `--input-len` words;
`random` — distinct prompts of the same total length (the no-regression check).

    raylm bench serve --workload shared-prefix --router prefix,pow2 --replicas 2
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Any

from raylm.cluster.bench.report import format_table, png_path_for, write_json

WORKLOADS = ("shared-prefix", "random")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the router comparison (on top of serve.py's load flags)."""
    parser.add_argument("--router", default=None,
                        help="deploy the app here once per router and compare them, e.g. "
                             "prefix,pow2 (needs no running server)")
    parser.add_argument("--workload", default="random", choices=WORKLOADS)
    parser.add_argument("--num-prefixes", type=int, default=8,
                        help="shared-prefix: distinct system prompts")
    parser.add_argument("--prefix-len", type=int, default=400,
                        help="shared-prefix: words per system prompt (~1,000 tokens)")
    parser.add_argument("--replicas", type=int, default=2, help="--router: replicas deployed")
    parser.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                        help="--router: CPUs each replica reserves")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="--router: extra build_app argument (int/float parsed), repeatable")


def workload_prompts(args: argparse.Namespace, salt: str) -> list[str]:
    from raylm.cluster.bench.serve import _WORDS

    rng = random.Random(args.seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    if args.workload == "shared-prefix":
        if args.num_prefixes < 1 or args.prefix_len < 1:
            raise ValueError("--num-prefixes and --prefix-len must be >= 1")
        systems = [f"{salt} system {i}: {words(args.prefix_len)}" for i in range(args.num_prefixes)]
        return [f"{rng.choice(systems)}\nuser {j}: {words(args.input_len)}"
                for j in range(args.num_requests)]
    # random: nothing shared beyond the salt, the same prompt length as shared-prefix
    return [f"{salt} {j} {words(args.prefix_len + args.input_len)}"
            for j in range(args.num_requests)]


def _serve_args(args: argparse.Namespace, router: str) -> dict[str, Any]:
    out: dict[str, Any] = {"model": args.model, "router": router,
                           "min_replicas": args.replicas, "max_replicas": args.replicas,
                           "num_cpus_per_rank": args.num_cpus_per_replica}
    for item in args.serve_arg:
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def per_replica_stats(handle, num_replicas: int, attempts: int = 200) -> dict[str, dict]:
    """get_stats of every replica (a handle call lands on any one: ask until all answered)."""
    seen: dict[str, dict] = {}
    for _ in range(attempts):
        stats = handle.get_stats.remote().result()
        seen[stats["replica_id"]] = stats
        if len(seen) >= num_replicas:
            break
    return seen


def _delta(before: dict[str, dict], after: dict[str, dict], key: str) -> dict[str, float]:
    return {rid: after[rid][key] - before.get(rid, {}).get(key, 0) for rid in after}


def _run_router(args: argparse.Namespace, router: str, http_port: int) -> dict[str, Any]:
    from ray import serve

    from raylm.cluster.bench.serve import _run_level, summarize
    from raylm.cluster.bench.serve_clients import HttpClient
    from raylm.cluster.serve.app import build_app

    app = f"bench-{router}"
    serve.run(build_app(_serve_args(args, router)), name=app, route_prefix="/")
    try:
        handle = serve.get_deployment_handle("LLMServer", app_name=app)
        client_args = argparse.Namespace(host="127.0.0.1", http_port=http_port,
                                         output_len=args.output_len)

        async def level(prompts: list[str], concurrency: int) -> tuple[list, float]:
            client = HttpClient(client_args)
            try:
                return await _run_level(client, prompts, None, concurrency, args.seed)
            finally:
                await client.close()

        # warm-up: connections and first steps, with prompts of their own
        asyncio.run(level([f"warm {router} {i}" for i in range(4)], 4))
        before = per_replica_stats(handle, args.replicas)
        samples, duration = asyncio.run(level(
            workload_prompts(args, salt=f"{router}{time.time_ns()}"), args.concurrency_level))
        after = per_replica_stats(handle, args.replicas)
        prompt = _delta(before, after, "num_prompt_tokens")
        hits = _delta(before, after, "prefix_cache_hit_tokens")
        total_prompt = sum(prompt.values())
        return {"router": router, **summarize(samples, duration),
                "prefix_hit_rate": sum(hits.values()) / total_prompt if total_prompt else 0.0,
                "prompt_tokens_per_replica": sorted(prompt.values(), reverse=True)}
    finally:
        serve.delete(app)


def _plot(path: Path, results: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["router"] for r in results]
    panels = (("prefix-cache hit rate", [r["prefix_hit_rate"] for r in results]),
              ("TTFT p50 (ms)", [r["ttft_s"]["p50"] * 1e3 for r in results]),
              ("TTFT p90 (ms)", [r["ttft_s"]["p90"] * 1e3 for r in results]),
              ("output tok/s", [r["output_token_throughput"] for r in results]))
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.4))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_routers(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from raylm.cluster.serve.app import AppConfig

    routers = [r.strip() for r in args.router.split(",") if r.strip()]
    for r in routers:
        AppConfig(device="cpu", router=r)  # an unknown router fails before Ray starts
    if args.rates:
        raise ValueError("--router runs a closed loop: give --concurrency (one level), not --rates")
    levels = [int(x) for x in (args.concurrency or "16").split(",")]
    if len(levels) != 1 or levels[0] < 1:
        raise ValueError("--router: give one --concurrency level >= 1")
    args.concurrency_level = levels[0]
    if args.model is None:
        from raylm.cluster.serve.llm_server import resolve_model

        args.model = resolve_model(None)
    needed = args.replicas * args.num_cpus_per_replica
    ray.init(num_cpus=max(1, int(-(-needed // 1))), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
        results = [_run_router(args, r, args.http_port) for r in routers]
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = [[r["router"], r["num_errors"], r["prefix_hit_rate"], r["ttft_s"]["p50"] * 1e3,
             r["ttft_s"]["p90"] * 1e3, r["request_throughput"], r["output_token_throughput"],
             "/".join(str(int(x)) for x in r["prompt_tokens_per_replica"])]
             for r in results]
    print(f"workload {args.workload}: {args.num_requests} requests, concurrency "
          f"{args.concurrency_level}, {args.replicas} replicas x {args.num_cpus_per_replica} CPU")
    print(format_table(["router", "errors", "prefix hit rate", "TTFT p50 ms", "TTFT p90 ms",
                        "req/s", "tok/s", "prompt tokens per replica"], rows))
    out = write_json(args.out, {"workload": args.workload, "replicas": args.replicas,
                                "num_cpus_per_replica": args.num_cpus_per_replica,
                                "concurrency": args.concurrency_level,
                                "num_requests": args.num_requests, "routers": results})
    png = _plot(png_path_for(out), results)
    print(f"wrote {out} and {png}")
    return 0 if not any(r["num_errors"] for r in results) else 1
