"""The Llama family on the paged KV cache: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3.

Differences between the family members are configuration, not code paths:
- Qwen2 has a bias on the q/k/v projections;
- Qwen3 RMS-normalises each q and k head before rotary and sets ``head_dim`` explicitly;
- Llama 3.x scales rope (``rope_type="llama3"``); Mistral is Llama with its own defaults.

Module and parameter names mirror the Hugging Face checkpoints, except that q/k/v and gate/up
are fused; :meth:`LlamaForCausalLM.load_weights` routes each checkpoint tensor to its shard.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from raylm.kernels.metadata import AttentionMetadata
from raylm.workers.layers.activation import SiluAndMul
from raylm.workers.layers.attention import PagedAttention
from raylm.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from raylm.workers.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from raylm.workers.layers.norm import RMSNorm
from raylm.workers.layers.parallel import TPGroup
from raylm.workers.layers.rotary import RotaryEmbedding, rope_parameters
from raylm.workers.models.llama_cpu_step import LlamaCpuStep

logger = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]  # each [num_blocks, block_size, num_kv_heads, head_dim]

# (fused parameter, checkpoint name, shard id) for projections fused into one matmul.
_STACKED_PARAMS = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class LlamaAttention(torch.nn.Module):
    def __init__(self, cfg: Any, *, backend, dtype: torch.dtype, device: torch.device,
                 tp: TPGroup) -> None:
        super().__init__()
        head_dim = _head_dim(cfg)
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        is_qwen2 = cfg.model_type == "qwen2"
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, head_dim, cfg.num_attention_heads, num_kv_heads,
            bias=attention_bias or is_qwen2, dtype=dtype, device=device, tp=tp,
        )
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads  # per rank
        self.head_dim = head_dim
        self.split_sizes = [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size]
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * head_dim, cfg.hidden_size,
            bias=attention_bias and not is_qwen2, dtype=dtype, device=device, tp=tp,
        )
        self.qk_norm = cfg.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps, backend=backend, dtype=dtype,
                                  device=device)
            self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps, backend=backend, dtype=dtype,
                                  device=device)
        self.rotary_emb = RotaryEmbedding(head_dim, cfg.max_position_embeddings,
                                          rope_parameters(cfg), backend=backend, device=device)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, head_dim,
                                   head_dim**-0.5, backend=backend)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:  # [num_tokens, hidden]
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        # Views into qkv (last dim contiguous, row stride = the fused width): no copies.
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, kv_cache, meta)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaMLP(torch.nn.Module):
    def __init__(self, cfg: Any, *, dtype: torch.dtype, device: torch.device,
                 tp: TPGroup) -> None:
        super().__init__()
        hidden_act = getattr(cfg, "hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (only 'silu')")
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, bias=bias, dtype=dtype, device=device,
            tp=tp,
        )
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias,
                                           dtype=dtype, device=device, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, cfg: Any, *, backend, dtype: torch.dtype, device: torch.device,
                 tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, backend=backend, dtype=dtype, device=device, tp=tp)
        self.mlp = LlamaMLP(cfg, dtype=dtype, device=device, tp=tp)
        norm_args = dict(backend=backend, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_args)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_args)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,  # [num_tokens, hidden]
        residual: torch.Tensor | None,  # [num_tokens, hidden]; None before the first layer
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm: layer i adds layer i-1's output.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(torch.nn.Module):
    def __init__(self, cfg: Any, *, backend, dtype: torch.dtype, device: torch.device,
                 tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                                   device=device, tp=tp)
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(cfg, backend=backend, dtype=dtype, device=device, tp=tp)
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend=backend, dtype=dtype,
                            device=device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(torch.nn.Module):
    """Serves LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM."""

    def __init__(self, hf_config: Any, *, dtype: torch.dtype, device: torch.device, backend,
                 tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None) -> None:
        super().__init__()
        cfg = hf_config
        tp = TPGroup(tp_rank, tp_size, tp_group)
        self.config = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.model = LlamaModel(cfg, backend=backend, dtype=dtype, device=self.device, tp=tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      device=self.device, tp=tp)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        first_attn = self.model.layers[0].self_attn
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = first_attn.num_kv_heads  # per rank
        self.head_dim = first_attn.head_dim
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self._cpu_step: LlamaCpuStep | None | bool = None  # built at the first step; False: never
        _warn_sliding_window(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[KVCache],  # one per layer
        meta: AttentionMetadata,  # backend.prepare(meta) already called
    ) -> torch.Tensor:  # [num_tokens, hidden]: final normed hidden states
        step = self._compiled_step(input_ids, kv_caches)
        if step is not None:
            return step(input_ids, positions, kv_caches, meta)
        return self.model(input_ids, positions, kv_caches, meta)

    def greedy_tokens(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [num_sampled] int64
        num_steps: int = 1,
        stop_token_ids: torch.Tensor | None = None,  # [num_sampled, M] int64, -1 pads
    ) -> torch.Tensor | None:  # [steps, num_sampled] int64
        """The argmax of compute_logits(forward(...)[logits_indices]), bitwise, in one compiled
        call, for up to ``num_steps`` decode steps in a row (LlamaCpuStep.greedy); None (having
        computed nothing) where the compiled CPU step cannot run."""
        step = self._compiled_step(input_ids, kv_caches)
        if step is None:
            return None
        return step.greedy(input_ids, positions, kv_caches, meta, logits_indices, num_steps,
                           stop_token_ids)

    def _compiled_step(self, input_ids: torch.Tensor,
                       kv_caches: list[KVCache]) -> LlamaCpuStep | None:
        if self._cpu_step is None:
            self._cpu_step = LlamaCpuStep.build(self.model, self.lm_head) or False
        if self._cpu_step and self._cpu_step.can_run(input_ids.shape[0], kv_caches):
            return self._cpu_step
        return None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [num_rows, hidden] -> [num_rows, vocab_size] float32
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face checkpoint tensors into this rank's (fused, sharded) parameters."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue  # derived from the config, not a weight
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue  # the same tensor as the embedding
            shard_id: Any = None
            target = name
            for fused, original, shard in _STACKED_PARAMS:
                if original in name:
                    target, shard_id = name.replace(original, fused), shard
                    break
            param = params.get(target)
            if param is None:
                logger.warning("ignoring checkpoint tensor %s (no matching parameter)", name)
                continue
            param.weight_loader(param, tensor, shard_id)
            loaded.add(target)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


# The other family members share the implementation; the names keep logs and reprs honest.
class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass


def _warn_sliding_window(cfg: Any) -> None:
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", cfg.model_type == "mistral")
    if uses_window and window is not None and window < cfg.max_position_embeddings:
        logger.warning(
            "sliding_window=%d is not applied: attention sees the full context, so outputs "
            "differ from the reference for sequences longer than %d tokens", window, window,
        )
