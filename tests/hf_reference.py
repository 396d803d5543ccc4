"""Hugging Face transformers as the correctness oracle (fp32, CPU)."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    # Run exactly max_new_tokens: raylm runs these with ignore_eos.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = hf_model(str(path))
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, attention_mask=torch.ones(1, len(prompt_ids),
                                                                        dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the first ids: special tokens live there in the test tokenizer.
    return [torch.randint(4, vocab_size, (n,), generator=g).tolist() for n in lengths]
