"""What raylm registers on Serve's gRPC proxy: `add_raylm_services` is the
`grpc_servicer_functions` entry (instead of the generated `add_GenerationServicer_to_server`).

- raylm.v1.Generation, with request parsers that never raise: a payload protobuf cannot parse,
  or one over the size limit, becomes an `InvalidMessage` that the ingress answers with
  INVALID_ARGUMENT / RESOURCE_EXHAUSTED. (A parser that raises makes grpc answer UNKNOWN.)
- grpc.health.v1.Health (Check, Watch), served by the proxy itself: SERVING while an
  LLMServer replica's engine answers its health check.
- grpc.reflection.v1.ServerReflection next to Serve's v1alpha, for newer grpcurl versions.

Health and reflection are Serve "passthrough" services: their handlers run in the proxy
process instead of being routed to a replica, as Serve does for its own reflection service."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as reflection_alpha_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from raylm.cluster.serve.limits import max_request_bytes_from_env
from raylm.proto import generation_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE = "raylm.v1.Generation"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"
LLM_DEPLOYMENT = "LLMServer"
HEALTH_CACHE_S = 1.0  # probes may come often; ask the replicas at most this often
HEALTH_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 2.0


@dataclass(frozen=True)
class InvalidMessage:
    """Stands for a request that could not be parsed; crosses to the ingress replica."""

    kind: str  # a ServeError kind: "invalid_argument" | "too_large"
    message: str


def _parser(message_cls, max_bytes: int) -> Callable[[bytes], Any]:
    def parse(data: bytes):
        if len(data) > max_bytes:
            return InvalidMessage("too_large", f"the request has {len(data)} bytes; the limit "
                                               f"is {max_bytes}")
        try:
            return message_cls.FromString(data)
        except Exception:  # noqa: BLE001 - any parse failure is the client's payload
            return InvalidMessage("invalid_argument", f"the request is not a valid "
                                                      f"{message_cls.DESCRIPTOR.full_name} message")
    return parse


def _generation_handlers(servicer, max_bytes: int) -> dict[str, grpc.RpcMethodHandler]:
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    return {
        "Generate": unary(servicer.Generate, _parser(pb.GenerateRequest, max_bytes),
                          pb.GenerateResponse.SerializeToString),
        "GenerateStream": stream(servicer.GenerateStream, _parser(pb.GenerateRequest, max_bytes),
                                 pb.GenerateStreamResponse.SerializeToString),
        "Tokenize": unary(servicer.Tokenize, _parser(pb.TokenizeRequest, max_bytes),
                          pb.TokenizeResponse.SerializeToString),
        "GetModelInfo": unary(servicer.GetModelInfo, _parser(pb.GetModelInfoRequest, max_bytes),
                              pb.ModelInfo.SerializeToString),
    }


def _add_service(server, name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(name, handlers)


class EngineHealth:
    """Whether any serving app has an LLMServer replica whose engine passes check_health."""

    def __init__(self) -> None:
        self._checked_at = 0.0
        self._serving = False
        self._lock = asyncio.Lock()

    async def serving(self) -> bool:
        async with self._lock:
            if time.monotonic() - self._checked_at > HEALTH_CACHE_S:
                self._serving = await self._ask()
                self._checked_at = time.monotonic()
            return self._serving

    async def _ask(self) -> bool:
        from ray import serve

        try:
            status = await asyncio.to_thread(serve.status)
            apps = [name for name, app in status.applications.items()
                    if LLM_DEPLOYMENT in app.deployments]
            for app in apps:
                handle = serve.get_deployment_handle(LLM_DEPLOYMENT, app_name=app)
                try:
                    await asyncio.wait_for(handle.check_health.remote(), HEALTH_TIMEOUT_S)
                    return True
                except Exception:  # noqa: BLE001 - this app is not serving; try the next
                    logger.debug("health: %s is not serving", app, exc_info=True)
        except Exception:  # noqa: BLE001 - no answer means not serving
            logger.warning("health: could not read the Serve status", exc_info=True)
        return False


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: "" (the server) and raylm.v1.Generation are known services."""

    def __init__(self) -> None:
        self._health = EngineHealth()

    async def _status(self, service: str):
        if service not in ("", SERVICE):
            return None
        serving = await self._health.serving()
        return (health_pb2.HealthCheckResponse.SERVING if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def Check(self, request, context):
        status = await self._status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = await self._status(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_INTERVAL_S)


def _add_health(server) -> None:
    servicer = HealthServicer()
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check, health_pb2.HealthCheckRequest.FromString,
            health_pb2.HealthCheckResponse.SerializeToString),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch, health_pb2.HealthCheckRequest.FromString,
            health_pb2.HealthCheckResponse.SerializeToString),
    }
    _add_service(server, HEALTH_SERVICE, handlers)


def _add_reflection_v1(server) -> None:
    """v1 and v1alpha reflection messages are the same on the wire (only the package differs),
    so grpcio-reflection's v1alpha servicer answers v1 requests too."""
    names = [SERVICE, HEALTH_SERVICE, REFLECTION_V1_SERVICE,
             reflection_alpha_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name]
    servicer = ReflectionServicer(names)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            reflection_alpha_pb2.ServerReflectionRequest.FromString,
            reflection_alpha_pb2.ServerReflectionResponse.SerializeToString),
    }
    _add_service(server, REFLECTION_V1_SERVICE, handlers)


class _CallContext:
    """A gRPC call's context as Serve's stream code sees it from the feeder task (below). Once
    the call is over (the client cancelled), reads answer with the values taken while it was
    alive and writes are dropped: grpc's C core crashes the process when a finished call's
    context is read (Serve's access log reads the peer address after a cancel)."""

    _READS = ("peer", "invocation_metadata", "auth_context", "code", "details",
              "peer_identities", "peer_identity_key", "trailing_metadata")

    def __init__(self, context) -> None:
        self._context = context
        self._taken = {name: getattr(context, name)() for name in self._READS}
        self.over = False

    def __getattr__(self, name: str):
        if not self.over:
            return getattr(self._context, name)
        if name in self._taken:
            value = self._taken[name]
            return lambda: value
        return lambda *args, **kwargs: None


def _cancel_reaching(factory: Callable) -> Callable:
    """Wrap Serve's handler factory so a client's cancel of a server stream always cancels the
    request to the ingress replica.

    Serve's proxy cancels the replica request only when the cancel lands while it awaits the
    next item from the replica; when it lands while the proxy is writing to the client (often,
    for a busy stream), its generators are simply dropped and the replica streams on to
    max_tokens (26 of 100 cancels were lost that way). Here Serve's stream runs in a task of
    its own that only ever waits for the replica: cancelling that task on the client's cancel
    always lands in the wait that cancels the replica request.

    The replica's own gRPC server (Serve's direct ingress, behind HAProxy) runs the routes in
    the process that streams: a cancel that lands while grpc writes drops generators whose
    close (asyncio's async-generator finalizer) aborts the request there and then, so its
    stream goes without the feeder task and its extra hop per message."""
    from ray.serve._private.proxy_request_response import gRPCStreamingType

    in_replica = getattr(factory, "__name__", "") == "_direct_ingress_service_handler_factory"

    def make(service_method: str, streaming_type):
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if streaming_type != gRPCStreamingType.UNARY_STREAM:
            return handler
        return (_inline_stream if in_replica else _fed_stream)(handler)

    return make


def _inline_stream(handler: Callable) -> Callable:
    """Serve's replica stream in the call's own task; once the call is over, Serve's clean-up
    reads the context's values taken while it was alive (_CallContext)."""

    async def unary_stream(request, context):
        call = _CallContext(context)
        stream = handler(request, call)
        try:
            async for message in stream:
                yield message
        finally:
            call.over = True  # a dropped stream's clean-up (below) runs after the call is over
            await stream.aclose()

    return unary_stream


def _fed_stream(handler: Callable) -> Callable:
    """Serve's proxy stream in a feeder task that only ever waits for the replica."""

    async def unary_stream(request, context):
        items: asyncio.Queue = asyncio.Queue()  # unbounded: the feeder never waits on it
        call = _CallContext(context)

        async def feed() -> None:
            try:
                async for message in handler(request, call):
                    items.put_nowait((True, message))
                items.put_nowait((False, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                items.put_nowait((False, exc))

        feeder = asyncio.ensure_future(feed())
        try:
            while True:
                more, message = await items.get()
                if not more:
                    if message is not None:
                        raise message
                    return
                yield message
        finally:
            if not feeder.done():
                call.over = True
                feeder.cancel()  # lands in Serve's wait for the replica: it cancels there

    return unary_stream


def add_raylm_services(servicer, server) -> None:
    """The `grpc_servicer_functions` entry of the raylm app (Serve passes a mock servicer
    whose methods it replaces with its routing to the ingress)."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is not None:  # Serve's proxy server: its routing handlers are made from this
        server.service_handler_factory = _cancel_reaching(factory)
    _add_service(server, SERVICE, _generation_handlers(servicer, max_request_bytes_from_env()))
    passthrough = getattr(server, "add_passthrough_service", None)
    if passthrough is None:  # not Serve's proxy server: nothing runs health or reflection here
        return
    for name in (HEALTH_SERVICE, REFLECTION_V1_SERVICE):
        passthrough(name)
    _add_health(server)
    _add_reflection_v1(server)
