"""The clients `raylm bench serve` drives: one request per call, timed into a `Sample`.

- grpc: `raylm.v1.Generation/GenerateStream` of a running server
- http: OpenAI `/v1/completions` with `stream: true` (SSE) of a running server
- engine: the same requests straight into an in-process AsyncEngine (no serving path)
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field


@dataclass
class Sample:
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    num_output_tokens: int = 0
    error: str | None = None


def record_message(sample: Sample, start: float, last: float, num_new_tokens: int) -> float:
    """Account a streamed message carrying num_new_tokens; returns its arrival time. Every
    token after the first gets one inter-token latency."""
    if num_new_tokens <= 0:
        return last
    now = time.perf_counter()
    sample.num_output_tokens += num_new_tokens
    if sample.ttft is None:
        sample.ttft = now - start
        # a first message of k tokens (a reader that fell behind merged deltas): the other
        # k - 1 arrived with the first one
        sample.itls += [0.0] * (num_new_tokens - 1)
    else:
        # a message of k tokens (stream_interval > 1, speculative steps, n > 1) spreads its
        # gap over them
        sample.itls += [(now - last) / num_new_tokens] * num_new_tokens
    return now


class GrpcClient:
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
            last = record_message(sample, start, last, new)
        sample.e2e = time.perf_counter() - start

    async def close(self) -> None:
        await self._channel.close()


class HttpClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self._base = f"http://{args.host}:{args.http_port}"
        self._output_len = args.output_len
        self._session = None

    async def request(self, prompt: str, sample: Sample) -> None:
        import aiohttp  # a Ray Serve dependency

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        # continuous_usage_stats (vLLM's): every chunk says how many tokens it carries (its
        # usage's completion_tokens so far), so a chunk of k tokens (stream_interval > 1)
        # spreads its gap over k inter-token latencies, as a gRPC message does
        body = {"prompt": prompt, "max_tokens": self._output_len, "ignore_eos": True,
                "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        start = last = time.perf_counter()
        tokens_so_far = 0
        async with self._session.post(self._base + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage") and not chunk.get("choices"):
                    # The final usage chunk: the exact count, whatever the stream interval.
                    sample.num_output_tokens = chunk["usage"]["completion_tokens"]
                    continue
                # SSE chunks carry text, not ids; without a usage, one token per chunk
                usage = chunk.get("usage")
                if usage:
                    new, tokens_so_far = (usage["completion_tokens"] - tokens_so_far,
                                          usage["completion_tokens"])
                else:
                    new = len(chunk.get("choices", []))
                last = record_message(sample, start, last, new)
        sample.e2e = time.perf_counter() - start

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class EngineClient:
    """The same requests straight into an in-process AsyncEngine: the baseline that tells
    what the serving path (proxy, ingress, handle, streaming) costs."""

    def __init__(self, args: argparse.Namespace) -> None:
        if not args.model:
            raise ValueError("--model is required for --protocol engine")
        from raylm.cluster import AsyncEngine, SamplingParams

        self._engine = AsyncEngine(args.model, dtype=args.engine_dtype,
                                   max_num_seqs=args.engine_max_num_seqs,
                                   stream_interval=args.engine_stream_interval,
                                   prefault_kv_cache=True,  # as the server's pool is
                                   engine_process=args.engine_process == "on")
        self._params = SamplingParams(max_tokens=args.output_len, ignore_eos=True,
                                      temperature=0.0)

    async def request(self, prompt: str, sample: Sample) -> None:
        start = last = time.perf_counter()
        async for out in self._engine.generate(prompt, self._params):
            last = record_message(sample, start, last, len(out.outputs[0].delta_token_ids))
        sample.e2e = time.perf_counter() - start

    async def close(self) -> None:
        self._engine.shutdown()


CLIENTS = {"grpc": GrpcClient, "http": HttpClient, "engine": EngineClient}
