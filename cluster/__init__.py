"""raylm control plane: engine, scheduler, KV block manager, serving, CLI.

Public API: ``from raylm.cluster import LLM, AsyncEngine, SamplingParams, RequestOutput``.
Imports are lazy so the pure-Python core (scheduler, block manager) loads without torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raylm.cluster.async_engine import AsyncEngine
    from raylm.cluster.llm import LLM
    from raylm.cluster.outputs import CompletionOutput, RequestOutput
    from raylm.cluster.sampling_params import SamplingParams

_EXPORTS = {
    "LLM": "raylm.cluster.llm",
    "AsyncEngine": "raylm.cluster.async_engine",
    "SamplingParams": "raylm.cluster.sampling_params",
    "RequestOutput": "raylm.cluster.outputs",
    "CompletionOutput": "raylm.cluster.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raylm.cluster' has no attribute {name!r}")
