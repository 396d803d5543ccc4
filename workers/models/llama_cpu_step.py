"""The Llama family's decoder stack as one compiled call on CPU (kernels/csrc/llama_cpu.cpp).

The CPU analogue of the GPU path's CUDA graphs: a batch-1 decode step on CPU spends as long in
Python dispatch (~14 module and op calls per layer, each 10-20 us once a weight stream has
evicted the interpreter from L2) as in everything but the weight reads. The compiled stack runs
the same kernels in the same order (the outputs are bitwise those of the module path), so it is
used for every step it can run: one rank (no all-reduce inside), fp32 weights, the compiled CPU
backend. The weights are captured when it is built (the first step), like a graph capture.

It starts from the token ids (the embedding gather is inside) and, for a step whose every
sampled row is plain greedy, can end at the tokens (:meth:`LlamaCpuStep.greedy`: the LM head and
the argmax inside too). The LM head's weight sweep leaves every cache cold (65 MB for the bench
model, twice the L3): in a batch-1 decode step the sampler's Python took ~90 us there against
21 us warm. Side by side in one process (two engines, batch-1 greedy, 128 tokens) the fused pick
saved 0-8 % per token.

``RAYLM_CPU_FUSED_STEP=0`` (read here only) keeps the module path, for A/B runs.
"""
from __future__ import annotations

import logging
import os

import torch

from raylm.kernels import attention_cpu
from raylm.kernels.cpu_ops import load_extension
from raylm.kernels import linear_plan
from raylm.kernels.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

ENV = "RAYLM_CPU_FUSED_STEP"
# bits of LlamaStepCpu's stream_mask and packed_mask, in the order of _projections(), and the
# LM head's
_PROJECTION_BITS = (1, 2, 4, 8)
_HEAD_BIT = 16


def enabled() -> bool:
    value = os.environ.get(ENV, "").strip().lower() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def _why_not(model, lm_head) -> str | None:
    """None when the compiled stack can run ``model`` (a LlamaModel) and ``lm_head``, else the
    reason."""
    from raylm.kernels.backend import CpuBackend

    layer = model.layers[0]
    attn = layer.self_attn
    backend = attn.attn.backend
    if not enabled():
        return f"{ENV}=0"
    if not isinstance(backend, CpuBackend) or backend.impl != "tiled" or load_extension() is None:
        return "not the compiled CPU backend"
    if attn.qkv_proj.tp.size != 1:
        return "tensor parallel (the all-reduce runs between the layer's ops)"
    if any(p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous()
           for p in (*model.parameters(), lm_head.weight)):
        return "weights not contiguous fp32 on CPU"
    if not attention_cpu.supports_shape(attn.num_heads, attn.num_kv_heads, attn.head_dim):
        return "attention shape outside the compiled kernel"
    cache = attn.rotary_emb.cos_sin_cache
    if cache.dtype != torch.float32 or not cache.is_contiguous():
        return "rotary cache not contiguous fp32"
    return None


def _projections(layer) -> tuple:
    return (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
            layer.mlp.down_proj)


class LlamaCpuStep:
    """Runs LlamaModel's embedding, decoder layers and final norm as one call (and the LM head
    and greedy pick with :meth:`greedy`); :meth:`build` returns None where it cannot (and says
    why, once)."""

    def __init__(self, model, lm_head) -> None:
        def weight(module):
            return None if module is None else module.weight.detach()

        def bias(linear):
            return None if linear.bias is None else linear.bias.detach()

        def packed(linear):
            return linear.packed_weight

        layers = []
        for layer in model.layers:
            attn = layer.self_attn
            qkv, o, gate_up, down = _projections(layer)
            layers.append([
                weight(layer.input_layernorm), weight(layer.post_attention_layernorm),
                weight(qkv), bias(qkv), weight(o), bias(o), weight(gate_up), bias(gate_up),
                weight(down), bias(down),
                weight(attn.q_norm) if attn.qk_norm else None,
                weight(attn.k_norm) if attn.qk_norm else None,
                packed(qkv), packed(o), packed(gate_up), packed(down),
            ])
        attn = model.layers[0].self_attn
        # (bit, (in_features, out_features)) of the layers' projections and of the LM head
        self._layer_bits = [(bit, (p.weight.shape[1], p.weight.shape[0])) for bit, p
                            in zip(_PROJECTION_BITS, _projections(model.layers[0]))]
        self._head_bits = [(_HEAD_BIT, (lm_head.weight.shape[1], lm_head.weight.shape[0]))]
        # (row count, threads) -> (stream_mask, packed_mask): the layers' and the LM head's
        self._layer_masks: dict[tuple[int, int], tuple[int, int]] = {}
        self._head_masks: dict[tuple[int, int], tuple[int, int]] = {}
        # [rows, 0] int64 "no stop ids" per row count: made once, so that no torch call (each
        # lets go of the GIL) lies between the runner's compute hook and the compiled call
        self._no_stops: dict[int, torch.Tensor] = {}
        self._step = load_extension().LlamaStepCpu(
            layers, model.norm.weight.detach(), attn.rotary_emb.cos_sin_cache, attn.num_heads,
            attn.num_kv_heads, attn.head_dim, model.norm.eps, attn.attn.scale,
            model.embed_tokens.weight.detach(), lm_head.weight.detach(), lm_head.packed_weight)

    @classmethod
    def build(cls, model, lm_head) -> "LlamaCpuStep | None":
        """``model``: a LlamaModel; ``lm_head``: its ParallelLMHead (tensor parallel: not run)."""
        reason = _why_not(model, lm_head)
        if reason is not None:
            logger.info("decoder layers run module by module (%s)", reason)
            return None
        logger.info("decoder layers run as one compiled CPU call (%d layers)", len(model.layers))
        return cls(model, lm_head)

    @staticmethod
    def can_run(num_tokens: int, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        k_cache = kv_caches[0][0]
        return (num_tokens > 0 and k_cache.dtype in attention_cpu.CACHE_DTYPES
                and k_cache.is_contiguous())

    def __call__(self, input_ids: torch.Tensor,  # [num_tokens] int64
                 positions: torch.Tensor,  # [num_tokens] int64
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 meta: AttentionMetadata) -> torch.Tensor:  # [num_tokens, hidden], final-normed
        return self._step.forward(*self._args(input_ids, positions, kv_caches, meta, 0))

    def greedy(self, input_ids: torch.Tensor,  # [num_tokens] int64
               positions: torch.Tensor,  # [num_tokens] int64
               kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
               meta: AttentionMetadata,
               logits_indices: torch.Tensor,  # [num_sampled] int64, rows to sample
               num_steps: int = 1,
               stop_token_ids: torch.Tensor | None = None,  # [num_sampled, M] int64, -1 pads
               ) -> torch.Tensor:  # [steps, num_sampled] int64: each row's argmax, per step
        """The greedy tokens of ``num_steps`` decode steps in a row (fewer when every row has
        produced one of its stop ids first); see LlamaStepCpu::greedy."""
        rows = logits_indices.shape[0]
        if stop_token_ids is None:
            stop_token_ids = self._no_stops.get(rows)
            if stop_token_ids is None:
                stop_token_ids = self._no_stops[rows] = torch.empty(rows, 0, dtype=torch.int64)
        return self._step.greedy(*self._args(input_ids, positions, kv_caches, meta, rows),
                                 logits_indices, num_steps, stop_token_ids, meta.block_size)

    def _args(self, input_ids, positions, kv_caches, meta, head_rows: int) -> tuple:
        stream_mask, packed_mask = self._masks(input_ids.shape[0], head_rows)
        return (input_ids, positions, [k for k, _ in kv_caches], [v for _, v in kv_caches],
                meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                stream_mask, packed_mask)

    def _masks(self, rows: int, head_rows: int) -> tuple[int, int]:
        """Which projections take the streaming kernel and which the packed GEMM: the layers'
        at ``rows`` (the step's tokens), the LM head's at ``head_rows`` (its sampled rows).
        The plan is fixed once measured at load: each row count is looked up once (a dict per
        side, so at most one entry per row count the scheduler can produce)."""
        layers = self._planned(self._layer_masks, rows, self._layer_bits)
        if not head_rows:
            return layers
        head = self._planned(self._head_masks, head_rows, self._head_bits)
        return layers[0] | head[0], layers[1] | head[1]

    @staticmethod
    def _planned(cache: dict, rows: int, shapes: list[tuple[int, tuple[int, int]]]
                 ) -> tuple[int, int]:
        """(stream_mask, packed_mask) of (bit, (in_features, out_features)) shapes at ``rows``,
        from ``cache`` or the plan."""
        key = (rows, torch.get_num_threads())
        masks = cache.get(key)
        if masks is not None:
            return masks
        stream_mask = packed_mask = 0
        for bit, (in_features, out_features) in shapes:
            impl = linear_plan.choose(rows, in_features, out_features)
            if impl == linear_plan.STREAM:
                stream_mask |= bit
            elif impl == linear_plan.PACKED:
                packed_mask |= bit
        cache[key] = stream_mask, packed_mask
        return stream_mask, packed_mask
