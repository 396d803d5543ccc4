"""The synthetic request set the offline benchmarks feed to raylm and to the baseline.

Prompts are random token ids (no dataset download) drawn with a fixed seed from the tokenizer's
vocabulary minus its special tokens, so no prompt contains an EOS/BOS/pad in the middle. Lengths
are lognormal with the requested mean, like real traffic (many short requests, a long tail), and
each request's output length is fixed in advance and generated with ignore_eos, so both systems do
exactly the same work whatever the random weights predict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LENGTH_SIGMA = 0.5  # lognormal shape of the length distributions (std of log length)


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int  # exact number of tokens to generate (ignore_eos)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class ModelInfo:
    """What the workload needs from a checkpoint."""

    max_model_len: int
    allowed_token_ids: np.ndarray  # ids valid for both the tokenizer and the embedding, no specials
    hidden_size: int
    intermediate_size: int | None


@dataclass(frozen=True)
class RunResult:
    """One system's timed run over a request set."""

    name: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s


def load_model_info(model_path: str) -> ModelInfo:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    vocab = min(len(tokenizer), config.vocab_size)
    special = set(tokenizer.all_special_ids)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        special.update(value if isinstance(value, list) else [value] if value is not None else [])
    allowed = np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
    if allowed.size == 0:
        raise ValueError(f"model {model_path!r}: the tokenizer has no non-special token ids")
    max_len = getattr(config, "max_position_embeddings", None) or 2048
    return ModelInfo(
        max_model_len=int(max_len),
        allowed_token_ids=allowed,
        hidden_size=int(config.hidden_size),
        intermediate_size=getattr(config, "intermediate_size", None),
    )


def _lognormal_lengths(rng: np.random.Generator, mean: int, count: int) -> np.ndarray:
    # mu chosen so that E[length] = mean: E[exp(N(mu, s^2))] = exp(mu + s^2 / 2).
    mu = math.log(mean) - LENGTH_SIGMA**2 / 2
    return np.maximum(1, np.rint(rng.lognormal(mu, LENGTH_SIGMA, size=count))).astype(np.int64)


def make_requests(
    info: ModelInfo,
    num_prompts: int,
    prompt_len: int,
    output_len: int,
    seed: int = 0,
    fixed_lengths: bool = False,
) -> list[BenchRequest]:
    """`num_prompts` requests with lognormal prompt/output lengths around the given means
    (exactly those lengths when `fixed_lengths`), clipped so prompt + output <= max_model_len."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    if output_len < 1:
        raise ValueError(f"output_len must be >= 1, got {output_len}")
    if prompt_len + output_len > info.max_model_len:
        raise ValueError(
            f"prompt_len + output_len = {prompt_len + output_len} exceeds the model's "
            f"max length {info.max_model_len}"
        )
    rng = np.random.default_rng(seed)
    if fixed_lengths:
        prompt_lens = np.full(num_prompts, prompt_len, dtype=np.int64)
        output_lens = np.full(num_prompts, output_len, dtype=np.int64)
    else:
        prompt_lens = _lognormal_lengths(rng, prompt_len, num_prompts)
        output_lens = _lognormal_lengths(rng, output_len, num_prompts)
        # Clip the long tail: at most 4x the mean, and the pair must fit the context window.
        prompt_lens = np.minimum(prompt_lens, min(4 * prompt_len, info.max_model_len - 1))
        output_cap = np.minimum(4 * output_len, info.max_model_len - prompt_lens)
        output_lens = np.minimum(output_lens, output_cap)
    requests = []
    for p_len, o_len in zip(prompt_lens.tolist(), output_lens.tolist()):
        ids = rng.choice(info.allowed_token_ids, size=p_len).tolist()
        requests.append(BenchRequest(prompt_token_ids=ids, output_len=o_len))
    return requests


def summarize(requests: list[BenchRequest]) -> dict[str, float]:
    prompt = [r.prompt_len for r in requests]
    output = [r.output_len for r in requests]
    return {
        "num_requests": len(requests),
        "prompt_tokens": int(sum(prompt)),
        "output_tokens": int(sum(output)),
        "mean_prompt_len": float(np.mean(prompt)),
        "mean_output_len": float(np.mean(output)),
        "max_prompt_len": int(max(prompt)),
        "max_output_len": int(max(output)),
    }
