"""Find a checkpoint, read its safetensors, and build a model on this rank (DESIGN.md section 6)."""
from __future__ import annotations

import json
import logging
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from raylm.kernels import host_memory
from raylm.workers.layers.linear import prepare_cpu_linears
from raylm.workers.models.registry import get_model_class

logger = logging.getLogger(__name__)

SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def resolve_model_path(model: str, revision: str | None = None) -> pathlib.Path:
    """A local checkpoint directory, or a Hugging Face repo id downloaded to the local cache."""
    local = pathlib.Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"model directory {model!r} has no config.json")
        return local
    if _looks_like_path(model):
        raise ValueError(f"model {model!r} is not an existing directory")
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(model, revision=revision, allow_patterns=SNAPSHOT_PATTERNS)
    except Exception as exc:  # hub errors are many types: offline, gated, not found, bad id
        raise ValueError(
            f"model {model!r} is neither a local directory nor a downloadable Hugging Face "
            f"repo id ({type(exc).__name__}: {exc})"
        ) from exc
    return pathlib.Path(snapshot)


def safetensors_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's weight files: those named by the index when there is one."""
    path = pathlib.Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors files")
    return files


class CheckpointTensor:
    """A tensor of a safetensors file, not read yet. ``narrow`` only records which rows or
    columns a rank keeps; ``load`` reads just those bytes. So a tensor-parallel rank reads its
    own shard of each weight and never holds the full model (the layers' weight loaders call
    ``narrow`` then ``load``, exactly as they would on a real tensor)."""

    def __init__(self, source, shape: tuple[int, ...],
                 index: tuple[slice, ...] | None = None) -> None:
        self._source = source  # safetensors slice handle (get_slice)
        self._index = index if index is not None else tuple(slice(0, n) for n in shape)
        self.shape = torch.Size(s.stop - s.start for s in self._index)

    def narrow(self, dim: int, start: int, length: int) -> "CheckpointTensor":
        if not (0 <= start and start + length <= self.shape[dim]):
            raise ValueError(f"shard [{start}, {start + length}) is outside dim {dim} of a "
                             f"checkpoint tensor of shape {tuple(self.shape)}")
        base = self._index[dim].start
        index = list(self._index)
        index[dim] = slice(base + start, base + start + length)
        return CheckpointTensor(self._source, (), tuple(index))

    def load(self) -> torch.Tensor:
        if not self.shape:  # 0-d
            return self._source[:]
        return self._source[self._index]


def iter_safetensors(path: str | pathlib.Path) -> Iterator[tuple[str, CheckpointTensor]]:
    """Yield (name, lazy tensor) for every tensor of the checkpoint; nothing is read until a
    weight loader asks for its shard."""
    files = safetensors_files(path)
    for file in tqdm(files, desc="Loading safetensors", unit="file", disable=len(files) < 2):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                source = f.get_slice(name)
                yield name, CheckpointTensor(source, tuple(source.get_shape()))


def resolve_dtype(dtype: str, hf_config: Any) -> torch.dtype:
    """``"auto"`` = the checkpoint's dtype (float32 when the config does not say)."""
    if dtype == "auto":
        found = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if found is None:
            return torch.float32
        if isinstance(found, torch.dtype):
            return found
        dtype = str(found).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(model_path: str | pathlib.Path, *, dtype: torch.dtype,
               device: torch.device | str, backend, tp_rank: int = 0, tp_size: int = 1,
               tp_group: Any = None) -> torch.nn.Module:
    """Build the model of ``config.json`` on ``device`` and load this rank's weight shards."""
    from transformers import AutoConfig

    model_path = pathlib.Path(model_path)
    hf_config = AutoConfig.from_pretrained(str(model_path))
    model_class = get_model_class(hf_config)
    device = torch.device(device)
    logger.info("building %s from %s (dtype=%s, device=%s, tp rank %d of %d)",
                model_class.__name__, model_path, dtype, device, tp_rank, tp_size)
    start = time.perf_counter()
    model = model_class(hf_config, dtype=dtype, device=device, backend=backend,
                        tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
    with torch.no_grad():
        model.load_weights(iter_safetensors(model_path))
    model.eval()
    packed_bytes = 0
    if device.type == "cpu":
        if host_memory.enabled():
            host_memory.move_to_huge_pages(model)  # a decode step streams them all
        # Streaming kernel, packed oneDNN GEMM or BLAS per weight shape and row count, measured
        # on this machine; packed copies of the weights whose shapes use them.
        packed_bytes = prepare_cpu_linears(model)
    num_params = sum(p.numel() for p in model.parameters())
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("loaded %.1fM parameters (%.1f MiB on this rank%s) in %.2fs",
                num_params / 1e6, num_bytes / 2**20,
                f", + {packed_bytes / 2**20:.1f} MiB of weights packed for oneDNN"
                if packed_bytes else "", time.perf_counter() - start)
    return model
