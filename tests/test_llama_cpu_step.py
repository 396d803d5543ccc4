"""The compiled CPU decoder stack (workers/models/llama_cpu_step.py) against the module path:
the same kernels in the same order, so hidden states and KV caches are bitwise equal, for every
family member's variant (q/k/v bias, per-head q/k norm, GQA), mixed prefill + decode steps,
streaming, packed-oneDNN and GEMM row counts, fp32 and bf16 KV caches."""
from __future__ import annotations

import pytest
import torch

from raylm.kernels.backend import CpuBackend
from raylm.kernels.cpu_ops import load_extension
from raylm.kernels.row_pick import argmax_rows
from raylm.workers.loader import load_model
from raylm.workers.models.llama_cpu_step import LlamaCpuStep
from tests.test_models import PagedRunner, _tokens

pytestmark = pytest.mark.skipif(load_extension() is None, reason="no C++ compiler")


def _steps(vocab_size: int) -> list[list[tuple[int, list[int]]]]:
    a, b, c = (_tokens(n, vocab_size, seed) for n, seed in ((90, 1), (12, 2), (7, 3)))
    return [
        [(0, a[:20]), (1, b[:11])],  # two prefills: 31 rows
        [(0, a[20:85]), (1, b[11:12]), (2, c)],  # a chunk starting mid-block + decode + prompt
        [(0, [a[85]]), (1, [a[86]]), (2, [a[87]])],  # decode, 3 rows
        [(0, [a[88]])],  # batch-1 decode
        [(1, a[:2]), (2, a[2:4]), (0, [a[89]])],  # 5 rows
    ]


def _run(model, kv_dtype: torch.dtype, fused: bool) -> tuple[list[torch.Tensor], list]:
    model._cpu_step = None if fused else False
    runner = PagedRunner(model, seed=3)
    runner.backend = CpuBackend()
    runner.kv_caches = [(k.to(kv_dtype), v.to(kv_dtype)) for k, v in runner.kv_caches]
    outs = [runner.forward(chunks) for chunks in _steps(model.vocab_size)]
    assert isinstance(model._cpu_step, LlamaCpuStep) == fused
    return outs, runner.kv_caches


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_compiled_stack_equals_the_module_path(tiny_model, arch, kv_dtype):
    model = load_model(tiny_model(arch), dtype=torch.float32, device="cpu", backend=CpuBackend())
    fused_out, fused_kv = _run(model, kv_dtype, fused=True)
    module_out, module_kv = _run(model, kv_dtype, fused=False)
    for step, (got, want) in enumerate(zip(fused_out, module_out)):
        assert torch.equal(got, want), f"step {step}: {(got - want).abs().max().item()}"
    for (k1, v1), (k2, v2) in zip(fused_kv, module_kv):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("impl", ["packed", "stream", "blas"])
def test_compiled_stack_runs_each_matmul_as_the_module_path_does(tiny_model, monkeypatch, impl):
    """Every projection on one matmul choice (packed weights for all of them): still bitwise
    the module path, and equal to the measured plan's output within fp32 rounding."""
    from raylm.kernels import linear_plan
    from raylm.kernels.linear import pack_weight

    model = load_model(tiny_model("llama"), dtype=torch.float32, device="cpu", backend=CpuBackend())
    measured, _ = _run(model, torch.float32, fused=False)
    for module in model.modules():
        if hasattr(module, "packed_weight"):
            module.packed_weight = pack_weight(module.weight)
    monkeypatch.setattr(linear_plan, "choose",
                        lambda rows, *shape: "blas" if impl == "stream" and rows > 64 else impl)
    fused_out, _ = _run(model, torch.float32, fused=True)
    module_out, _ = _run(model, torch.float32, fused=False)
    for got, want, ref in zip(fused_out, module_out, measured):
        assert torch.equal(got, want)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class _Greedy:
    """Stands in for the model in PagedRunner: each step returns the greedy tokens of the last
    row of every chunk, through the compiled step's fused LM head + argmax (``fused``) or
    through the sampler's path (forward, compute_logits, argmax_rows)."""

    def __init__(self, model, fused: bool) -> None:
        self.model, self.fused, self.rows = model, fused, None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, positions, kv_caches, meta):
        rows = self.rows  # [num_sampled] int64
        if self.fused:
            tokens = self.model.greedy_tokens(input_ids, positions, kv_caches, meta, rows)
            assert tokens is not None, "the compiled step did not run"
            assert tokens.shape == (1, rows.shape[0])  # [steps, num_sampled]: one step
            return tokens[0]
        assert self.model.greedy_tokens(input_ids, positions, kv_caches, meta, rows) is None
        hidden = self.model(input_ids, positions, kv_caches, meta)
        return argmax_rows(self.model.compute_logits(hidden.index_select(0, rows)))


def _greedy_run(model, fused: bool) -> list[torch.Tensor]:
    model._cpu_step = None if fused else False
    greedy = _Greedy(model, fused)
    runner = PagedRunner(greedy, seed=3)
    runner.backend = CpuBackend()
    out = []
    for chunks in _steps(model.vocab_size):
        ends = torch.tensor([len(tokens) for _, tokens in chunks]).cumsum(0)
        greedy.rows = ends - 1
        out.append(runner.forward(chunks))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("head", ["plan", "packed", "stream", "blas"])
def test_fused_greedy_pick_equals_the_sampler_path(tiny_model, monkeypatch, arch, head):
    """greedy_tokens (LM head and argmax inside the compiled call) picks exactly the tokens the
    sampler's path picks, for prefill chunks, mixed and batch-1 steps, tied and untied heads,
    on each matmul choice of the LM head."""
    from raylm.kernels import linear_plan
    from raylm.kernels.linear import pack_weight

    model = load_model(tiny_model(arch), dtype=torch.float32, device="cpu", backend=CpuBackend())
    if head != "plan":
        model.lm_head.packed_weight = pack_weight(model.lm_head.weight)
        vocab = model.lm_head.weight.shape[0]
        choose = linear_plan.choose
        monkeypatch.setattr(linear_plan, "choose", lambda rows, k, n: head if n == vocab
                            else choose(rows, k, n))
    fused = _greedy_run(model, fused=True)
    reference = _greedy_run(model, fused=False)
    for step, (got, want) in enumerate(zip(fused, reference)):
        assert got.dtype == torch.int64 and torch.equal(got, want), step


def test_a_token_id_outside_the_vocabulary_is_an_error_not_a_read_past_the_table(tiny_model):
    model = load_model(tiny_model("llama"), dtype=torch.float32, device="cpu", backend=CpuBackend())
    model._cpu_step = None
    runner = PagedRunner(model, seed=3)
    runner.backend = CpuBackend()
    for bad in (model.vocab_size, -1):
        with pytest.raises(RuntimeError, match="out of range"):
            runner.forward([(0, [1, bad, 2])])
    assert isinstance(model._cpu_step, LlamaCpuStep)


def test_the_module_path_is_kept_where_the_stack_cannot_run(tiny_model, monkeypatch):
    from raylm.kernels.backend import TorchBackend

    model = load_model(tiny_model("llama"), dtype=torch.float32, device="cpu",
                       backend=TorchBackend())
    # the reference backend: module by module
    assert LlamaCpuStep.build(model.model, model.lm_head) is None
    model = load_model(tiny_model("llama"), dtype=torch.float32, device="cpu",
                       backend=CpuBackend())
    assert isinstance(LlamaCpuStep.build(model.model, model.lm_head), LlamaCpuStep)
    monkeypatch.setenv("RAYLM_CPU_FUSED_STEP", "0")
    assert LlamaCpuStep.build(model.model, model.lm_head) is None
    monkeypatch.setenv("RAYLM_CPU_FUSED_STEP", "yes")
    with pytest.raises(ValueError, match="RAYLM_CPU_FUSED_STEP"):
        LlamaCpuStep.build(model.model, model.lm_head)
