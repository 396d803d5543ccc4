"""Worker: one tensor-parallel rank. Owns a ModelRunner; runs as a Ray actor in its replica's
placement group (RayExecutor), or in-process for tp=1 (InProcessExecutor).

Start-up is phased so the executor can agree on one KV pool for the whole group:
``init_distributed`` -> ``load_model`` (returns this rank's KV capacity in blocks) ->
``initialize_kv_cache(min over ranks)``. Then ``run_loop`` serves steps from the group's
shared-memory channel until told to stop; only rank 0 answers (it is the rank that samples).

As a Ray actor (``model_thread=True``) every call that touches the model or the CPU settings runs
on one thread of the worker's own: Ray runs a threaded actor's calls on whichever of its threads
is free, and libgomp keeps a thread pool per thread that starts parallel regions (two pools on a
rank's cores stop spinning between regions, each region then starts with a wake-up), and the CPU
pinning of ``set_cpu_threads`` holds only for the thread that set it and the threads it starts.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import time
import traceback
from typing import Any

import torch

from raylm.workers.config import CacheConfig, ModelConfig
from raylm.workers.model_input import ModelInput, ModelOutput

logger = logging.getLogger(__name__)

# Messages on the group's input channel: (kind, payload).
EXECUTE, PING, STOP = "execute", "ping", "stop"
# Replies of rank 0 on the output channel: (kind, payload, seconds spent computing).
OK, PONG, ERROR = "ok", "pong", "error"


class ModelThread:
    """Runs calls on one thread of its own, or inline on the caller's when ``enabled`` is false
    (in-process use: the caller's thread is already the only one that computes)."""

    def __init__(self, enabled: bool, name: str) -> None:
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
                      if enabled else None)

    def run(self, fn, *args, **kwargs):
        if self._pool is None:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()


class Worker:
    def __init__(self, rank: int, tp_size: int, model_thread: bool = False) -> None:
        self.rank = rank
        self.tp_size = tp_size
        self.runner = None
        self.tp_group = None
        self._on_model_thread = ModelThread(model_thread, f"raylm-rank{rank}").run
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO,
                                format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")

    # -- placement ---------------------------------------------------------------------------
    def node_info(self) -> dict[str, Any]:
        """Where this rank landed (logged by the executor, checked against the driver's node)."""
        info: dict[str, Any] = {"rank": self.rank, "pid": os.getpid(),
                                "hostname": socket.gethostname()}
        try:
            import ray

            ctx = ray.get_runtime_context()
            info["node_id"] = ctx.get_node_id()
            info["node_ip"] = ray.util.get_node_ip_address()
            info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
            info["resources"] = ctx.get_assigned_resources()
        except Exception:  # noqa: BLE001 - in-process (no Ray): nothing more to say
            pass
        return info

    def rank_id(self) -> int:
        """A no-op call (the dispatch benchmark times a plain Ray call with it)."""
        return self.rank

    def set_cpu_threads(self, num_threads: int, cpu_ids: list[int] | None) -> None:
        """Compute with this rank's share of the node's cores (pinned when ``cpu_ids``)."""
        self._on_model_thread(self._set_cpu_threads, num_threads, cpu_ids)

    def _set_cpu_threads(self, num_threads: int, cpu_ids: list[int] | None) -> None:
        if cpu_ids:
            os.sched_setaffinity(0, cpu_ids)
        torch.set_num_threads(max(1, num_threads))

    def init_distributed(self, init_method: str, backend: str, timeout_s: float = 600.0) -> None:
        """Join the group's torch.distributed process group (NCCL on CUDA, gloo on CPU) through
        ``init_method`` (a file:// rendezvous on the group's node, unique per group)."""
        self._on_model_thread(self._init_distributed, init_method, backend, timeout_s)

    def _init_distributed(self, init_method: str, backend: str, timeout_s: float) -> None:
        import datetime

        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray exposes exactly this rank's GPU as device 0
        dist.init_process_group(backend, init_method=init_method,
                                rank=self.rank, world_size=self.tp_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.tp_group = dist.group.WORLD
        logger.info("rank %d of %d joined the %s group (%s)", self.rank, self.tp_size,
                    backend, init_method)

    # -- model -------------------------------------------------------------------------------
    def load_model(self, model_config: ModelConfig, cache_config: CacheConfig, *,
                   max_num_batched_tokens: int, max_num_seqs: int) -> int:
        """Load this rank's weight shards; returns how many KV blocks this rank can hold."""
        return self._on_model_thread(self._load_model, model_config, cache_config,
                                     max_num_batched_tokens, max_num_seqs)

    def _load_model(self, model_config: ModelConfig, cache_config: CacheConfig,
                    max_num_batched_tokens: int, max_num_seqs: int) -> int:
        from raylm.workers.model_runner import ModelRunner

        self.runner = ModelRunner(model_config, cache_config,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  max_num_seqs=max_num_seqs, tp_rank=self.rank,
                                  tp_size=self.tp_size, tp_group=self.tp_group)
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> dict[str, Any]:
        return self._on_model_thread(self._initialize_kv_cache, num_blocks)

    def _initialize_kv_cache(self, num_blocks: int) -> dict[str, Any]:
        self.runner.initialize_kv_cache(num_blocks)
        return self.runner.info()

    def execute(self, inp: ModelInput) -> ModelOutput | None:
        return self._on_model_thread(self.runner.execute, inp)

    def all_reduce_latency(self, numel: int, num_iters: int) -> float:
        """Median seconds of one all-reduce of ``numel`` elements of the model's dtype (every
        rank must call it at once; the dispatch benchmark does, from Ray's second thread)."""
        import statistics

        import torch.distributed as dist

        x = torch.ones(numel, dtype=self.runner.dtype, device=self.runner.device)
        times = []
        for _ in range(num_iters + 5):
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            dist.all_reduce(x, group=self.tp_group)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times[5:])

    # -- the step loop (Ray actor) -----------------------------------------------------------
    def run_loop(self, inbox_handle: dict, outbox_handle: dict | None) -> None:
        """Serve steps until STOP (see serve_channel); only rank 0 answers."""
        self._on_model_thread(serve_channel, self.runner.execute, self.rank, inbox_handle,
                              outbox_handle, f"rank {self.rank}")


def serve_channel(handler, reader_index: int, inbox_handle: dict, outbox_handle: dict | None,
                  name: str) -> None:
    """A worker's loop: ``handler(payload)`` for each EXECUTE on the inbox until STOP. With an
    outbox, each result (or PONG, or the failure as ERROR, after which the loop stops) is
    answered there; without one a failure ends this call, which the driver sees."""
    from raylm.workers.shm_channel import ShmChannel

    inbox = ShmChannel.attach(inbox_handle, reader_index=reader_index)
    outbox = ShmChannel.attach(outbox_handle) if outbox_handle is not None else None
    try:
        while True:
            kind, payload = inbox.get()
            if kind == STOP:
                return
            if kind == PING:
                if outbox is not None:
                    outbox.put((PONG, payload, 0.0))
                continue
            start = time.perf_counter()
            try:
                out = handler(payload)
            except Exception:  # noqa: BLE001 - a model fault: report it, then stop serving
                if outbox is None:
                    raise
                outbox.put((ERROR, f"{name}: {traceback.format_exc()}", 0.0))
                return
            if outbox is not None:
                outbox.put((OK, _to_host(out), time.perf_counter() - start))
    finally:
        inbox.close()
        if outbox is not None:
            outbox.close()


def _to_host(out):
    """Tensors leave the GPU before crossing to the driver (which may have no GPU)."""
    if isinstance(out, tuple):
        return tuple(_to_host(x) for x in out)
    if isinstance(out, torch.Tensor):
        return out.cpu()
    if not isinstance(out, ModelOutput):
        return out
    for name in ("hidden_states", "token_hidden_states", "sampling_probs"):
        value = getattr(out, name)
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            setattr(out, name, value.cpu())
    return out
