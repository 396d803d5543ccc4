"""raylm's compiled CPU ops (kernels/csrc), built with torch's cpp_extension on first use.

Decode on CPU is memory bound: these ops read the KV blocks in place (no gather copies) and
stream each weight row once for few-row steps. The build is cached (~/.cache/torch_extensions);
without a compiler everything falls back to torch (logged once).
"""
from __future__ import annotations

import functools
import logging
import pathlib

logger = logging.getLogger(__name__)
_CSRC = pathlib.Path(__file__).parent / "csrc"
SOURCES = ("cpu_ops.cpp", "paged_attention_cpu.cpp", "linear_cpu.cpp", "elementwise_cpu.cpp")


@functools.lru_cache(maxsize=1)
def load_extension():
    """The compiled module, or None when it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        logger.info("loading raylm's CPU ops (compiled on first use, then cached)")
        return load(name="raylm_cpu_ops", sources=[str(_CSRC / s) for s in SOURCES],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: use torch
        logger.warning("raylm CPU ops unavailable (%s); using the torch reference ops", e)
        return None
