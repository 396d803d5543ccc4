"""raylm's compiled CPU ops (kernels/csrc), built with torch's cpp_extension on first use.

Decode on CPU is memory bound: these ops read the KV blocks in place (no gather copies) and
stream each weight row once for few-row steps. Without a compiler everything falls back to torch
(logged once).

The build is cached per source hash under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``)/raylm_cpu_ops-<hash>. Many processes load it at once (engine,
TP ranks, Serve replicas) and tests kill some of them; torch's own build lock is a plain file that
stays behind when its holder dies, after which every later load waits forever. So: a finished
build is imported directly (no lock), and a build runs under ``fcntl.flock``, which the kernel
releases when the holder dies; a stale torch lock found while holding it is removed.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import pathlib
import sys

logger = logging.getLogger(__name__)
_CSRC = pathlib.Path(__file__).parent / "csrc"
SOURCES = ("cpu_ops.cpp", "paged_attention_cpu.cpp", "paged_attention_legacy_cpu.cpp",
           "linear_cpu.cpp", "elementwise_cpu.cpp", "kv_write_cpu.cpp", "llama_cpu.cpp",
           "argmax_cpu.cpp", "sample_cpu.cpp", "top_p_cpu.cpp", "logit_mask_cpu.cpp")
HEADERS = ("cpu_ops.h",)  # part of the build's identity too
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math")
LDFLAGS = ("-fopenmp",)
NAME = "raylm_cpu_ops"
_DONE_MARKER = "build-complete"


def build_directory() -> pathlib.Path:
    """Where this exact source set (and torch/python version) is built."""
    import torch

    digest = hashlib.sha256()
    for s in SOURCES + HEADERS:
        digest.update((_CSRC / s).read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    digest.update(f"{torch.__version__} {sys.version_info[:2]}".encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    return pathlib.Path(root) / f"{NAME}-{digest.hexdigest()[:16]}"


def _import_built(directory: pathlib.Path):
    spec = importlib.util.spec_from_file_location(NAME, directory / f"{NAME}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(directory: pathlib.Path):
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "flock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            if (directory / _DONE_MARKER).exists():  # another process finished it meanwhile
                return _import_built(directory)
            (directory / "lock").unlink(missing_ok=True)  # torch's baton, left by a dead builder
            logger.info("compiling raylm's CPU ops into %s (once per source version)", directory)
            module = load(name=NAME, sources=[str(_CSRC / s) for s in SOURCES],
                          extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                          build_directory=str(directory), verbose=False)
            (directory / _DONE_MARKER).touch()
            return module
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=1)
def load_extension():
    """The compiled module, or None when it cannot be built here."""
    try:
        directory = build_directory()
        if (directory / _DONE_MARKER).exists():
            return _import_built(directory)
        return _build(directory)
    except Exception as e:  # noqa: BLE001 - any build failure means: use torch
        logger.warning("raylm CPU ops unavailable (%s); using the torch reference ops", e)
        return None
