"""The Hugging Face baseline: the same requests through `AutoModelForCausalLM.generate`.

How the baseline is run, chosen to be fair to Hugging Face (every choice favours it):
- Static batches, left padding with an attention mask, greedy decoding, the default dynamic KV
  cache. EOS is suppressed with min_new_tokens = max_new_tokens, the HF equivalent of ignore_eos.
- Requests are sorted by (output length, prompt length) before batching. This is an oracle, since
  a server does not know output lengths in advance, and it means a batch wastes almost no decode
  steps on requests that are already done and little compute on padding. raylm gets the requests
  in arrival order and needs no such help.
- A batch generates up to its longest request's output length; only each request's own output
  tokens (and its own unpadded prompt tokens) are counted, so tokens/s means the same thing for
  both systems.
- Several batch sizes are tried, one batch each of the first requests at the median lengths, and
  the fastest one (output tokens/s) runs the full set: "static batches, the best batch size for
  HF".
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from raylm.cluster.bench.roofline import resolve_dtype
from raylm.cluster.bench.workload import BenchRequest, RunResult

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (8, 16, 32, 64)


def load_hf_model(model_path: str, dtype: str, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(dtype))
    return model.to(device).eval()


def _pad_token_id(model: torch.nn.Module) -> int:
    config = model.config
    for value in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module, batch: Sequence[BenchRequest], device: str, streamer: Any = None,
    sampling: dict[str, float] | None = None,
) -> list[list[int]]:
    """Generate one static batch, greedy or with `sampling` (temperature / top_p: HF's
    do_sample, top-k off); returns each request's own output token ids.

    `streamer` (optional) is a transformers streamer: generate calls its put() once for the
    prompt and once per step."""
    from transformers import GenerationConfig

    pad_id = _pad_token_id(model)
    max_prompt = max(r.prompt_len for r in batch)
    max_new = max(r.output_len for r in batch)
    # [batch, max_prompt]
    input_ids = torch.full((len(batch), max_prompt), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)  # [batch, max_prompt]
    for row, request in enumerate(batch):
        input_ids[row, max_prompt - request.prompt_len :] = torch.tensor(request.prompt_token_ids)
        attention_mask[row, max_prompt - request.prompt_len :] = 1
    config = GenerationConfig(
        do_sample=sampling is not None,
        **({"top_k": 0, **sampling} if sampling is not None else {}),
        max_new_tokens=max_new,
        min_new_tokens=max_new,
        pad_token_id=pad_id,
        eos_token_id=model.config.eos_token_id,
    )
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
        streamer=streamer,
    )  # [batch, max_prompt + max_new]
    new_tokens = out[:, max_prompt:].tolist()
    results = []
    for row, request in enumerate(batch):
        tokens = new_tokens[row][: request.output_len]
        assert len(tokens) == request.output_len, "min_new_tokens must force the full length"
        results.append(tokens)
    return results


def run_static_batches(
    model: torch.nn.Module,
    requests: Sequence[BenchRequest],
    batch_size: int,
    device: str,
    show_progress: bool = True,
    sampling: dict[str, float] | None = None,
) -> RunResult:
    """Time `requests` through HF generate in static batches sorted by length (the oracle order)."""
    if batch_size < 1:
        raise ValueError(f"hf batch size must be >= 1, got {batch_size}")
    ordered = sorted(requests, key=lambda r: (r.output_len, r.prompt_len))
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    start = time.perf_counter()
    for batch in tqdm(batches, desc=f"hf generate (batch {batch_size})", disable=not show_progress):
        generate_batch(model, batch, device, sampling=sampling)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return RunResult(
        name="hf",
        elapsed_s=elapsed,
        num_requests=len(requests),
        prompt_tokens=sum(r.prompt_len for r in requests),
        output_tokens=sum(r.output_len for r in requests),
    )


def choose_batch_size(
    model: torch.nn.Module,
    requests: Sequence[BenchRequest],
    batch_sizes: Sequence[int],
    device: str,
    sampling: dict[str, float] | None = None,
) -> tuple[int, dict[int, float]]:
    """Time one batch per batch size; returns the size with the best output tokens/s and every
    size's output tokens/s.

    A probe batch holds the first requests, all set to the median prompt and output length: the
    full run's batches are sorted by length and so nearly uniform, and a probe with one long
    outlier would unfairly penalise the small batch sizes."""
    if not batch_sizes:
        raise ValueError("hf_batch_sizes must name at least one batch size")
    sizes = sorted({min(b, len(requests)) for b in batch_sizes})
    if len(sizes) == 1:
        return sizes[0], {}
    prompt_len = int(statistics.median(r.prompt_len for r in requests))
    output_len = int(statistics.median(r.output_len for r in requests))
    probe = [
        BenchRequest((r.prompt_token_ids * prompt_len)[:prompt_len], output_len)
        for r in requests[: sizes[-1]]
    ]
    scores: dict[int, float] = {}
    for size in tqdm(sizes, desc="hf batch size probe"):
        result = run_static_batches(model, probe[:size], size, device, show_progress=False,
                                    sampling=sampling)
        scores[size] = result.output_tokens_per_s
        logger.info("hf probe: batch %d -> %.1f output tokens/s", size, scores[size])
    best = max(scores, key=scores.__getitem__)
    return best, scores


def run_hf_baseline(
    model_path: str,
    requests: Sequence[BenchRequest],
    dtype: str,
    device: str,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    sampling: dict[str, float] | None = None,
) -> tuple[RunResult, dict[str, object]]:
    """Load the checkpoint with transformers, pick the best static batch size, time all requests.

    Returns the timed run and a description of how it was run (for the JSON)."""
    logger.info("loading %s with transformers (%s, %s)", model_path, dtype, device)
    model = load_hf_model(model_path, dtype, device)
    warmup = BenchRequest(list(requests[0].prompt_token_ids[:8]), 2)
    generate_batch(model, [warmup], device)
    best, scores = choose_batch_size(model, requests, batch_sizes, device, sampling)
    logger.info("hf: running %d requests in static batches of %d", len(requests), best)
    result = run_static_batches(model, requests, best, device, sampling=sampling)
    details: dict[str, object] = {
        "batch_size": best,
        "probe_output_tokens_per_s": {str(k): v for k, v in scores.items()},
        "method": "static batches sorted by (output_len, prompt_len), left padding, "
        + (f"do_sample {sampling}, " if sampling else "greedy, ")
        + "min_new_tokens=max_new_tokens=batch max, only each request's own tokens counted",
    }
    del model
    return result, details
