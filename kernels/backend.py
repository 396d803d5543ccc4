"""One backend interface for the ops the model needs from kernels/, chosen by device.

CUDA tensors use Triton, CPU the compiled CPU ops; ``RAYLM_ATTENTION_BACKEND=torch|cpu|triton``
overrides (read in one place: :func:`backend_name_for`). ``RAYLM_ATTENTION_IMPL=legacy`` selects
the previous CPU attention kernel, for A/B benchmarks (read in :func:`cpu_attention_impl`).
"""
from __future__ import annotations

import os
import sys

import torch

from raylm.kernels.attention_ref import paged_attention_ref, plan_attention_ref
from raylm.kernels.kv_write_ref import write_kv_ref
from raylm.kernels.metadata import AttentionMetadata
from raylm.kernels.norm_ref import add_rms_norm_ref, rms_norm_ref
from raylm.kernels.rotary_ref import apply_rotary_ref

BACKEND_ENV = "RAYLM_ATTENTION_BACKEND"
CPU_IMPL_ENV = "RAYLM_ATTENTION_IMPL"


class TorchBackend:
    """Pure-torch reference: the correctness oracle and the CPU path."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Derive per-step index tensors once; every layer reuses ``meta.plan``."""
        meta.plan = plan_attention_ref(meta)

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        write_kv_ref(key, value, k_cache, v_cache, slot_mapping)

    def attention(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        return paged_attention_ref(query, k_cache, v_cache, meta, scale)

    def rms_norm(self, x, weight, eps: float):
        return rms_norm_ref(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps: float):
        return add_rms_norm_ref(x, residual, weight, eps)

    def rotary(self, positions, query, key, cos_sin_cache) -> None:
        apply_rotary_ref(positions, query, key, cos_sin_cache)

    def copy_blocks(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                    src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole blocks src[i] -> dst[i] in every layer (copy-on-write of forked blocks)."""
        for k_cache, v_cache in kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]


class CpuBackend(TorchBackend):
    """The CPU path: compiled ops (kernels/csrc) where the inputs allow, the reference ops
    otherwise: attention read in place (kernels/attention_cpu.py) instead of gathered copies,
    the KV write as one scatter pass, fused norms and rotary."""

    name = "cpu"

    def __init__(self, impl: str = "tiled") -> None:
        from raylm.kernels import attention_cpu
        from raylm.kernels.cpu_ops import load_extension

        self._ops = attention_cpu
        self.impl = impl  # tiled | legacy
        self._ext = load_extension()
        self._available = self._ext is not None

    def prepare(self, meta: AttentionMetadata) -> None:
        if not self._available:
            super().prepare(meta)

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        if (self._fused(key, value) and k_cache.dtype in self._ops.CACHE_DTYPES
                and k_cache.is_contiguous() and v_cache.is_contiguous()):
            self._ext.write_kv_cpu(key, value, k_cache, v_cache, slot_mapping)
        else:
            write_kv_ref(key, value, k_cache, v_cache, slot_mapping)

    def attention(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        if self._available and self._ops.supports(query, k_cache, self.impl):
            return self._ops.paged_attention_cpu(query, k_cache, v_cache, meta, scale,
                                                 self.impl)
        return paged_attention_ref(query, k_cache, v_cache, meta, scale)

    def _fused(self, *tensors: torch.Tensor) -> bool:
        return self._available and all(t.dtype == torch.float32 and t.stride(-1) == 1
                                       for t in tensors)

    def rms_norm(self, x, weight, eps: float):
        if self._fused(x, weight) and x.dim() == 2:
            return self._ext.rms_norm_cpu(x, weight, eps)
        return rms_norm_ref(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps: float):
        """Adds x into ``residual`` in place (the caller's residual is consumed)."""
        if self._fused(x, residual, weight) and x.dim() == 2 and residual.is_contiguous():
            return self._ext.add_rms_norm_cpu(x, residual, weight, eps)
        return add_rms_norm_ref(x, residual, weight, eps)

    def rotary(self, positions, query, key, cos_sin_cache) -> None:
        if self._fused(query, key, cos_sin_cache) and cos_sin_cache.is_contiguous():
            self._ext.rotary_cpu(positions, query, key, cos_sin_cache)
        else:
            apply_rotary_ref(positions, query, key, cos_sin_cache)


BACKENDS = ("torch", "cpu", "triton")


def backend_name_for(device: torch.device) -> str:
    """CUDA -> triton, CPU -> cpu; ``RAYLM_ATTENTION_BACKEND`` overrides (torch = the pure
    reference everywhere)."""
    name = os.environ.get(BACKEND_ENV, "").strip().lower()
    if name:
        if name not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {name!r}")
        return name
    return "triton" if torch.device(device).type == "cuda" else "cpu"


def cpu_attention_impl() -> str:
    """``RAYLM_ATTENTION_IMPL``: tiled (default) or legacy (the previous kernel, for A/B runs)."""
    from raylm.kernels.attention_cpu import IMPLS

    impl = os.environ.get(CPU_IMPL_ENV, "").strip().lower() or "tiled"
    if impl not in IMPLS:
        raise ValueError(f"{CPU_IMPL_ENV} must be one of {IMPLS}, got {impl!r}")
    return impl


def get_backend(device: torch.device | str) -> TorchBackend:
    name = backend_name_for(torch.device(device))
    if name == "cpu":
        return CpuBackend(cpu_attention_impl())
    if name == "triton":
        if (torch.device(device).type != "cuda" and "triton.language" in sys.modules
                and os.environ.get("TRITON_INTERPRET") != "1"):
            raise RuntimeError("the Triton backend on CPU runs in Triton's interpreter, which "
                               "must be on before triton is first imported: start the process "
                               "with TRITON_INTERPRET=1")
        from raylm.kernels.backend_triton import TritonBackend

        return TritonBackend()
    return TorchBackend()
