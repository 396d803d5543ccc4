"""Hugging Face causal LMs as the trainer's models: load, logits at chosen positions only,
a draft cut from the target's first layers, and saving in HF layout (config + safetensors +
the tokenizer files), which both ``transformers`` and raylm's loader read."""
from __future__ import annotations

import copy
import pathlib
import shutil

import torch

from raylm.workers.distill.batch import Batch

# Tokenizer files copied next to a saved draft (whichever the source checkpoint has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def load_causal_lm(path: str | pathlib.Path, device: torch.device | str,
                   trainable: bool) -> torch.nn.Module:
    """fp32 on ``device``: the draft's master weights, and a target scored exactly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def logits_at(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Logits at ``batch.gen_mask`` only: [num_positions, vocab]. The LM head (the largest
    matmul of a small draft) runs on the trained positions, not on the prompt and padding."""
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=batch.input_ids,
                     attention_mask=batch.attention_mask).last_hidden_state  # [B, T, hidden]
    return model.get_output_embeddings()(hidden[batch.gen_mask])  # [num_positions, vocab]


def draft_from_target(target: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A new model with the target's embedding, first ``num_layers`` decoder layers, final norm
    and LM head (copied, so training the draft leaves the target untouched)."""
    from transformers import AutoModelForCausalLM

    total = target.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"draft_layers must be in [1, {total - 1}] (the target has {total} "
                         f"layers), got {num_layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    for per_layer in ("layer_types",):  # per-layer lists (sliding vs full attention) shrink too
        if isinstance(getattr(config, per_layer, None), list):
            setattr(config, per_layer, getattr(config, per_layer)[:num_layers])
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prefix = f"{target.base_model_prefix}.layers."
    state = {k: v for k, v in target.state_dict().items()
             if not (k.startswith(prefix) and int(k[len(prefix):].split(".")[0]) >= num_layers)}
    missing, unexpected = draft.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if k != "lm_head.weight"], missing  # tied head: the embedding
    return draft.to(next(target.parameters()).device)


def check_same_vocab(target: torch.nn.Module, draft: torch.nn.Module) -> None:
    vt = target.get_output_embeddings().weight.shape[0]
    vd = draft.get_output_embeddings().weight.shape[0]
    if vt != vd:
        raise ValueError(f"draft_init: the draft's vocabulary ({vd}) differs from the target's "
                         f"({vt}); speculation needs the same tokenizer")


def save_checkpoint(model: torch.nn.Module, out_dir: str | pathlib.Path,
                    tokenizer_dir: str | pathlib.Path, dtype: torch.dtype | None = None
                    ) -> pathlib.Path:
    """HF layout: config.json + model.safetensors (+ generation config) + tokenizer files.
    ``dtype``: the stored dtype (default: the training dtype, fp32)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model if dtype in (None, torch.float32) else copy.deepcopy(model).to(dtype)
    to_save.save_pretrained(str(out))
    src = pathlib.Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out
