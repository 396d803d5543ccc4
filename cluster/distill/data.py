"""Distillation data: prompts (a JSONL file or the packaged corpus) and continuations generated
by raylm's own engine, as training samples."""
from __future__ import annotations

import json
import pathlib
import random

from raylm.cluster.llm import LLM
from raylm.cluster.sampling_params import SamplingParams
from raylm.workers.distill.batch import Sample

# The generation engine shares the machine with the trainer's models: a small KV pool is plenty
# for a few dozen short sequences (the scheduler queues the rest).
_CPU_KV_BYTES = 256 << 20
_GPU_MEMORY_FRACTION = 0.3


def load_texts(path: str | None) -> list[str]:
    """Each JSONL line's "prompt" (or "text") field; without a path, the packaged corpus's
    paragraphs (workers/data/corpus.txt). Duplicates are dropped, order kept."""
    if path is None:
        from raylm.workers.make_model import CORPUS_PATH

        texts = CORPUS_PATH.read_text().split("\n\n")
    else:
        texts = []
        for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"prompts: line {n} of {path} has no string 'prompt' or 'text'")
            texts.append(text)
    texts = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
    if not texts:
        raise ValueError(f"prompts: no prompts in {path or 'the packaged corpus'}")
    return texts


def split_prompts(prompt_ids: list[list[int]], num_eval: int, seed: int
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held out), after a seeded shuffle."""
    if len(prompt_ids) <= num_eval:
        raise ValueError(f"prompts: {len(prompt_ids)} prompts leave none for training after "
                         f"{num_eval} held out (num_eval_prompts)")
    order = list(range(len(prompt_ids)))
    random.Random(seed).shuffle(order)
    shuffled = [prompt_ids[i] for i in order]
    return shuffled[num_eval:], shuffled[:num_eval]


def tokenize_prompts(tokenizer, texts: list[str], prompt_len: int) -> list[list[int]]:
    """The first ``prompt_len`` tokens of each text (tokenized as the engine does)."""
    ids = [tokenizer.encode(t)[:prompt_len] for t in texts]
    return [p for p in ids if p]


def generate_samples(model: str, prompt_ids: list[list[int]], max_new_tokens: int,
                     temperature: float, seed: int, device: str) -> list[Sample]:
    """Continuations of ``prompt_ids`` by ``model`` with raylm's engine (greedy at temperature
    0; request i seeded ``seed + i`` otherwise). Sequences that generated nothing are dropped."""
    memory = (dict(kv_cache_memory=_CPU_KV_BYTES) if device == "cpu"
              else dict(gpu_memory_utilization=_GPU_MEMORY_FRACTION))
    params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens,
                             seed=None if temperature == 0 else seed + i)
              for i in range(len(prompt_ids))]
    with LLM(model, device=device, seed=seed, **memory) as llm:
        outputs = llm.generate(prompt_ids, params)
    return [Sample(tuple(p) + tuple(o.outputs[0].token_ids), len(p))
            for p, o in zip(prompt_ids, outputs) if o.outputs[0].token_ids]
