"""Ingress deployment: OpenAI-compatible HTTP routes (FastAPI) and the raylm.v1.Generation gRPC
methods, both forwarding to LLMServer through a streaming DeploymentHandle.

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime
through Serve's class-based view, and string annotations would turn bodies into query params."""

import asyncio
import logging
import time
from pathlib import PurePath
from typing import Any, AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from raylm.cluster.errors import EngineDeadError
from raylm.cluster.serve import grpc_servicer, http_guard, openai_routes
from raylm.cluster.serve.errors import ServeError, error_from_exception
from raylm.cluster.serve.grpc_services import InvalidMessage
from raylm.cluster.serve.limits import HANDLE_TRANSPORTS
from raylm.cluster.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                          TokenizeRequest)
from raylm.proto import generation_pb2 as pb

logger = logging.getLogger(__name__)

app = FastAPI(title="raylm", description="OpenAI-compatible API of a raylm server")
app.add_middleware(http_guard.RequestGuard)

HEALTH_TIMEOUT_S = 5.0
_UNAVAILABLE = "the model replica is unavailable; retry shortly"
_HTTP_KINDS = {401: "unauthenticated", 404: "not_found", 413: "too_large"}


@app.exception_handler(ServeError)
async def _serve_error(_: Request, err: ServeError) -> JSONResponse:
    return JSONResponse(err.openai_body(), status_code=err.http_status)


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (404 route, 405 method, 413 body) in OpenAI's error shape."""
    err = ServeError(_HTTP_KINDS.get(exc.status_code, "invalid_argument"), str(exc.detail))
    body = err.openai_body()
    body["error"]["code"] = exc.status_code
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ())[1:]]  # drop "body" / "query"
    param = loc[0] if loc else None
    err = ServeError("invalid_argument", f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}",
                     param)
    return JSONResponse(err.openai_body(), status_code=400)


def _handle_error(exc: BaseException) -> ServeError:
    """Any failure on the way to LLMServer as a ServeError whose message is fit for a client:
    details (exception text, hosts, paths) stay in the server log."""
    if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, BackPressureError):
        return ServeError("resource_exhausted", "the server is overloaded, retry later")
    if isinstance(exc, RequestCancelledError):
        return ServeError("cancelled", "the request was cancelled")
    if isinstance(exc, grpc.aio.AioRpcError):  # the replica's gRPC channel (handle_transport)
        if exc.code() == grpc.StatusCode.CANCELLED:
            return ServeError("cancelled", "the request was cancelled")
        logger.warning("model replica unavailable: %s", exc.code())
        return ServeError("unavailable", _UNAVAILABLE)
    if isinstance(exc, (RayActorError, DeploymentUnavailableError, EngineDeadError)):
        logger.warning("model replica unavailable: %s", exc)
        return ServeError("unavailable", _UNAVAILABLE)
    return error_from_exception(exc)


def _set_status(grpc_context: "RayServegRPCContext", err: ServeError) -> None:
    grpc_context.set_code(err.grpc_code)
    grpc_context.set_details(err.message)


# Module-level helpers are defined above the class: Serve pickles the ingress class by value
# when it is decorated, capturing only the globals that exist at that point.
@serve.deployment(name="Ingress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, llm_server: DeploymentHandle | None, options: dict[str, Any] | None = None,
                 engine_args: dict[str, Any] | None = None) -> None:
        """`options`: api_key (None = open), max_request_bytes, docs (serve /docs, /redoc and
        /openapi.json), served_model_name (None = the checkpoint directory's name),
        handle_transport ("grpc" or "actor", see AppConfig.handle_transport).
        `engine_args` instead of a handle: this replica owns the model itself (the app's only
        replica, AppConfig.colocate_ingress) and the routes call it in-process."""
        options = dict(options or {})
        self._served_name: str | None = options.pop("served_model_name", None)
        transport = options.pop("handle_transport", "grpc")
        if transport not in HANDLE_TRANSPORTS:
            raise ValueError(f"handle_transport must be one of {HANDLE_TRANSPORTS}, got {transport!r}")
        if (llm_server is None) == (engine_args is None):
            raise ValueError("Ingress takes either an LLMServer handle or engine_args")
        self._colocated = engine_args is not None
        if self._colocated:
            from raylm.cluster.serve.llm_server import LLMServer
            from raylm.cluster.serve.local_handle import LocalHandle

            llm_server = LocalHandle(LLMServer.func_or_class(engine_args))
        self._llm = llm_server
        # Token streams go over Serve's direct gRPC channel to the replica instead of Ray actor
        # calls: each streamed item skips the object-store / core-worker path (about 1.3x the
        # throughput at 32 streams on a 2-core box, README "Serving path").
        self._llm_stream = llm_server.options(stream=True, _by_reference=transport == "actor")
        self._info: dict[str, Any] | None = None
        self._guard = http_guard.GuardSettings(**options)
        http_guard.configure(self._guard)

    async def _model_info(self) -> dict[str, Any]:
        """LLMServer's model info, its `model` being the name clients see (never a path)."""
        if self._info is None:
            info = dict(await self._llm.model_info.remote())
            path = info["model"]
            info["model"] = self._served_name or PurePath(path.rstrip("/")).name or path
            info["aliases"] = {info["model"], path}
            self._info = info
        return self._info

    async def _resolve_model(self, request: dict[str, Any]) -> dict[str, Any]:
        """Check the request's `model` against the served name (or the checkpoint path)."""
        info = await self._model_info()
        model = request.get("model")
        if model and model not in info["aliases"]:
            raise ServeError("not_found", f"model '{model}' is not served here; this server "
                             f"serves '{info['model']}'", "model")
        return {**request, "model": None}

    async def _items(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """LLMServer's step items; cancels the upstream request if the consumer goes away."""
        stream = self._llm_stream.generate.remote(request)
        done = False
        try:
            async for item in stream:
                yield item
            done = True
        except Exception as exc:
            raise _handle_error(exc) from exc
        finally:
            if not done:
                stream.cancel()

    async def _start(self, request: dict[str, Any]) -> tuple[dict[str, Any], AsyncIterator[dict]]:
        items = self._items(request)
        try:
            return await openai_routes.start_stream(items)
        except StopAsyncIteration as exc:
            raise ServeError("unavailable", "the model server ended the stream without output") from exc
        except BaseException:
            await items.aclose()
            raise

    async def _start_all(self, requests: list[dict[str, Any]]) -> list[tuple[dict, AsyncIterator]]:
        """Start every prompt of a batch; if one fails, cancel those already started."""
        starts = []
        try:
            for r in requests:
                starts.append(await self._start(r))
        except BaseException:
            for _, rest in starts:
                await rest.aclose()
            raise
        return starts

    # --- OpenAI HTTP --------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 while a replica's engine passes its health check (its step loop is alive)."""
        if http_guard.draining():
            return JSONResponse(ServeError("unavailable", "the server is shutting down")
                                .openai_body(), status_code=503)
        try:
            # while no replica is up, a handle call waits for one: a probe needs an answer now
            await asyncio.wait_for(self._llm.check_health.remote(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return JSONResponse(ServeError("unavailable", "no model replica answered within "
                                           f"{HEALTH_TIMEOUT_S:.0f}s").openai_body(), status_code=503)
        except Exception as exc:
            err = _handle_error(exc)
            if err.kind == "internal":  # check_health raised: that engine is down
                err = ServeError("unavailable", _UNAVAILABLE)
            return JSONResponse(err.openai_body(), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card(await self._model_info())]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict[str, Any]:
        info = await self._model_info()
        if model_id not in info["aliases"]:
            raise ServeError("not_found", f"model '{model_id}' is not served here; this server "
                             f"serves '{info['model']}'", "model")
        return self._model_card(info)

    @staticmethod
    def _model_card(info: dict[str, Any]) -> dict[str, Any]:
        return {"id": info["model"], "object": "model", "created": int(time.time()),
                "owned_by": "raylm", "max_model_len": info["max_model_len"]}

    # vLLM's tokenizer endpoints: lm-eval's `local-completions` probes /tokenizer_info and
    # /tokenize and, when both answer, tokenizes through the server (no local checkpoint needed)

    async def _call(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            result = await getattr(self._llm, method).remote(request)
        except Exception as exc:
            raise _handle_error(exc) from exc
        if "error" in result:
            raise ServeError.from_dict(result)
        return result

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        result = await self._call("tokenize", await self._resolve_model(body.to_request()))
        ids = result["token_ids"]
        return {"count": len(ids), "max_model_len": (await self._model_info())["max_model_len"],
                "tokens": ids, "token_strs": result["tokens"] if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        return await self._call("detokenize", await self._resolve_model(body.model_dump()))

    @app.get("/tokenizer_info")
    async def tokenizer_info(self) -> dict[str, Any]:
        try:
            return dict(await self._llm.tokenizer_info.remote())
        except Exception as exc:
            raise _handle_error(exc) from exc

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        model = (await self._model_info())["model"]
        starts = await self._start_all([await self._resolve_model(r) for r in body.to_requests()])
        if body.stream:
            return StreamingResponse(
                openai_routes.completion_stream(starts, body.n, model, body.include_usage,
                                                body.echo, body.continuous_usage),
                media_type="text/event-stream")
        try:
            return JSONResponse(await openai_routes.completion_response(starts, body.n, model,
                                                                        body.echo))
        finally:  # one prompt failed: the others stop too
            for _, rest in starts:
                await rest.aclose()

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        model = (await self._model_info())["model"]
        first, rest = await self._start(await self._resolve_model(body.to_request()))
        if body.stream:
            return StreamingResponse(
                openai_routes.chat_stream(first, rest, model, body.include_usage,
                                          body.continuous_usage, body.tool_call_mode),
                media_type="text/event-stream")
        try:
            return JSONResponse(await openai_routes.chat_response(first, rest, model,
                                                                  body.tool_call_mode))
        finally:
            await rest.aclose()

    # --- the replica's own (Serve's health check, the CLI) ---------------------------------

    async def check_health(self) -> None:
        """Serve's periodic check: with the model in this replica, its engine's; a separate
        LLMServer replica is checked by Serve on its own."""
        if self._colocated:
            await self._llm.check_health.remote()

    async def get_stats(self) -> dict[str, Any]:
        """The engine's counters (`raylm serve` waits on them while draining)."""
        return await self._llm.get_stats.remote()

    async def model_info(self) -> dict[str, Any]:
        return await self._llm.model_info.remote()

    # --- gRPC: raylm.v1.Generation -------------------------------------------------------------

    def drain(self) -> None:
        """`raylm serve` on SIGINT/SIGTERM: refuse new requests (503 / UNAVAILABLE), let the
        ones in flight finish."""
        http_guard.start_draining()

    def _check_grpc(self, request: Any, grpc_context: "RayServegRPCContext") -> None:
        """The API key (metadata `authorization: Bearer <key>`) and a parseable message."""
        if http_guard.draining():
            raise ServeError("unavailable", "the server is shutting down")
        if self._guard.api_key is not None:
            metadata = dict(grpc_context.invocation_metadata())
            if not http_guard.bearer_token_ok(metadata.get("authorization"), self._guard.api_key):
                raise ServeError("unauthenticated", "a valid API key is required: send metadata "
                                                    "'authorization: Bearer <key>'")
        if isinstance(request, InvalidMessage):
            raise ServeError(request.kind, request.message)

    async def Generate(self, request: "pb.GenerateRequest",
                       grpc_context: "RayServegRPCContext") -> "pb.GenerateResponse":
        rest = None
        try:
            self._check_grpc(request, grpc_context)
            first, rest = await self._start(
                await self._resolve_model(grpc_servicer.generate_request(request)))
            collector = grpc_servicer.UnaryCollector((await self._model_info())["model"])
            collector.add(first)
            async for item in rest:
                if "error" in item:
                    raise ServeError.from_dict(item)
                collector.add(item)
            return collector.response()
        except Exception as exc:
            _set_status(grpc_context, _handle_error(exc))
            return pb.GenerateResponse()
        finally:
            if rest is not None:
                await rest.aclose()  # cancelled or failed: the engine aborts the request now

    async def GenerateStream(self, request: "pb.GenerateRequest",
                             grpc_context: "RayServegRPCContext") -> "AsyncIterator[pb.GenerateStreamResponse]":
        rest = None
        try:
            self._check_grpc(request, grpc_context)
            first, rest = await self._start(
                await self._resolve_model(grpc_servicer.generate_request(request)))
            yield grpc_servicer.stream_response(first)
            async for item in rest:
                if "error" in item:
                    raise ServeError.from_dict(item)
                yield grpc_servicer.stream_response(item)
        except Exception as exc:
            # a streamed status only reaches the proxy with a message or an exception; Serve
            # keeps the code set on the context when the method raises
            err = _handle_error(exc)
            _set_status(grpc_context, err)
            raise err from None
        finally:
            # Serve throws CancelledError in here when the client cancels: close the upstream
            # stream now rather than whenever the garbage collector gets to it
            if rest is not None:
                await rest.aclose()

    async def Tokenize(self, request: "pb.TokenizeRequest",
                       grpc_context: "RayServegRPCContext") -> "pb.TokenizeResponse":
        try:
            self._check_grpc(request, grpc_context)
            result = await self._llm.tokenize.remote(grpc_servicer.tokenize_request(request))
            if "error" in result:
                raise ServeError.from_dict(result)
        except Exception as exc:
            _set_status(grpc_context, _handle_error(exc))
            return pb.TokenizeResponse()
        return pb.TokenizeResponse(token_ids=result["token_ids"], tokens=result["tokens"])

    async def GetModelInfo(self, request: "pb.GetModelInfoRequest",
                           grpc_context: "RayServegRPCContext") -> "pb.ModelInfo":
        try:
            self._check_grpc(request, grpc_context)
            info = await self._model_info()
            return grpc_servicer.model_info({k: v for k, v in info.items() if k != "aliases"})
        except Exception as exc:
            _set_status(grpc_context, _handle_error(exc))
            return pb.ModelInfo()
