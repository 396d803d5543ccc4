"""The hardware roofline (matmul FLOP/s, streaming memory bandwidth) and the model's cost per token.

Benchmarks judge a result against what the machine can do, not against a feeling (STYLE.md):
prefill-heavy throughput against the matmul FLOP/s, batch-1 decode against the time it takes to
stream the weights once from memory. Both hardware figures are measured here, on this machine, in
this process, best of several runs (the least disturbed one: on a shared VM other tenants'
load moves a best-of-5 by 20-40 %, so 15 GEMM and 20 bandwidth runs), measured anew on every
call (the benches take several windows).

Model cost definitions (printed by the commands):
- parameters are split into the input embedding (a gather, no FLOPs), the LM head (vocab x hidden,
  applied only to the rows that are sampled: one per output token) and the body (everything else).
  non-embedding parameters = total - input embedding = body + LM head, counting a tied LM head.
- useful FLOPs = 2 * body * (prompt + output tokens) + 2 * lm_head * output tokens.
  Attention score FLOPs (QK^T, PV) are not counted: they are small at these lengths and depend on
  the kernel; so the fraction slightly understates the work done.
- decode weight bytes = (body + LM head) * bytes per element: what one batch-1 decode step
  must read. The decode floor divides them by the streaming bandwidth measured over a buffer of
  the same size: a decode step re-reads the same bytes every step, so whatever part of them the
  last-level cache keeps (a VM with a large shared L3 keeps a good part of a small model's
  weights) serves the floor as it serves the step, and the fraction cannot pass 100 %.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from raylm.kernels import host_memory

logger = logging.getLogger(__name__)

FLOPS_DEFINITION = (
    "useful FLOPs = 2 * body_params * (prompt + output tokens) "
    "+ 2 * lm_head_params * output tokens; "
    "body = all parameters except the input embedding and the LM head (non-embedding params = "
    "body + lm_head = total - input embedding); the LM head only runs on sampled rows; "
    "attention score FLOPs not counted"
)
BYTES_DEFINITION = (
    "decode floor = (body_params + lm_head_params) * bytes per element / streaming-read bandwidth "
    "over a buffer of that many bytes: one batch-1 decode step reads every non-embedding weight "
    "once, and the same bytes again the next step"
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bench_device() -> str:
    """The device the benchmarks run on: the GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _best_seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(
    device: str = "cpu",
    dtype: str = "float32",
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    repeats: int = 15,
) -> float:
    """Peak measured matmul FLOP/s: the best over a square 2048 GEMM and the model's MLP GEMMs,
    each by torch.mm and, on CPU fp32, by oneDNN on a pre-packed weight (the GEMM raylm's linear
    layers run at these row counts: the peak must be the best this machine does, not one
    library's; on the 2-core AMD EPYC dev VM oneDNN measures ~20 % above MKL's torch.mm).

    The model shapes are a 2048-token batch through the MLP up and down projections, the GEMMs a
    prefill step spends most time in. Uses all of torch's intra-op threads (the library default).
    """
    torch_dtype = resolve_dtype(dtype)
    shapes = [(2048, 2048, 2048)]
    if hidden_size and intermediate_size:
        shapes += [(2048, hidden_size, intermediate_size), (2048, intermediate_size, hidden_size)]
    ext = None
    if device == "cpu" and torch_dtype == torch.float32:
        from raylm.kernels.linear import can_pack, pack_weight

        probe = torch.empty(1, 1)
        if can_pack(probe):
            from raylm.kernels.cpu_ops import load_extension

            ext = load_extension()
    gen = torch.Generator(device="cpu").manual_seed(0)
    rates: dict[str, float] = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen).to(device=device, dtype=torch_dtype)  # [m, k]
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=torch_dtype)  # [k, n]
        out = torch.empty(m, n, device=device, dtype=torch_dtype)  # [m, n]
        flops = 2.0 * m * k * n
        seconds = _best_seconds(lambda: torch.mm(a, b, out=out), device, repeats)
        rates["torch.mm"] = max(rates.get("torch.mm", 0.0), flops / seconds)
        if ext is not None:
            packed = pack_weight(b.t().contiguous())  # W = b^T as [n, k]
            with torch.inference_mode():
                seconds = _best_seconds(lambda: ext.linear_packed(a, packed, None), device,
                                        repeats)
            rates["oneDNN packed"] = max(rates.get("oneDNN packed", 0.0), flops / seconds)
    best = max(rates.values())
    logger.info(
        "measured %s %s matmul: %.1f GFLOP/s (%s; %d threads)", device, dtype, best / 1e9,
        ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in rates.items()),
        torch.get_num_threads(),
    )
    return best


def memory_bandwidth(device: str = "cpu", num_bytes: int | None = None,
                     repeats: int = 20) -> float:
    """Measured streaming memory bandwidth in bytes/s: the best of several ways to stream a
    buffer, so that the floor is what the machine can do, not what one library kernel does:
    a full-tensor sum (read only), a tensor copy (read + write bytes), a matrix-vector product
    over the buffer viewed as [rows, 512] (BLAS gemv), and on CPU raylm's streaming few-row
    kernel on the same view (on 4 KiB pages the hardware prefetcher stops at every page, and
    which method is fastest then changes from machine to machine).

    By default on a buffer far larger than the caches; ``num_bytes`` measures the bandwidth a
    working set of that size gets when it is read over and over (part of it may stay in the
    last-level cache). On CPU the buffer is on 2 MiB pages where the kernel grants them, like
    raylm's weights: on 4 KiB pages every method reads ~20 % slower, which would flatter the
    fraction of the floor."""
    if num_bytes is None:
        num_bytes = (1 << 30) if device == "cuda" else (256 << 20)
    width = 512
    numel = max(num_bytes, 1 << 20) // (4 * width) * width
    if device == "cpu":  # the pages raylm keeps its weights on (kernels/host_memory.py)
        src = host_memory.empty(numel).fill_(1.0)  # [numel]
        dst = host_memory.empty(numel)  # [numel]
    else:
        src = torch.ones(numel, device=device, dtype=torch.float32)  # [numel]
        dst = torch.empty_like(src)  # [numel]
    matrix = src.view(-1, width)  # [numel / width, width]
    vector = torch.ones(width, device=device, dtype=torch.float32)  # [width]
    rates = {
        "read": numel * 4 / _best_seconds(lambda: src.sum(), device, repeats),
        "copy": 2 * numel * 4 / _best_seconds(lambda: dst.copy_(src), device, repeats),
        "gemv": numel * 4 / _best_seconds(lambda: torch.mv(matrix, vector), device, repeats),
    }
    if device == "cpu":
        from raylm.kernels.cpu_ops import load_extension

        ext = load_extension()
        if ext is not None:
            row = vector.view(1, width)  # [1, width]
            rates["stream"] = numel * 4 / _best_seconds(
                lambda: ext.linear_small_batch(row, matrix, None), device, repeats)
    best = max(rates.values())
    logger.info("measured %s memory bandwidth over %.1f MB: %.1f GB/s (%s)", device,
                numel * 4 / 1e6, best / 1e9,
                ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()))
    return best


@dataclass(frozen=True)
class ParamCounts:
    """A decoder's parameters by role (see the module docstring)."""

    total: int  # distinct parameters (a tied LM head counted once, in the embedding)
    embedding: int  # the input token embedding
    lm_head: int  # vocab x hidden (+ bias), counted even when tied to the embedding
    body: int  # everything else: layers, norms

    @property
    def non_embedding(self) -> int:
        return self.body + self.lm_head

    def useful_flops(self, prompt_tokens: int, output_tokens: int) -> float:
        body_flops = 2.0 * self.body * (prompt_tokens + output_tokens)
        return body_flops + 2.0 * self.lm_head * output_tokens

    def decode_weight_bytes(self, dtype: str) -> int:
        return self.non_embedding * resolve_dtype(dtype).itemsize

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "input_embedding": self.embedding,
            "lm_head": self.lm_head,
            "body": self.body,
            "non_embedding": self.non_embedding,
        }


def count_params(model_path: str) -> ParamCounts:
    """Count a checkpoint's parameters by role without loading weights (meta-device model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_module_params(model)


def count_module_params(model: torch.nn.Module) -> ParamCounts:
    """Split a Hugging Face causal LM's parameters into embedding, LM head and body."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    assert embedding is not None and head is not None, "a causal LM has an embedding and a head"
    embed_ids = {id(p) for p in embedding.parameters()}
    head_params = list(head.parameters())
    total = sum(p.numel() for p in model.parameters())  # dedups tied weights
    num_embedding = sum(p.numel() for p in embedding.parameters())
    num_head = sum(p.numel() for p in head_params)
    untied_head = sum(p.numel() for p in head_params if id(p) not in embed_ids)
    body = total - num_embedding - untied_head
    return ParamCounts(total=total, embedding=num_embedding, lm_head=num_head, body=body)
