"""Shared plumbing for the Triton kernels: interpreter switch and wrapper argument checks.

Triton decides between compiling and interpreting when a kernel is *decorated* (``@triton.jit``
reads ``TRITON_INTERPRET`` at import of the kernel module), so the switch must happen before any
kernel module is imported. Every ``*_triton.py`` module imports this one first: without CUDA the
only way to run a Triton kernel is the interpreter (CPU tensors, numpy semantics), so it is
turned on unless the user set ``TRITON_INTERPRET`` explicitly.
"""
from __future__ import annotations

import os

import torch

INTERPRET_ENV = "TRITON_INTERPRET"

if not torch.cuda.is_available():
    os.environ.setdefault(INTERPRET_ENV, "1")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_tensor(
    name: str,
    t: torch.Tensor,
    ndim: int,
    dtypes: tuple[torch.dtype, ...] | None = None,
    contiguous_last: bool = True,
) -> None:
    """Raise ValueError naming ``name`` if ``t`` has the wrong rank, dtype or inner stride."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be one of {dtypes}, got {t.dtype}")
    if contiguous_last and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must share one device, got {devices}")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (decided when kernels were decorated)."""
    import triton

    return bool(triton.knobs.runtime.interpret)
