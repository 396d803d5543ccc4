"""`raylm bench kernels`: argument parsing, the no-GPU path, and the plot/JSON writers."""
from __future__ import annotations

import argparse

import pytest
import torch

from raylm.cluster.bench import kernels as bench_kernels


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    bench_kernels.add_arguments(parser)
    return parser.parse_args(["--out", str(tmp_path / "k.json"), *extra])


def test_defaults_are_the_documented_sweep(tmp_path):
    args = _args(tmp_path)
    assert args.batch_sizes == [1, 16, 64, 256]
    assert args.context_lens == [512, 4096, 16384]
    assert (args.num_heads, args.num_kv_heads, args.head_dim, args.block_size) == (32, 8, 128, 16)
    assert args.dtype == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_without_gpu_says_so_and_succeeds(tmp_path, capsys):
    assert bench_kernels.run(_args(tmp_path)) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "k.json").exists()


def test_plot_is_written(tmp_path):
    decode = [{"batch": b, "context": c, "fraction_of_copy_bw": 0.5}
              for b in (1, 16) for c in (512, 4096)]
    prefill = [{"length": n, "tflops": 100.0} for n in (512, 2048)]
    bench_kernels._plot(tmp_path / "k.png", decode, prefill)
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_small_sweep_on_gpu(tmp_path):
    args = _args(tmp_path, "--batch-sizes", "1", "4", "--context-lens", "512",
                 "--prefill-lens", "256")
    assert bench_kernels.run(args) == 0
    assert (tmp_path / "k.json").exists() and (tmp_path / "k.png").exists()
