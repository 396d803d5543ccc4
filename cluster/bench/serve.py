"""`raylm bench serve`: a load generator against a running `raylm serve` (gRPC or OpenAI HTTP).

Each load level (a Poisson arrival rate, or a fixed number of concurrent clients) sends
`--num-requests` streaming requests with a fixed output length (ignore_eos), and reports
throughput and p50/p90/p99 of time to first token (TTFT), inter-token latency (ITL) and
end-to-end latency. Writes JSON and a PNG of latency against load.

    raylm bench serve --protocol grpc --rates 1,4,16 --num-requests 64
    raylm bench serve --protocol http --concurrency 1,8,32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylm.cluster.bench.report import format_table, png_path_for, write_json

_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
          "boxing matches near the river bank under bright autumn skies").split()


@dataclass
class Sample:
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    num_output_tokens: int = 0
    error: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_results/serve.json", help="JSON path (PNG next to it)")


def _prompts(count: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(length)) for _ in range(count)]


class _GrpcClient:
    def __init__(self, args: argparse.Namespace) -> None:
        import grpc

        from raylm.proto import generation_pb2 as pb
        from raylm.proto import generation_pb2_grpc as pb_grpc

        self._pb = pb
        self._channel = grpc.aio.insecure_channel(f"{args.host}:{args.grpc_port}")
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = (("application", args.app_name),)
        self._output_len = args.output_len

    async def request(self, prompt: str, sample: Sample) -> None:
        pb = self._pb
        req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingOptions(
            max_tokens=self._output_len, ignore_eos=True, temperature=0.0))
        start = last = time.perf_counter()
        async for msg in self._stub.GenerateStream(req, metadata=self._metadata):
            new = sum(len(c.token_ids) for c in msg.choices)
            last = _record(sample, start, last, new)
        sample.e2e = time.perf_counter() - start

    async def close(self) -> None:
        await self._channel.close()


class _HttpClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self._base = f"http://{args.host}:{args.http_port}"
        self._output_len = args.output_len
        self._session = None

    async def request(self, prompt: str, sample: Sample) -> None:
        import aiohttp  # a Ray Serve dependency

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        body = {"prompt": prompt, "max_tokens": self._output_len, "ignore_eos": True,
                "temperature": 0.0, "stream": True}
        start = last = time.perf_counter()
        async with self._session.post(self._base + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                # one SSE chunk per choice per engine step, one token each
                last = _record(sample, start, last, len(chunk.get("choices", [])))
        sample.e2e = time.perf_counter() - start

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _record(sample: Sample, start: float, last: float, num_new_tokens: int) -> float:
    """Account a streamed message carrying num_new_tokens; returns its arrival time."""
    if num_new_tokens <= 0:
        return last
    now = time.perf_counter()
    sample.num_output_tokens += num_new_tokens
    if sample.ttft is None:
        sample.ttft = now - start
    else:
        # a message of k tokens (n > 1, speculative steps) spreads its gap over them
        sample.itls += [(now - last) / num_new_tokens] * num_new_tokens
    return now


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


def _plot(path: Path, load_name: str, levels: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv["load"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("ttft_s", "itl_s", "e2e_s"), ("TTFT", "inter-token", "end-to-end")):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ys = [lv[key][q] * 1e3 if lv[key][q] is not None else float("nan") for lv in levels]
            ax.plot(xs, ys, style, label=q)
        ax.set_xlabel(load_name)
        ax.set_ylabel(f"{label} latency (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
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
    client = _GrpcClient(args) if args.protocol == "grpc" else _HttpClient(args)
    levels = []
    try:
        for i, load in enumerate(loads):
            prompts = _prompts(args.num_requests, args.input_len, args.seed + i)
            samples, duration = await _run_level(
                client, prompts, load if args.rates else None, None if args.rates else int(load),
                args.seed + i)
            levels.append({"load": load, **summarize(samples, duration)})
    finally:
        await client.close()
    return {"protocol": args.protocol, "load": load_name, "input_len_words": args.input_len,
            "output_len": args.output_len, "levels": levels}


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(_bench(args))
    rows = [[lv["load"], lv["num_errors"], lv["request_throughput"], lv["output_token_throughput"],
             *(lv[k][q] * 1e3 if lv[k][q] is not None else None
               for k in ("ttft_s", "itl_s", "e2e_s") for q in ("p50", "p99"))]
            for lv in result["levels"]]
    print(format_table([result["load"], "errors", "req/s", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
                        "ITL p50 ms", "ITL p99 ms", "e2e p50 ms", "e2e p99 ms"], rows))
    out = write_json(args.out, result)
    png = _plot(png_path_for(out), result["load"], result["levels"])
    print(f"wrote {out} and {png}")
    return 0 if all(lv["num_errors"] == 0 for lv in result["levels"]) else 1
