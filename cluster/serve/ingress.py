"""Ingress deployment: OpenAI-compatible HTTP routes (FastAPI) and the raylm.v1.Generation gRPC
methods, both forwarding to LLMServer through a streaming DeploymentHandle.

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime
through Serve's class-based view, and string annotations would turn bodies into query params."""

import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from raylm.cluster.serve import grpc_servicer, openai_routes
from raylm.cluster.serve.errors import ServeError
from raylm.cluster.serve.protocol import ChatCompletionRequest, CompletionRequest
from raylm.proto import generation_pb2 as pb

app = FastAPI(title="raylm", description="OpenAI-compatible API of a raylm server")


@app.exception_handler(ServeError)
async def _serve_error(_: Request, err: ServeError) -> JSONResponse:
    return JSONResponse(err.openai_body(), status_code=err.http_status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ())[1:]]  # drop "body" / "query"
    param = loc[0] if loc else None
    err = ServeError("invalid_argument", f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}",
                     param)
    return JSONResponse(err.openai_body(), status_code=400)


def _handle_error(exc: BaseException) -> ServeError:
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, BackPressureError):
        return ServeError("resource_exhausted", "the server is overloaded, retry later")
    if isinstance(exc, RequestCancelledError):
        return ServeError("cancelled", "the request was cancelled")
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return ServeError("unavailable", f"the model replica is unavailable: {exc}")
    return ServeError("internal", f"{type(exc).__name__}: {exc}")


def _set_status(grpc_context: "RayServegRPCContext", err: ServeError) -> None:
    grpc_context.set_code(err.grpc_code)
    grpc_context.set_details(err.message)


# Module-level helpers are defined above the class: Serve pickles the ingress class by value
# when it is decorated, capturing only the globals that exist at that point.
@serve.deployment(name="Ingress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, llm_server: DeploymentHandle) -> None:
        self._llm = llm_server
        self._info: dict[str, Any] | None = None

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self._llm.model_info.remote()
        return self._info

    async def _items(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """LLMServer's step items; cancels the upstream request if the consumer goes away."""
        stream = self._llm.options(stream=True).generate.remote(request)
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
        try:
            return await openai_routes.start_stream(self._items(request))
        except StopAsyncIteration as exc:
            raise ServeError("internal", "the model server ended the stream without output") from exc

    # --- OpenAI HTTP --------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await self._llm.model_info.remote()
        except Exception as exc:
            err = _handle_error(exc)
            return JSONResponse(err.openai_body(), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        info = await self._model_info()
        return {"object": "list", "data": [{
            "id": info["model"], "object": "model", "created": int(time.time()),
            "owned_by": "raylm", "max_model_len": info["max_model_len"]}]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        model = (await self._model_info())["model"]
        starts = [await self._start(r) for r in body.to_requests()]
        if body.stream:
            return StreamingResponse(
                openai_routes.completion_stream(starts, body.n, model, body.include_usage),
                media_type="text/event-stream")
        return JSONResponse(await openai_routes.completion_response(starts, body.n, model))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        model = (await self._model_info())["model"]
        first, rest = await self._start(body.to_request())
        if body.stream:
            return StreamingResponse(
                openai_routes.chat_stream(first, rest, model, body.include_usage),
                media_type="text/event-stream")
        return JSONResponse(await openai_routes.chat_response(first, rest, model))

    # --- gRPC: raylm.v1.Generation -------------------------------------------------------------

    async def Generate(self, request: "pb.GenerateRequest",
                       grpc_context: "RayServegRPCContext") -> "pb.GenerateResponse":
        try:
            first, rest = await self._start(grpc_servicer.generate_request(request))
            collector = grpc_servicer.UnaryCollector((await self._model_info())["model"])
            collector.add(first)
            async for item in rest:
                if "error" in item:
                    raise ServeError.from_dict(item)
                collector.add(item)
            return collector.response()
        except ServeError as err:
            _set_status(grpc_context, err)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: "pb.GenerateRequest",
                             grpc_context: "RayServegRPCContext") -> "AsyncIterator[pb.GenerateStreamResponse]":
        try:
            first, rest = await self._start(grpc_servicer.generate_request(request))
            yield grpc_servicer.stream_response(first)
            async for item in rest:
                if "error" in item:
                    raise ServeError.from_dict(item)
                yield grpc_servicer.stream_response(item)
        except ServeError as err:
            # a streamed status only reaches the proxy with a message or an exception; Serve
            # keeps the code set on the context when the method raises
            _set_status(grpc_context, err)
            raise

    async def Tokenize(self, request: "pb.TokenizeRequest",
                       grpc_context: "RayServegRPCContext") -> "pb.TokenizeResponse":
        result = await self._llm.tokenize.remote(grpc_servicer.tokenize_request(request))
        if "error" in result:
            _set_status(grpc_context, ServeError.from_dict(result))
            return pb.TokenizeResponse()
        return pb.TokenizeResponse(token_ids=result["token_ids"], tokens=result["tokens"])

    async def GetModelInfo(self, request: "pb.GetModelInfoRequest",
                           grpc_context: "RayServegRPCContext") -> "pb.ModelInfo":
        return grpc_servicer.model_info(await self._model_info())
