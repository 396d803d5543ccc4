"""Checkpoint discovery and weight loading: sharded files, dtypes, and clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from raylm.kernels.backend import TorchBackend
from raylm.kernels.metadata import AttentionMetadata
from raylm.workers.loader import (
    iter_safetensors,
    load_model,
    resolve_dtype,
    resolve_model_path,
)


def _prefill_logits(model, token_ids: list[int]) -> torch.Tensor:  # [len, vocab_size]
    """One sequence, whole prompt in one step, blocks 0..n-1."""
    block_size, n = 16, len(token_ids)
    num_blocks = -(-n // block_size)
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.num_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, dtype=torch.int64),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        block_size=block_size, max_query_len=n, max_seq_len=n,
        query_lens_host=[n], seq_lens_host=[n],
    )
    backend = TorchBackend()
    backend.prepare(meta)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(token_ids), torch.arange(n), kv_caches, meta))


def _load(path, dtype=torch.float32):
    return load_model(path, dtype=dtype, device="cpu", backend=TorchBackend())


def test_sharded_checkpoint_loads_to_the_same_logits(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    single = tiny_model("qwen2")
    hf = AutoModelForCausalLM.from_pretrained(str(single), dtype=torch.float32)
    hf.save_pretrained(str(tmp_path), max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(name for name, _ in iter_safetensors(tmp_path)) == sorted(index["weight_map"])
    tokens = list(range(5, 45))
    torch.testing.assert_close(_prefill_logits(_load(tmp_path), tokens),
                               _prefill_logits(_load(single), tokens), rtol=0, atol=0)


def test_loading_casts_to_the_requested_dtype(tiny_model):
    model = _load(tiny_model("llama"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = _prefill_logits(model.float(), [5, 6, 7])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_missing_path_names_model(tmp_path):
    with pytest.raises(ValueError, match="model"):
        resolve_model_path(str(tmp_path / "does-not-exist"))


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_local_directory_resolves_to_itself(tiny_model):
    path = tiny_model("llama")
    assert resolve_model_path(str(path)) == path


def test_unsupported_architecture_is_a_value_error(tiny_model, tmp_path):
    shutil.copytree(tiny_model("llama"), tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architectures"):
        _load(tmp_path / "m")


def test_checkpoint_missing_a_weight_is_a_value_error(tiny_model, tmp_path):
    shutil.copytree(tiny_model("llama"), tmp_path / "m")
    weights_path = tmp_path / "m" / "model.safetensors"
    weights = load_file(str(weights_path))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="down_proj"):
        _load(tmp_path / "m")


def test_resolve_dtype():
    class Config:
        dtype = "bfloat16"

    assert resolve_dtype("auto", Config()) == torch.bfloat16
    assert resolve_dtype("auto", object()) == torch.float32
    assert resolve_dtype("float16", Config()) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3", Config())
