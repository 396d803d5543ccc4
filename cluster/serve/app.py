"""The raylm Serve application: `build_app(args)`, importable as
`raylm.cluster.serve.app:build_app` from a Serve config file (deploy/serve_config.yaml)."""
from __future__ import annotations

import os

from dataclasses import asdict, dataclass, fields
from typing import Any

from ray import serve

from raylm.cluster.serve.autoscaling import AutoscalingThresholds
from raylm.cluster.serve.ingress import Ingress
from raylm.cluster.serve.limits import (DEFAULT_MAX_REQUEST_BYTES, HANDLE_TRANSPORTS,
                                       api_key_from_env)
from raylm.cluster.serve.llm_server import LLMServer

# raylm.v1.Generation with lenient parsing, plus grpc.health.v1 and reflection v1
GRPC_SERVICER_FUNCTIONS = ["raylm.cluster.serve.grpc_services.add_raylm_services"]
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 9000
ROUTERS = {
    "prefix": "raylm.cluster.serve.prefix_router:PrefixAwareRouter",
    "pow2": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
}
AUTOSCALING_POLICY = "raylm.cluster.serve.autoscaling:LLMAutoscalingPolicy"


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpus_per_rank(tp: int) -> float:
    """A CPU replica computes on this node's cores (capped by what Ray was given), split evenly
    over its tensor-parallel ranks: whole cores when there are enough, else a share of one."""
    import ray

    cpus = float(os.cpu_count() or 1)
    if ray.is_initialized():
        cpus = min(cpus, ray.cluster_resources().get("CPU", cpus))
    cpus = max(cpus, 1.0)
    return float(int(cpus // tp)) if cpus >= tp else cpus / tp


@dataclass(frozen=True)
class AppConfig:
    """What `build_app` accepts (the `args:` of a Serve config). Engine fields left at None use
    the engine's defaults; `model=None` serves the built-in demo model."""

    # engine
    model: str | None = None
    dtype: str = "auto"
    device: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    max_queued_requests: int | None = None
    # steps per streamed delta (the first and last token always at once); "auto": 1 on a GPU
    # and on a CPU replica running < 16 requests, 2-3 on a CPU replica running more
    # (cluster/config.py AUTO_STREAM_INTERVALS), where every message's CPU comes out of the
    # cores that compute the step
    stream_interval: int | str = "auto"
    # CPU: map the whole KV pool at start-up, so that no step pays a first-touch page fault
    prefault_kv_cache: bool = True
    tensor_parallel_size: int = 1
    # the EngineCore in a process of its own (cluster/engine_process.py: no GIL shared with
    # the servers). None = auto: off where the engine uses Ray actors (tp > 1, a draft model);
    # else decided in the replica, on where its compute leaves the servers a core (a GPU
    # replica, a CPU replica on fewer threads than cores: engine_process.by_default)
    engine_process: bool | None = None
    # speculative decoding, e.g. {"method": "ngram", "num_speculative_tokens": 4}
    speculative_config: dict[str, Any] | None = None
    # placement: resources of each tensor-parallel rank's bundle; None = on CPU the node's
    # cores (a CPU replica computes on all of them), with a GPU one core
    num_cpus_per_rank: float | None = None
    # None = one GPU per rank when the model runs on CUDA, else none
    num_gpus_per_rank: float | None = None
    # autoscaling
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    max_ongoing_requests: int = 256
    # LLM signals (cluster/serve/autoscaling.py, README "Many replicas"): scale up when the mean
    # waiting requests per replica, the mean KV usage or the worst TTFT p90 exceed these
    target_waiting_requests: float = 2.0
    kv_usage_upscale: float = 0.9
    ttft_p90_target_s: float = 2.0  # 0 = TTFT not considered
    upscale_delay_s: float = 10.0  # a signal must hold this long before a replica is added
    downscale_delay_s: float = 60.0  # ... and idleness this long before one is removed
    autoscaling_metrics_interval_s: float = 2.0  # LLM load moves in seconds, not Serve's 10 s
    autoscaling_look_back_period_s: float = 10.0
    # a replica removed on scale-down finishes its streams for up to this long
    graceful_shutdown_timeout_s: float = 300.0
    # routing across replicas (cluster/serve/prefix_router.py)
    router: str = "prefix"  # prefix | pow2
    router_imbalance_threshold: float = 8.0  # requests more than the least loaded replica
    router_kv_overload: float = 0.95
    routing_stats_period_s: float = 2.0
    # front door (see README "Security and limits")
    api_key: str | None = None  # None: the RAYLM_API_KEY environment variable, if set
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # HTTP bodies (gRPC: RAYLM_MAX_REQUEST_BYTES)
    docs: bool | None = None  # /docs, /redoc, /openapi.json; None: on unless an API key is set
    served_model_name: str | None = None  # the model id clients see; None: the checkpoint's dir name
    # how token streams travel from LLMServer to the ingress: "grpc" = Serve's direct gRPC
    # channel to the replica (fewer hops per item), "actor" = Ray actor calls (Serve's default)
    handle_transport: str = "grpc"
    # the HTTP / gRPC routes inside the model replica (no ingress -> replica hop per streamed
    # item; exactly one replica). Off by default in a Serve config (`raylm serve` turns it on
    # for a single replica: --ingress auto): a replica that dies then takes its client
    # connections with it (Serve's proxy cuts them: gRPC INTERNAL, an SSE stream without
    # [DONE]) where a separate Ingress answers UNAVAILABLE / an SSE error event (README
    # "Serving path")
    colocate_ingress: bool = False

    def __post_init__(self) -> None:
        for name in ("block_size", "tensor_parallel_size", "min_replicas", "max_replicas",
                     "max_ongoing_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "min_replicas" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas "
                             f"({self.min_replicas})")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        if self.handle_transport not in HANDLE_TRANSPORTS:
            raise ValueError(f"handle_transport must be one of {HANDLE_TRANSPORTS}, "
                             f"got {self.handle_transport!r}")
        if self.colocate_ingress and not self.min_replicas == self.max_replicas == 1:
            raise ValueError("colocate_ingress needs exactly one replica (min_replicas = "
                             "max_replicas = 1): several replicas need the Ingress to route")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {self.router!r}")
        for name in ("upscale_delay_s", "downscale_delay_s", "graceful_shutdown_timeout_s",
                     "router_imbalance_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("autoscaling_metrics_interval_s", "autoscaling_look_back_period_s",
                     "routing_stats_period_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.router_kv_overload <= 1.0:
            raise ValueError(f"router_kv_overload must be in (0, 1], got {self.router_kv_overload}")
        self.thresholds()  # validates the autoscaling thresholds
        if self.device is None:
            # Decided here, in the process that builds the app: a replica actor that reserved
            # no GPU cannot see one, so it must be told.
            object.__setattr__(self, "device", _default_device())
        if self.speculative_config is not None:
            from raylm.cluster.config import SpeculativeConfig

            SpeculativeConfig.from_dict(self.speculative_config)  # fail at build, not in replicas
        if self.engine_process is None and self._engine_uses_ray():
            object.__setattr__(self, "engine_process", False)
        elif self.engine_process and self._engine_uses_ray():
            raise ValueError("engine_process needs an engine without Ray actors (tensor_parallel"
                             "_size 1, no draft model): its process is not a Ray worker")
        if self.num_gpus_per_rank is None:
            object.__setattr__(self, "num_gpus_per_rank",
                               1.0 if self.device.startswith("cuda") else 0.0)
        if not isinstance(self.max_request_bytes, int) or self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be a positive integer, "
                             f"got {self.max_request_bytes!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string")
        if self.num_cpus_per_rank is None:
            on_gpu = self.num_gpus_per_rank > 0 or self.device.startswith("cuda")
            object.__setattr__(self, "num_cpus_per_rank",
                               1.0 if on_gpu else _cpus_per_rank(self.tensor_parallel_size))
        if self.num_cpus_per_rank < 0 or self.num_gpus_per_rank < 0:
            raise ValueError("num_cpus_per_rank / num_gpus_per_rank must be >= 0")

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "AppConfig":
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown raylm app argument (known: {sorted(known)})")
        return cls(**args)

    def ingress_options(self) -> dict[str, Any]:
        api_key = self.api_key or api_key_from_env()
        docs = self.docs if self.docs is not None else api_key is None
        return {"api_key": api_key, "max_request_bytes": self.max_request_bytes, "docs": docs,
                "served_model_name": self.served_model_name,
                "handle_transport": self.handle_transport}

    def engine_args(self) -> dict[str, Any]:
        engine_fields = ("model", "dtype", "device", "max_model_len", "gpu_memory_utilization",
                         "block_size", "kv_cache_dtype", "max_num_seqs", "max_num_batched_tokens",
                         "kv_cache_memory", "enable_prefix_caching", "seed", "max_queued_requests",
                         "stream_interval", "speculative_config", "prefault_kv_cache")
        out = {k: v for k, v in asdict(self).items() if k in engine_fields and v is not None}
        out["max_queued_requests"] = self.max_queued_requests
        out["tensor_parallel_size"] = self.tensor_parallel_size
        out["engine_process"] = self.engine_process
        return out

    def replica_actor_options(self) -> dict[str, float]:
        """At tp=1 the replica computes in-process and takes bundle 0's resources; with worker
        actors (tp > 1) it only schedules, and each rank's actor takes its whole bundle."""
        if self.tensor_parallel_size > 1:
            return {"num_cpus": 0, "num_gpus": 0}
        return {"num_cpus": self.num_cpus_per_rank,
                "num_gpus": self.num_gpus_per_rank - self._draft_gpu_share()}

    def _engine_uses_ray(self) -> bool:
        return self.tensor_parallel_size > 1 or bool((self.speculative_config or {}).get("model"))

    def _draft_gpu_share(self) -> float:
        """What a draft model's actor takes of bundle 0's GPU (it shares the bundle)."""
        if not self.num_gpus_per_rank or not (self.speculative_config or {}).get("model"):
            return 0.0
        from raylm.cluster.draft_proposer import DRAFT_GPU_SHARE

        return DRAFT_GPU_SHARE

    def placement_group_bundles(self) -> list[dict[str, float]]:
        """One bundle per tensor-parallel rank; bundle 0 also holds the replica actor."""
        bundle = {"CPU": self.num_cpus_per_rank}
        if self.num_gpus_per_rank:
            bundle["GPU"] = self.num_gpus_per_rank
        return [dict(bundle) for _ in range(self.tensor_parallel_size)]

    def thresholds(self) -> AutoscalingThresholds:
        return AutoscalingThresholds(
            target_ongoing_requests=self.target_ongoing_requests,
            target_waiting_requests=self.target_waiting_requests,
            kv_usage_upscale=self.kv_usage_upscale, ttft_p90_target_s=self.ttft_p90_target_s)

    def autoscaling_config(self) -> dict[str, Any]:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "metrics_interval_s": self.autoscaling_metrics_interval_s,
                "look_back_period_s": self.autoscaling_look_back_period_s,
                "policy": {"policy_function": AUTOSCALING_POLICY,
                           "policy_kwargs": asdict(self.thresholds())}}

    def request_router_config(self) -> dict[str, Any]:
        kwargs = ({"imbalance_threshold": self.router_imbalance_threshold,
                   "kv_overload": self.router_kv_overload} if self.router == "prefix" else {})
        return {"request_router_class": ROUTERS[self.router], "request_router_kwargs": kwargs,
                "request_routing_stats_period_s": self.routing_stats_period_s}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Ingress -> LLMServer (autoscaled, one placement group per replica); with one replica
    and colocate_ingress, a single deployment named LLMServer that also serves the routes."""
    config = AppConfig.from_args(args)
    replica = dict(
        placement_group_bundles=config.placement_group_bundles(),
        placement_group_strategy="STRICT_PACK",  # TP ranks share a node (NVLink)
        ray_actor_options=config.replica_actor_options(),
        max_ongoing_requests=config.max_ongoing_requests,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        # a draining replica checks once a second whether its last stream ended
        graceful_shutdown_wait_loop_s=1.0,
    )
    if config.colocate_ingress:
        return Ingress.options(name="LLMServer", num_replicas=1, health_check_period_s=10,
                               **replica).bind(None, config.ingress_options(), config.engine_args())
    llm_server = LLMServer.options(
        autoscaling_config=config.autoscaling_config(),
        request_router_config=config.request_router_config(),
        **replica,
    ).bind(config.engine_args())
    return Ingress.bind(llm_server, config.ingress_options())
