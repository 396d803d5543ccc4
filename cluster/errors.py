"""Typed errors the engine raises to its callers (the APIs map them to status codes)."""


class QueueFullError(RuntimeError):
    """More requests are queued than ``max_queued_requests`` allows (gRPC RESOURCE_EXHAUSTED / 429)."""


class EngineDeadError(RuntimeError):
    """The engine's step loop died; the replica must be replaced (gRPC UNAVAILABLE / 503)."""


class WorkerDiedError(EngineDeadError):
    """A tensor-parallel rank (or its process) is gone: the engine cannot step any more and the
    replica must be replaced with a fresh group (gRPC UNAVAILABLE / 503)."""


class RequestFailedError(RuntimeError):
    """The engine failed while processing one request; that request ended, the engine goes on
    (gRPC INTERNAL / 500, with a message that names no file or code)."""
