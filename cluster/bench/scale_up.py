"""`raylm bench scale-up`: time from sustained overload to a second replica serving.

Deploys the app here with 1..2 replicas (the autoscaling thresholds at their defaults unless
`--serve-arg` says otherwise), starts `--clients` closed-loop HTTP clients at t=0, and reports
when the controller had a second replica RUNNING and when that replica answered its first
request (its prompt-token counter moved), then stops the load. Every request must be answered.

    raylm bench scale-up --clients 48 --num-cpus-per-replica 1
"""
from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from raylm.cluster.bench.report import format_table, write_json
from raylm.cluster.bench.serve_routers import per_replica_stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    parser.add_argument("--clients", type=int, default=48, help="concurrent closed-loop clients")
    parser.add_argument("--output-len", type=int, default=64, help="tokens per request")
    parser.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after (s)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--serve-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra build_app argument (int/float parsed), repeatable")
    parser.add_argument("--out", default="bench_results/scale_up.json")


def _load(url: str, model: str, output_len: int, stop: threading.Event, counts: dict) -> None:
    import requests

    n = 0
    while not stop.is_set():
        n += 1
        body = {"model": model, "prompt": f"{threading.get_ident()} {n} tell me a story",
                "max_tokens": output_len, "ignore_eos": True, "temperature": 0}
        try:
            ok = requests.post(url, json=body, timeout=600).status_code == 200
        except Exception:  # counted: the run fails if any request is not answered
            ok = False
        with counts["lock"]:
            counts["sent"] += 1
            counts["answered"] += ok


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from raylm.cluster.bench.serve_routers import _serve_args
    from raylm.cluster.serve.llm_server import resolve_model
    from raylm.cluster.serve.app import build_app

    args.model = args.model or resolve_model(None)
    args.replicas = 1
    serve_args = _serve_args(args, "prefix")
    serve_args["max_replicas"] = 2
    ray.init(num_cpus=max(2, int(-(-2 * args.num_cpus_per_replica // 1))),
             include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    counts: dict[str, Any] = {"sent": 0, "answered": 0, "lock": threading.Lock()}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
        serve.run(build_app(serve_args), name="scale-up", route_prefix="/")
        handle = serve.get_deployment_handle("LLMServer", app_name="scale-up")
        (first,) = per_replica_stats(handle, 1)
        url = f"http://127.0.0.1:{args.http_port}/v1/completions"
        threads = [threading.Thread(target=_load, args=(url, args.model, args.output_len, stop,
                                                        counts), daemon=True)
                   for _ in range(args.clients)]
        start = time.monotonic()
        for t in threads:
            t.start()
        running_at = serving_at = None
        while time.monotonic() - start < args.timeout and serving_at is None:
            time.sleep(0.5)
            status = serve.status().applications["scale-up"].deployments["LLMServer"]
            num_running = sum(n for s, n in status.replica_states.items()
                              if str(s).endswith("RUNNING"))
            if running_at is None and num_running >= 2:
                running_at = time.monotonic() - start
            if running_at is not None:
                stats = per_replica_stats(handle, 2, attempts=20)
                if any(rid != first and s["num_prompt_tokens"] > 0 for rid, s in stats.items()):
                    serving_at = time.monotonic() - start
        stop.set()
        for t in threads:
            t.join(timeout=600)
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()
    result = {"clients": args.clients, "second_replica_running_s": running_at,
              "second_replica_serving_s": serving_at, "sent": counts["sent"],
              "answered": counts["answered"], "serve_args": serve_args}
    print(format_table(["clients", "2nd replica RUNNING s", "2nd replica serving s", "sent",
                        "answered"], [[args.clients, running_at, serving_at, counts["sent"],
                                       counts["answered"]]]))
    print(f"wrote {write_json(args.out, result)}")
    return 0 if serving_at is not None and counts["sent"] == counts["answered"] else 1
