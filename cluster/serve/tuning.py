"""Serve settings raylm starts Ray with, measured with `raylm bench serve --protocol
engine,grpc,http` (figures in the README): every hop a token delta makes costs a thread switch
or an event-loop turn, and the step thread competes with the event loops for the GIL.

- Serve runs user code in a second event-loop thread by default; on one loop, a delta crossing a
  replica skips a cross-thread hand-off (Serve's own flag, off here).
- The handle's router likewise gets its own loop by default; in the ingress that is one more hop.
- CPython hands the GIL over every 5 ms; the step thread holds it between torch ops, so an event
  loop with a delta to send can wait that long. 1 ms keeps the loop's wait short.

Set RAYLM_SERVE_TUNING=0 to start Serve with its own defaults; any variable already set wins.
"""
from __future__ import annotations

import os
import sys

SERVE_ENV_DEFAULTS = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAYLM_GIL_SWITCH_INTERVAL_S": "0.001",
}


def enabled() -> bool:
    return os.environ.get("RAYLM_SERVE_TUNING", "1") != "0"


def apply_env_defaults() -> None:
    """Before Ray starts: the Serve processes it launches inherit these."""
    if enabled():
        for key, value in SERVE_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)


def apply_in_replica() -> None:
    """In a replica process (the step thread and the event loop share its GIL)."""
    interval = os.environ.get("RAYLM_GIL_SWITCH_INTERVAL_S")
    if interval:
        sys.setswitchinterval(float(interval))
