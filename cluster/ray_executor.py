"""RayExecutor: one Worker actor per tensor-parallel rank, pinned to bundle i of the replica's
placement group (a new group when none is current, e.g. offline ``LLM``).

Control path per step: the driver pickles the ModelInput once into a shared-memory channel read
by every rank (workers/shm_channel.py) and waits for rank 0's ModelOutput on a second channel.
No Ray call happens per step; Ray places the actors and notices when one dies. Data path: the
ranks' own torch.distributed group (NCCL on CUDA, gloo on CPU).
"""
from __future__ import annotations

import collections
import logging
import os
import tempfile
import time
import uuid
from typing import Any

from raylm.cluster.channel_client import ChannelClient
from raylm.cluster.config import EngineConfig
from raylm.cluster.errors import WorkerDiedError
from raylm.cluster.executor import Executor
from raylm.workers.model_input import ModelInput, ModelOutput

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0  # a group that cannot be placed in this long never will be
_WORKER_ENV_PREFIXES = ("RAYLM_", "TRITON_", "TORCH_EXTENSIONS_DIR")  # the ranks see them too
WORKER_NAMESPACE = "raylm-workers"


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        import ray

        from raylm.workers.loader import resolve_model_path
        from raylm.workers.worker import Worker

        if not ray.is_initialized():
            logger.info("starting a local Ray for the tensor-parallel workers")
            ray.init(include_dashboard=False, log_to_driver=False)
        self.tp_size = tp = config.parallel.tensor_parallel_size
        self._closed = False
        self._num_steps = 0
        self._dispatch_s = 0.0
        self._recent_dispatch_s: collections.deque[float] = collections.deque(maxlen=1024)
        self.model_path = resolve_model_path(config.model.model, config.model.revision)
        from transformers import AutoConfig

        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        on_gpu = config.model.device.startswith("cuda")
        self._pg, self._owns_pg, bundles = _placement_group(tp, on_gpu)
        spec = config.speculative
        if on_gpu and not self._owns_pg and spec is not None and spec.method == "draft_model":
            from raylm.cluster.draft_proposer import DRAFT_GPU_SHARE

            bundles[0]["GPU"] = max(0.0, bundles[0].get("GPU", 0.0) - DRAFT_GPU_SHARE)
        actor_class = ray.remote(Worker)
        env = {k: v for k, v in os.environ.items() if k.startswith(_WORKER_ENV_PREFIXES)}
        self.group_id = uuid.uuid4().hex[:8]
        self.workers = []
        self._actor_names = [f"raylm-tp-{self.group_id}-rank{rank}" for rank in range(tp)]
        for rank in range(tp):
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            self.workers.append(actor_class.options(
                num_cpus=bundles[rank].get("CPU", 0), num_gpus=bundles[rank].get("GPU", 0),
                max_concurrency=2,  # run_loop holds one thread; ping/diagnostics use the other
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=rank),
                runtime_env={"env_vars": env} if env else None,
                name=self._actor_names[rank],  # findable by operators and tests
                namespace=WORKER_NAMESPACE,
            ).remote(rank, tp, model_thread=True))
        try:
            self._start(config, bundles, on_gpu)
        except BaseException:
            self.shutdown()
            raise
        self._channel = ChannelClient(self.workers, "tensor-parallel")

    def _start(self, config: EngineConfig, bundles: list[dict[str, float]], on_gpu: bool) -> None:
        import ray

        try:
            nodes = ray.get([w.node_info.remote() for w in self.workers],
                            timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as exc:
            raise ValueError(f"tensor_parallel_size={self.tp_size}: the rank actors could not be "
                             f"placed in {PLACEMENT_TIMEOUT_S:.0f}s (bundles {bundles})") from exc
        here = ray.get_runtime_context().get_node_id()
        for info, bundle in zip(nodes, bundles):
            if info.get("node_id") != here:
                raise ValueError(f"rank {info['rank']} landed on node {info.get('node_ip')}, not the "
                                 "driver's: a tensor-parallel group must share one node")
        threads = [max(1, int(b.get("CPU", 1))) for b in bundles]
        pinned = _cpu_slices(threads) if not on_gpu else [None] * self.tp_size
        ray.get([w.set_cpu_threads.remote(t, cpus)
                 for w, t, cpus in zip(self.workers, threads, pinned)])
        for info, t, cpus in zip(nodes, threads, pinned):
            logger.info("tp rank %d: node %s pid %d bundle %d gpus %s threads %d cpus %s",
                        info["rank"], info.get("node_ip"), info["pid"], info["rank"],
                        info.get("gpu_ids"), t, cpus or "any")
        backend = "nccl" if on_gpu else "gloo"
        # Every rank shares the driver's node (checked above): rendezvous through a file unique
        # to this group (two replicas on one node never collide, and no port is opened for it).
        self._rendezvous = os.path.join(tempfile.gettempdir(), f"raylm-tp-{uuid.uuid4().hex}")
        ray.get([w.init_distributed.remote(f"file://{self._rendezvous}", backend)
                 for w in self.workers])
        capacities = ray.get([w.load_model.remote(
            config.model, config.cache,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_num_seqs=config.scheduler.max_num_seqs) for w in self.workers])
        self.num_blocks = min(capacities)
        logger.info("KV capacity per rank %s blocks -> %d on every rank", capacities,
                    self.num_blocks)
        infos = ray.get([w.initialize_kv_cache.remote(self.num_blocks) for w in self.workers])
        self.info = dict(infos[0], tensor_parallel_size=self.tp_size, collective=backend,
                         group_id=self.group_id,
                         ranks=[dict(n, threads=t, cpus=c)
                                for n, t, c in zip(nodes, threads, pinned)])

    # -- steps -------------------------------------------------------------------------------
    def execute(self, inp: ModelInput) -> ModelOutput:
        from raylm.workers.worker import EXECUTE

        start = time.perf_counter()
        out, compute_s = self._channel.call(EXECUTE, inp)
        overhead = time.perf_counter() - start - compute_s
        self._num_steps += 1
        self._dispatch_s += overhead
        self._recent_dispatch_s.append(overhead)
        return out

    def ping(self, num_round_trips: int) -> list[float]:
        """Round-trip times (s) of an empty message through the channels, as a step's control
        path sees them (the dispatch microbenchmark)."""
        return self._channel.round_trips(num_round_trips)

    def all_reduce_latency(self, numel: int, num_iters: int = 200) -> float:
        """Median seconds of one all-reduce of ``numel`` model-dtype elements across the group
        (runs while the step loop is idle)."""
        import ray

        return max(ray.get([w.all_reduce_latency.remote(numel, num_iters) for w in self.workers]))

    def ray_call_latency(self, num_calls: int = 200) -> list[float]:
        """Round-trip seconds of a plain Ray actor call to rank 0: what a per-step Ray call
        per rank would cost, for comparison with the channel."""
        import ray

        times = []
        for _ in range(num_calls):
            start = time.perf_counter()
            ray.get(self.workers[0].rank_id.remote())
            times.append(time.perf_counter() - start)
        return times

    def check_health(self) -> None:
        if self._closed:
            raise WorkerDiedError("the tensor-parallel workers are shut down")
        self._channel.check()

    def get_stats(self) -> dict[str, Any]:
        mean = self._dispatch_s / self._num_steps if self._num_steps else 0.0
        recent = sorted(self._recent_dispatch_s)
        p50 = recent[len(recent) // 2] if recent else 0.0
        return {"executor_dispatch_us_mean": mean * 1e6, "executor_dispatch_us_p50": p50 * 1e6,
                "executor_num_steps": self._num_steps}

    def shutdown(self) -> None:
        import ray

        if self._closed:
            return
        self._closed = True
        channel = getattr(self, "_channel", None)
        if channel is not None:
            channel.close()
        for w in getattr(self, "workers", []):
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        _wait_until_unnamed(getattr(self, "_actor_names", []))
        if self._owns_pg:
            from ray.util import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001 - Ray already shut down
                pass
        rendezvous = getattr(self, "_rendezvous", None)
        if rendezvous is not None and os.path.exists(rendezvous):
            os.unlink(rendezvous)


def _wait_until_unnamed(names: list[str], timeout_s: float = 10.0) -> None:
    """ray.kill returns before the GCS forgets the actors: wait (bounded) so that a shutdown
    leaves nothing behind that a caller (or a new group reusing the id) could still see."""
    import ray

    deadline = time.monotonic() + timeout_s
    while names and time.monotonic() < deadline:
        try:
            alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["namespace"] == WORKER_NAMESPACE}
        except Exception:  # noqa: BLE001 - Ray already shut down
            return
        if not alive.intersection(names):
            return
        time.sleep(0.05)


def _placement_group(tp: int, on_gpu: bool):
    """(placement group, whether we created it, resources each rank's actor asks for)."""
    import ray
    from ray.util import get_current_placement_group, placement_group

    current = get_current_placement_group()
    if current is not None:
        specs = current.bundle_specs
        if len(specs) < tp:
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} bundles in the replica's "
                             f"placement group, which has {len(specs)}")
        bundles = [{k: v for k, v in spec.items() if k in ("CPU", "GPU")} for spec in specs[:tp]]
        # The replica actor itself sits in bundle 0: rank 0 gets what it left over.
        used = ray.get_runtime_context().get_assigned_resources()
        for key in ("CPU", "GPU"):
            if key in bundles[0]:
                bundles[0][key] = max(0.0, bundles[0][key] - used.get(key, 0.0))
        return current, False, bundles
    # Sized from the cluster's totals; the group then waits for them to be free (another
    # group being torn down frees its bundles asynchronously).
    total = ray.cluster_resources()
    if on_gpu:
        if total.get("GPU", 0) < tp:
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs; the Ray cluster has "
                             f"{total.get('GPU', 0):g}")
        bundle = {"CPU": 1.0, "GPU": 1.0}
    else:
        cpus = total.get("CPU", 0)
        if cpus <= 0:
            raise ValueError("the Ray cluster has no CPU for the tensor-parallel workers")
        per_rank = float(int(cpus // tp)) if cpus >= tp else cpus / tp
        bundle = {"CPU": per_rank}
    # Pin the group to the driver's node: the control channel is shared memory.
    node_key = f"node:{ray.util.get_node_ip_address()}"
    specs = [dict(bundle) for _ in range(tp)]
    specs[0][node_key] = 0.001
    pg = placement_group(specs, strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as exc:
        from ray.util import remove_placement_group

        remove_placement_group(pg)
        raise ValueError(f"tensor_parallel_size={tp}: could not reserve {specs} on one node "
                         f"in {PLACEMENT_TIMEOUT_S:.0f}s") from exc
    return pg, True, [dict(bundle) for _ in range(tp)]


def _cpu_slices(threads: list[int]) -> list[list[int] | None]:
    """Pin rank r to its own cores when the group computes on every core of the node (then no
    other work competes for them); otherwise leave placement to the OS."""
    cores = sorted(os.sched_getaffinity(0))
    if sum(threads) != len(cores):
        return [None] * len(threads)
    slices, first = [], 0
    for t in threads:
        slices.append(cores[first:first + t])
        first += t
    return slices
