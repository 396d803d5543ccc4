"""``raylm bench kernels``: the Triton attention kernels against the GPU's roofline.

Decode attention is memory bound, so it is reported as achieved bandwidth (K/V read + q/out
traffic) and as a fraction of the bandwidth a large device-to-device copy reaches on the same GPU.
Prefill attention is compute bound and is reported in TFLOP/s. Prints a table, writes JSON and a
PNG plot. GPU only: on a machine without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench_kernels.json", help="JSON results path")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context-lens", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")


def _bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbps(device: torch.device, num_bytes: int = 1 << 30) -> float:
    """Bandwidth of a large device-to-device copy (bytes read + bytes written per second)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _bench_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def _case(args, batch: int, q_len: int, seq_len: int, device: torch.device):
    """Query + paged cache + metadata for `batch` sequences, each `q_len` new of `seq_len`."""
    from raylm.kernels.metadata import AttentionMetadata

    dtype, bs = DTYPES[args.dtype], args.block_size
    blocks_per_seq = math.ceil(seq_len / bs)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, bs, args.num_kv_heads, args.head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).to(torch.int32)
    query = torch.randn(batch * q_len, args.num_heads, args.head_dim, dtype=dtype, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.full((batch * q_len,), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32,
                                     device=device),
        seq_lens=torch.full((batch,), seq_len, dtype=torch.int32, device=device),
        block_tables=tables, block_size=bs, max_query_len=q_len, max_seq_len=seq_len,
        query_lens_host=[q_len] * batch, seq_lens_host=[seq_len] * batch)
    return query, k_cache, v_cache, meta


def bench_decode(args, device: torch.device, copy_gbps: float) -> list[dict]:
    from raylm.kernels.attention_triton import choose_num_splits, paged_attention_triton

    rows = []
    elem = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    for batch in args.batch_sizes:
        for ctx in args.context_lens:
            query, k_cache, v_cache, meta = _case(args, batch, 1, ctx, device)
            scale = args.head_dim ** -0.5
            out = torch.empty_like(query)
            ms = _bench_ms(lambda: paged_attention_triton(query, k_cache, v_cache, meta, scale,
                                                          out=out))
            kv_bytes = 2 * batch * ctx * args.num_kv_heads * args.head_dim * elem
            qo_bytes = 2 * query.numel() * elem
            gbps = (kv_bytes + qo_bytes) / (ms * 1e-3) / 1e9
            rows.append({"batch": batch, "context": ctx, "ms": ms, "bytes": kv_bytes + qo_bytes,
                         "gbps": gbps, "fraction_of_copy_bw": gbps / copy_gbps,
                         "num_splits": choose_num_splits(meta, args.num_kv_heads, device)})
            del query, k_cache, v_cache, meta, out
            torch.cuda.empty_cache()
    return rows


def bench_prefill(args, device: torch.device) -> list[dict]:
    from raylm.kernels.attention_triton import paged_attention_triton

    rows = []
    for length in args.prefill_lens:
        query, k_cache, v_cache, meta = _case(args, 1, length, length, device)
        scale = args.head_dim ** -0.5
        out = torch.empty_like(query)
        ms = _bench_ms(lambda: paged_attention_triton(query, k_cache, v_cache, meta, scale,
                                                      out=out))
        # Causal: QK^T and PV each cost 2 * d flops per visible (query, key) pair, ~L^2 / 2 pairs.
        flops = 4 * args.num_heads * args.head_dim * length * (length + 1) / 2
        rows.append({"length": length, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12})
        del query, k_cache, v_cache, meta, out
        torch.cuda.empty_cache()
    return rows


def _plot(path: Path, decode: list[dict], prefill: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for batch in sorted({r["batch"] for r in decode}):
        pts = [r for r in decode if r["batch"] == batch]
        ax1.plot([r["context"] for r in pts], [r["fraction_of_copy_bw"] for r in pts], "o-",
                 label=f"batch {batch}")
    ax1.set(xscale="log", xlabel="context tokens", ylabel="fraction of copy bandwidth",
            title="decode attention", ylim=(0, 1.1))
    ax1.legend()
    ax2.plot([r["length"] for r in prefill], [r["tflops"] for r in prefill], "o-")
    ax2.set(xscale="log", xlabel="prompt tokens", ylabel="TFLOP/s", title="prefill attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    if not torch.cuda.is_available():
        print("raylm bench kernels needs a CUDA GPU (none found); nothing to measure.")
        return 0
    device = torch.device("cuda")
    copy_gbps = copy_bandwidth_gbps(device)
    decode = bench_decode(args, device, copy_gbps)
    prefill = bench_prefill(args, device)
    print(f"device: {torch.cuda.get_device_name(device)}; device copy bandwidth "
          f"{copy_gbps:.0f} GB/s; heads {args.num_heads}/{args.num_kv_heads} d={args.head_dim} "
          f"{args.dtype} block {args.block_size}")
    print(f"{'batch':>6} {'context':>8} {'splits':>6} {'ms':>9} {'GB/s':>8} {'of copy':>8}")
    for r in decode:
        print(f"{r['batch']:>6} {r['context']:>8} {r['num_splits']:>6} {r['ms']:>9.4f} "
              f"{r['gbps']:>8.0f} {r['fraction_of_copy_bw']:>8.1%}")
    print(f"{'prefill':>8} {'ms':>9} {'TFLOP/s':>8}")
    for r in prefill:
        print(f"{r['length']:>8} {r['ms']:>9.3f} {r['tflops']:>8.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(device), "copy_gbps": copy_gbps,
              "config": {k: v for k, v in vars(args).items() if not callable(v)},
              "decode": decode, "prefill": prefill}
    out.write_text(json.dumps(result, indent=2))
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    _plot(plot, decode, prefill)
    print(f"wrote {out} and {plot}")
    return 0
