"""CPU used while a benchmark level runs: this process's cores and the whole machine's busy cores.

On a small box the load generator, the server and the engine share the cores. A serving figure
means little without knowing how much of the machine the client took and how busy the machine
was, so `raylm bench serve` reports both per level:

    meter = CpuMeter()
    ...                                     # run the level
    usage = meter.stop()                    # CpuUsage(process_cores=0.04, machine_busy_cores=1.97)
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CpuUsage:
    process_cores: float          # CPU seconds of this process (all threads) / wall seconds
    machine_busy_cores: float | None  # non-idle share of all cores x cores; None without /proc/stat
    num_cpus: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _machine_ticks() -> tuple[int, int, int] | None:
    """(busy, total) jiffies summed over all CPUs and the number of CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        fields = [int(x) for x in lines[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    num_cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total, max(num_cpus, 1)


class CpuMeter:
    """Starts measuring when built; `stop()` returns what was used since."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._process = time.process_time()
        self._ticks = _machine_ticks()

    def stop(self) -> CpuUsage:
        wall = max(time.perf_counter() - self._wall, 1e-9)
        process = time.process_time() - self._process
        num_cpus = os.cpu_count() or 1
        busy_cores = None
        end = _machine_ticks()
        if self._ticks is not None and end is not None and end[1] > self._ticks[1]:
            num_cpus = end[2]  # the CPUs /proc/stat sums over (the host's, in a container)
            busy_cores = (end[0] - self._ticks[0]) / (end[1] - self._ticks[1]) * num_cpus
        return CpuUsage(process_cores=process / wall, machine_busy_cores=busy_cores,
                        num_cpus=num_cpus)
