"""AsyncEngine: the engine behind an asyncio API, stepping in its own thread.

``generate`` is an async iterator of RequestOutput deltas; leaving it early (break, cancel,
client disconnect) aborts the request and frees its blocks at the next step.

Threads: the step thread owns the engine (and its tokenizer, which detokenizes): it also builds
it, so that every OpenMP parallel region of the process starts on that one thread. libgomp keeps a
thread pool per thread that starts regions and, once the process has more pool threads than
cores, stops spinning between regions: each region then starts with a futex wake-up. With the
model loaded on the caller's thread and stepped on this one, a batch-1 decode step took 7.8 ms
here instead of 5.2 (33 regions per step on 2 cores). The event loop
has a tokenizer of its own (HF fast tokenizers must not be shared between threads), and long
prompts are tokenized on a third thread with a third copy so the loop keeps streaming. A step's
outputs reach each event loop in one callback, and a stream whose reader fell behind gets its
pending deltas as one merged item. That callback is made when the next step's compute starts
(the model runner's compute hook), not at the end of the step: the loop's serving work then runs
beside the compute, which holds no GIL, rather than inside the step's Python. Served at 32
streams on 2 cores, the Python around the compiled CPU step took 1.6-2.3 ms more per step than
in-process before, 0.4 ms after.

``engine_process=True`` moves the EngineCore out of this process (cluster/engine_process.py): the
step thread is then replaced by the engine process and a reader thread that hands its per-step
output messages to the same delivery code.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections import defaultdict
from typing import AsyncIterator

from raylm.cluster.config import EngineConfig
from raylm.cluster.engine_core import EngineCore
from raylm.cluster.engine_process import IDLE_WAIT_S, EngineProcess
from raylm.cluster.errors import EngineDeadError, QueueFullError, RequestFailedError
from raylm.cluster.outputs import RequestOutput, merge_deltas
from raylm.cluster.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Prompts longer than this (characters) are tokenized off the event loop: ~1 ms of tokenizer
# time and up; shorter ones cost less than the thread hop.
OFFLOAD_TOKENIZE_CHARS = 4096


class _Stream:
    """Outputs of one request, handed from the step thread to the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._held: BaseException | None = None  # an error found behind merged deltas

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self) -> RequestOutput | BaseException:
        """The next item; deltas that piled up behind it (a slow reader) come merged."""
        if self._held is not None:
            item, self._held = self._held, None
            return item
        item = await self.queue.get()
        while isinstance(item, RequestOutput) and not self.queue.empty():
            newer = self.queue.get_nowait()
            if isinstance(newer, BaseException):  # delivered after the merged deltas
                self._held = newer
                break
            item = merge_deltas(item, newer)
        return item


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class AsyncEngine:
    """``engine_process=True`` runs the EngineCore in a child process (cluster/engine_process.py)
    instead of a step thread of this one; the API is the same, except that ``core`` (the
    EngineCore, for tests and tools) exists only in the thread mode."""

    def __init__(self, model: str, engine_process: bool = False, **kwargs) -> None:
        config = EngineConfig.from_kwargs(model, **kwargs)
        self.config = config
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Request) | ("abort", id)
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams and the count of pending adds
        self._num_pending_adds = 0
        self._stopped = False
        self._error: BaseException | None = None
        self._ids = itertools.count()
        self._proc: EngineProcess | None = None
        self._held: list[RequestOutput] = []  # the step thread's last outputs (see _run)
        if engine_process:
            self.core = None
            self._proc = EngineProcess(config, self._deliver_step, self._deliver_error,
                                       self._fail_all)
            path, self._max_model_len = self._proc.model_path, self._proc.max_model_len
        else:
            built: concurrent.futures.Future[EngineCore] = concurrent.futures.Future()
            self._thread = threading.Thread(target=self._run, args=(config, built),
                                            name="raylm-step-loop", daemon=True)
            self._thread.start()
            built.result()  # sets self.core; a failed build raises here, in the caller
            path, self._max_model_len = self.core.executor.model_path, self.core.max_model_len
        try:
            self.tokenizer = _load_tokenizer(path)  # the event loop's own copy
        except BaseException:
            self._stop_engine()
            raise
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="raylm-tokenize",
            initializer=self._init_tokenize_thread, initargs=(path,))

    _thread_local = threading.local()

    @classmethod
    def _init_tokenize_thread(cls, path: str) -> None:
        cls._thread_local.tokenizer = _load_tokenizer(path)

    @classmethod
    def _encode_here(cls, text: str) -> list[int]:
        return cls._thread_local.tokenizer.encode(text)

    async def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, as the engine would tokenize it; long text off the loop."""
        if len(text) <= OFFLOAD_TOKENIZE_CHARS:
            return self.tokenizer.encode(text)
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, self._encode_here, text)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def model_name(self) -> str:
        return self.config.model.model

    @property
    def engine_pid(self) -> int | None:
        """The engine process's pid (None in the thread mode)."""
        return self._proc.pid if self._proc is not None else None

    # -- API --------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       max_tokens_must_fit: bool = False) -> AsyncIterator[RequestOutput]:
        self.check_health()
        text = None
        if isinstance(prompt, str):
            text, prompt = prompt, await self.encode(prompt)
        stream = _Stream(asyncio.get_running_loop())
        if self._proc is not None:
            # validated in the engine process: a refusal comes back as this stream's error
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            command = ("add", dict(prompt=prompt, params=sampling_params, request_id=rid,
                                   priority=priority, max_tokens_must_fit=max_tokens_must_fit,
                                   prompt_text=text))
            with self._lock:
                if rid in self._streams:
                    raise ValueError(f"request_id {rid!r} is already running")
                self._streams[rid] = stream
            try:
                self._proc.send(command)
            except BaseException:
                with self._lock:
                    self._streams.pop(rid, None)
                raise
        else:
            request = self.core.make_request(prompt, sampling_params, request_id, priority,
                                             max_tokens_must_fit=max_tokens_must_fit,
                                             prompt_text=text)
            rid = request.request_id
            with self._lock:
                limit = self.config.scheduler.max_queued_requests
                queued = len(self.core.scheduler.waiting) + self._num_pending_adds
                if limit is not None and queued >= limit:
                    raise QueueFullError(f"{queued} requests are queued "
                                         f"(max_queued_requests={limit})")
                if rid in self._streams:
                    raise ValueError(f"request_id {rid!r} is already running")
                self._streams[rid] = stream
                self._num_pending_adds += 1
            self._inbox.put(("add", request))
            self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                await self.abort(rid)

    async def abort(self, request_id: str) -> None:
        if self._proc is not None:
            with self._lock:
                self._streams.pop(request_id, None)
            if self._proc.alive():
                self._proc.send(("abort", request_id))
            return
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def get_stats(self) -> dict:
        """The engine's counters; from the engine process, as of its last step or command."""
        if self._proc is not None:
            return dict(self._proc.stats)
        return self.core.get_stats()

    def call_engine(self, name: str):
        """EngineCore.<name>() (check_integrity, get_stats, check_health) run between two
        steps, in whichever thread or process owns the engine."""
        if self._proc is not None:
            return self._proc.call(name)
        return getattr(self.core, name)()  # from another thread: tests and tools, when idle

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine's step loop died: {self._error!r}")
        if self._proc is not None:
            if self._stopped or not self._proc.alive():
                raise EngineDeadError("the engine process is gone")
            return
        if self._stopped or not self._thread.is_alive():
            raise EngineDeadError("the engine is shut down")
        self.core.check_health()

    def shutdown(self) -> None:
        self._stop_engine()
        self._tokenize_pool.shutdown(wait=False)

    def _stop_engine(self) -> None:
        self._stopped = True
        if self._proc is not None:
            self._proc.shutdown()
            return
        self._wake.set()
        self._thread.join(timeout=10)
        self.core.shutdown()

    # -- step thread ------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._num_pending_adds -= 1
                try:
                    self.core.add_request(item)
                except Exception as e:  # noqa: BLE001 - reported to that request's caller
                    self._deliver_error(item.request_id, e)
            else:
                out = self.core.abort(item)
                with self._lock:
                    self._streams.pop(item, None)
                if out is not None:
                    logger.debug("aborted %s", item)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs over: one thread-safe callback per event loop, not per stream
        (each callback is a wake-up write and a loop iteration on the serving side)."""
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            for out in outputs:
                if out.error is not None:
                    stream = self._streams.pop(out.request_id, None)
                    item = RequestFailedError(out.error)
                else:
                    stream = self._streams.get(out.request_id)
                    if out.finished:
                        self._streams.pop(out.request_id, None)
                    item = out
                if stream is not None:
                    batches[stream.loop].append((stream.queue, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop is closed: nobody is reading those streams
                logger.debug("dropped %d outputs for a closed event loop", len(batch))

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)

    def _run(self, config: EngineConfig, built: concurrent.futures.Future) -> None:
        try:
            core = EngineCore(config)
        except BaseException as e:  # noqa: BLE001 - raised by the constructor's caller
            built.set_exception(e)
            return
        self.core = core  # before the loop below reads it
        # A step's outputs wait for the next step's compute to start (at most that step's
        # scheduling and input building) where the compute runs in this process: handed over
        # at once, they wake the event loop while this thread still runs Python, and every
        # GIL release on the way to the compute (each torch call) lets the loop run its whole
        # burst of serving work there, on the step's critical path. (Not with speculation: the
        # draft computes before the target's step starts.)
        hold = core.speculator is None and core.executor.set_compute_hook(self._release_held)
        built.set_result(core)
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.core.has_unfinished():
                    self._release_held()
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.core.step(emit_deltas=True)
                finally:
                    self._release_held()  # a step that computed nothing (or raised)
                if hold:
                    self._held = outputs
                else:
                    self._deliver_step(outputs)
        except BaseException as e:  # noqa: BLE001 - the loop must report, not vanish
            logger.exception("engine step loop died")
            self._fail_all(e)

    def _release_held(self) -> None:
        held, self._held = self._held, []
        if held:
            self._deliver_step(held)

    def _fail_all(self, error: BaseException) -> None:
        """The engine is gone: every open stream ends with EngineDeadError."""
        self._error = error
        with self._lock:
            streams, self._streams = self._streams, {}
        dead = EngineDeadError(f"the engine's step loop died: {error!r}")
        for stream in streams.values():
            stream.put(dead)
