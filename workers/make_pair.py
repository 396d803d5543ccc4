"""A matched (target, draft) pair of random checkpoints for speculative decoding tests and
benchmarks: random models agree ~0% of the time, so the pair is built to agree.

The draft is an ordinary random model of ``preset``. The target is the same model with
``extra_layers`` more decoder layers inserted after the draft's, whose attention and MLP output
projections are scaled by ``residual_scale``: each extra layer only nudges the residual stream,
so the target's next-token distribution stays close to the draft's (agreement rises as the scale
falls) while it costs (layers + extra) / layers times the draft's body per token.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import torch


def make_spec_pair(out_dir: str | os.PathLike, arch: str = "llama", preset: str = "tiny",
                   extra_layers: int = 6, residual_scale: float = 0.05, seed: int = 0,
                   **config_overrides: Any) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes ``out_dir/target`` and ``out_dir/draft``; returns (target, draft)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from raylm.workers.make_model import make_config, make_model, make_tokenizer

    if extra_layers < 1:
        raise ValueError(f"extra_layers must be >= 1, got {extra_layers}")
    if not 0.0 <= residual_scale <= 1.0:
        raise ValueError(f"residual_scale must be in [0, 1], got {residual_scale}")
    out = pathlib.Path(out_dir)
    draft_dir = make_model(out / "draft", arch=arch, preset=preset, seed=seed, **config_overrides)
    draft_state = {}
    for file in sorted(draft_dir.glob("*.safetensors")):
        draft_state.update(load_file(str(file)))
    draft_config = make_config(arch, preset, **config_overrides)
    num_layers = draft_config.num_hidden_layers
    config = make_config(arch, preset, **{**config_overrides,
                                          "num_hidden_layers": num_layers + extra_layers})
    torch.manual_seed(seed + 1000)
    target = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = target.load_state_dict(draft_state, strict=False)
    assert not unexpected, unexpected
    # Only the extra layers start from scratch (and a tied LM head, which is the embedding).
    fresh = [n for n in missing if n != "lm_head.weight"
             and not (".layers." in n and int(n.split(".layers.")[1].split(".")[0]) >= num_layers)]
    assert not fresh, fresh
    with torch.no_grad():
        for layer in target.model.layers[num_layers:]:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
    target_dir = out / "target"
    target.save_pretrained(str(target_dir))
    make_tokenizer().save_pretrained(str(target_dir))
    return target_dir, draft_dir
