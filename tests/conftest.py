"""Shared fixtures: tiny random checkpoints built locally (no downloads)."""
from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import pytest
import torch

# Triton picks interpreter or compiler when its modules are first imported (building an HF model
# imports it), so on a CPU-only machine the interpreter must be on before anything else runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    """Compile the CPU ops once, here, before any Ray worker or Serve replica would (a fresh
    clone builds them in a few minutes; every later process only imports the result)."""
    from raylm.kernels.cpu_ops import load_extension

    load_extension()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[[str], pathlib.Path]:
    """Factory: ``tiny_model("llama" | "mistral" | "qwen2" | "qwen3")`` -> checkpoint directory.

    Each architecture is built once per test session (seed 0) and shared by every test.
    """
    from raylm.workers.make_model import make_model

    built: dict[str, pathlib.Path] = {}

    def get(arch: str = "llama") -> pathlib.Path:
        if arch not in built:
            built[arch] = make_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch,
                                     preset="tiny", seed=0)
        return built[arch]

    return get
