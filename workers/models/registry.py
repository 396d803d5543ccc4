"""Maps a checkpoint's ``config.architectures[0]`` to the model class that serves it."""
from __future__ import annotations

from typing import Any

import torch

from raylm.workers.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

MODEL_REGISTRY: dict[str, type[torch.nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(hf_config: Any) -> type[torch.nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ValueError("config.json has no `architectures` entry; cannot pick a model class")
    arch = architectures[0]
    if arch not in MODEL_REGISTRY:
        raise ValueError(
            f"architectures {architectures} is not supported; supported architectures: "
            f"{', '.join(supported_architectures())}"
        )
    return MODEL_REGISTRY[arch]
