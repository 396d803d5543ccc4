"""RMSNorm and fused residual-add + RMSNorm in Triton (one program per row, fp32 accumulation).

Same semantics as :mod:`raylm.kernels.norm_ref`: normalise in fp32, round to the input dtype,
then multiply by the weight (Hugging Face order, which matters for fp16/bf16 parity). The fused
op returns ``(rms_norm(x + residual), x + residual)`` with the sum rounded to the input dtype.
"""
from __future__ import annotations

import torch

from raylm.kernels import triton_utils  # noqa: F401  (sets TRITON_INTERPRET before @triton.jit)
from raylm.kernels.triton_utils import (
    SUPPORTED_DTYPES, check_same_device, check_tensor, next_power_of_2)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [num_rows, hidden]
    residual_out_ptr,  # [num_rows, hidden] (HAS_RESIDUAL only)
    x_ptr,  # [num_rows, hidden]
    residual_ptr,  # [num_rows, hidden] (HAS_RESIDUAL only)
    weight_ptr,  # [hidden]
    eps,
    stride_out, stride_res_out, stride_x, stride_res,
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_res + cols, mask=mask, other=0.0)
        summed = (x.to(tl.float32) + res.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_res_out + cols, summed, mask=mask)
        x = summed
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)  # round like the reference
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty),
             mask=mask)


def _as_rows(name: str, t: torch.Tensor, hidden: int) -> torch.Tensor:
    check_tensor(name, t, t.dim(), SUPPORTED_DTYPES)
    if t.shape[-1] != hidden:
        raise ValueError(f"{name} last dim must be hidden = {hidden}, got {tuple(t.shape)}")
    rows = t.reshape(-1, hidden)  # [num_rows, hidden]; a view whenever the layout allows
    return rows if hidden == 1 or rows.stride(1) == 1 else rows.contiguous()


def _output(name: str, given: torch.Tensor | None, like: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    if given is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    if given.shape != like.shape or given.dtype != dtype or not given.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape "
                         f"{tuple(like.shape)}, got {given.dtype} {tuple(given.shape)}")
    return given


def _launch(x, residual, weight, eps, out, residual_out):
    check_tensor("weight", weight, 1, SUPPORTED_DTYPES)
    hidden = weight.shape[0]
    x_rows = _as_rows("x", x, hidden)
    out = _output("out", out, x, torch.promote_types(weight.dtype, x.dtype))
    out_rows = out.view(-1, hidden)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x {tuple(x.shape)}")
        res_rows = _as_rows("residual", residual, hidden)
        new_residual = _output("residual_out", residual_out, x,
                               torch.promote_types(x.dtype, residual.dtype))
        new_res_rows = new_residual.view(-1, hidden)
        check_same_device(x=x, residual=residual, weight=weight)
    else:
        res_rows = new_res_rows = x_rows  # unused without HAS_RESIDUAL
        new_residual = None
        check_same_device(x=x, weight=weight)
    if x_rows.shape[0]:
        block_h = next_power_of_2(hidden)
        _rms_norm_kernel[(x_rows.shape[0],)](
            out_rows, new_res_rows, x_rows, res_rows, weight, eps,
            out_rows.stride(0), new_res_rows.stride(0), x_rows.stride(0), res_rows.stride(0),
            HIDDEN=hidden, BLOCK_H=block_h, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block_h // 512)),
        )
    return out, new_residual


def rms_norm_triton(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    out: torch.Tensor | None = None,  # [..., hidden]; allocated when None
) -> torch.Tensor:  # [..., hidden]
    return _launch(x, None, weight, eps, out, None)[0]


def add_rms_norm_triton(
    x: torch.Tensor,  # [..., hidden]
    residual: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    out: torch.Tensor | None = None,  # [..., hidden]; allocated when None
    residual_out: torch.Tensor | None = None,  # [..., hidden]; may alias residual
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) in one pass over memory."""
    return _launch(x, residual, weight, eps, out, residual_out)
