"""deploy/: the RayService manifests validate strictly against the KubeRay CRDs, embed the Serve
config files verbatim, and those configs build the raylm app."""
from __future__ import annotations

import copy
from pathlib import Path

import os

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = ROOT.parent / "shared" / "kuberay"
MANIFESTS = {"rayservice-cpu.yaml": "serve_config.yaml", "rayservice-gpu.yaml": "serve_config_gpu.yaml"}


def _strict(schema: dict) -> dict:
    """The CRD's OpenAPI v3 schema as a strict JSON schema: unknown fields are errors, required
    fields with a default are optional, int-or-string accepts both."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> dict:
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        props = node.get("properties")
        if props:
            for key, sub in props.items():
                props[key] = walk(sub)
            if "required" in node:
                node["required"] = [r for r in node["required"] if "default" not in props.get(r, {})]
            if not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
        if isinstance(node.get("items"), dict):
            node["items"] = walk(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = walk(node["additionalProperties"])
        return node

    return walk(schema)


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    if not (KUBERAY / "ray.io_rayservices.yaml").is_file():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY} (expected ../shared/kuberay next to the repo)")
    crd = yaml.safe_load((KUBERAY / "ray.io_rayservices.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_manifest_validates_against_crd(rayservice_schema, manifest):
    import jsonschema

    doc = yaml.safe_load((DEPLOY / manifest).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    jsonschema.validate(doc, rayservice_schema)
    assert doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_strict_check_catches_a_typo(rayservice_schema):
    import jsonschema

    doc = yaml.safe_load((DEPLOY / "rayservice-cpu.yaml").read_text())
    cluster = doc["spec"]["rayClusterConfig"]
    cluster["enableInTreeAutoScaling"] = cluster.pop("enableInTreeAutoscaling")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, rayservice_schema)


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_serve_config_is_embedded_verbatim(manifest):
    doc = yaml.safe_load((DEPLOY / manifest).read_text())
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    local = yaml.safe_load((DEPLOY / MANIFESTS[manifest]).read_text())
    assert embedded == local


@pytest.mark.parametrize("config", sorted(MANIFESTS.values()))
def test_serve_configs_are_valid_and_build_the_app(config):
    from ray.serve.schema import ServeDeploySchema

    from raylm.cluster.serve.app import GRPC_SERVICER_FUNCTIONS, AppConfig, build_app

    raw = yaml.safe_load((DEPLOY / config).read_text())
    ServeDeploySchema.model_validate(raw)
    assert raw["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICER_FUNCTIONS
    (app,) = raw["applications"]
    assert app["import_path"] == "raylm.cluster.serve.app:build_app"
    app_config = AppConfig.from_args(app["args"])
    assert len(app_config.placement_group_bundles()) == app_config.tensor_parallel_size
    build_app(app["args"])  # builds the deployment graph without starting Ray


def test_gpu_config_is_tensor_parallel_and_autoscaled():
    from raylm.cluster.serve.app import AppConfig

    args = yaml.safe_load((DEPLOY / "serve_config_gpu.yaml").read_text())["applications"][0]["args"]
    config = AppConfig.from_args(args)
    assert config.tensor_parallel_size > 1
    assert all(b.get("GPU") == 1 for b in config.placement_group_bundles())
    # The replica only schedules; each rank's actor takes its whole bundle (one GPU each).
    assert config.replica_actor_options() == {"num_cpus": 0, "num_gpus": 0}
    assert config.max_replicas > config.min_replicas


def test_cpu_tp_replica_fits_the_node():
    from raylm.cluster.serve.app import AppConfig

    config = AppConfig.from_args({"tensor_parallel_size": 2, "device": "cpu"})
    bundles = config.placement_group_bundles()
    # Two ranks split the node's cores (or share one core when there is only one).
    assert len(bundles) == 2 and sum(b["CPU"] for b in bundles) <= max(2, os.cpu_count())
    assert config.replica_actor_options()["num_cpus"] == 0


def test_app_args_are_checked():
    from raylm.cluster.serve.app import AppConfig

    with pytest.raises(ValueError, match="max_num_seq"):
        AppConfig.from_args({"max_num_seq": 4})  # typo of max_num_seqs
    with pytest.raises(ValueError, match="max_replicas"):
        AppConfig.from_args({"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValueError, match="handle_transport"):
        AppConfig.from_args({"handle_transport": "zmq"})
    assert AppConfig.from_args({}).ingress_options()["handle_transport"] == "grpc"
    assert AppConfig.from_args({"handle_transport": "actor"}).ingress_options()[
        "handle_transport"] == "actor"


def test_ingress_colocates_only_with_a_single_replica():
    """The routes may run inside the model replica only when there is exactly one; several
    need the separate Ingress to route across them (an error naming the field)."""
    from raylm.cluster.serve.app import AppConfig

    assert AppConfig.from_args({}).colocate_ingress is False
    assert AppConfig.from_args({"colocate_ingress": True}).colocate_ingress is True
    for replicas in ({"max_replicas": 2}, {"min_replicas": 0}):  # autoscaled, scale-to-zero
        with pytest.raises(ValueError, match="colocate_ingress"):
            AppConfig.from_args({"colocate_ingress": True, **replicas})


def test_local_handle_calls_like_a_deployment_handle():
    """The colocated ingress calls the in-process LLMServer through the handle's surface:
    awaitable calls (sync or async methods), streams that iterate and cancel (the generator's
    cleanup runs: the engine aborts the request)."""
    import asyncio

    from raylm.cluster.serve.local_handle import LocalHandle

    class Server:
        def __init__(self):
            self.closed = False

        def check_health(self):
            raise RuntimeError("engine down")

        async def model_info(self):
            return {"model": "m"}

        async def generate(self, request):
            try:
                for i in range(request["n"]):
                    yield {"i": i}
            finally:
                self.closed = True

    async def main():
        server = Server()
        handle = LocalHandle(server).options(stream=False)
        assert await handle.model_info.remote() == {"model": "m"}
        call = handle.check_health.remote()  # raises when awaited, as a handle's response
        with pytest.raises(RuntimeError, match="engine down"):
            await call
        items = [item async for item in handle.options(stream=True).generate.remote({"n": 3})]
        assert items == [{"i": 0}, {"i": 1}, {"i": 2}] and server.closed
        server.closed = False
        stream = handle.generate.remote({"n": 100})
        assert await stream.__anext__() == {"i": 0}
        stream.cancel()
        await asyncio.sleep(0.01)
        assert server.closed
        with pytest.raises(AttributeError):
            handle._private  # noqa: B018

    asyncio.run(main())


def test_replica_channel_errors_reach_clients_as_unavailable_or_cancelled():
    """With handle_transport grpc a dead or unreachable replica surfaces as a grpc AioRpcError:
    a client must see 503 / UNAVAILABLE (retry), a cancel stays a cancel, never a 500."""
    import grpc

    from raylm.cluster.serve.ingress import _handle_error

    def rpc_error(code):
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom")

    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        err = _handle_error(rpc_error(code))
        assert err.kind == "unavailable" and err.http_status == 503 and "boom" not in err.message
    assert _handle_error(rpc_error(grpc.StatusCode.CANCELLED)).kind == "cancelled"


def test_dockerfile_builds_on_the_ray_image():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM rayproject/ray:" in text
    assert text.index("torch") < text.index('".[triton,haproxy]"')  # torch first, then the project
    assert "ENV RAY_SERVE_PROXY_USE_GRPC=1" in text  # the proxy reaches the ingress over gRPC
    from raylm.cluster.serve.limits import SERVE_PROCESS_ENV

    for key, value in SERVE_PROCESS_ENV.items():  # the same process settings as `raylm serve`
        assert f"ENV {key}={value}" in text
