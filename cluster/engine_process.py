"""The engine core in a process of its own: ``AsyncEngine(..., engine_process=True)``.

Why: in one process, the serving side (event loop, gRPC / HTTP handlers, encoding every
streamed delta) and the step loop share one GIL. Each short burst of serving work makes the
step thread wait for the GIL while its compute threads idle: measured on 2 cores, a thread
taking 5 % of a core in 0.1 ms bursts slowed an in-process engine by 8.8 %, the same burner in
another process by about its own CPU time. vLLM v1 splits its engine core out for this reason.

Split: the frontend (AsyncEngine's process) keeps the streams, the event loop's tokenizer and
the servers; the engine process owns EngineCore: request validation and intake (grammar
compiling included), scheduling, the model, sampling, detokenization. It builds the engine on
its main thread and steps on it (libgomp's one-thread rule, see async_engine.py).

Wire: two socket pairs of pickled messages (multiprocessing.connection.Connection).
    to the engine:    ("add", kwargs of EngineCore.make_request) | ("abort", request_id)
                      | ("call", (token, method name)) | ("stop", None)
    from the engine:  ("ready", info) | ("failed", exc) | ("outputs", [RequestOutput], stats)
                      | ("error", request_id, exc) | ("stats", stats) | ("reply", token, result)
                      | ("dead", message)
The engine's stats travel with a step's outputs when a request ended in it or every
STATS_PERIOD_S, and after commands that leave it idle, so ``get_stats`` in the frontend answers
from the last snapshot without a round trip. The child
is started with ``python -m raylm.cluster.engine_process`` (not multiprocessing's spawn, which
would re-import the parent's __main__: a Ray worker's). It exits on "stop", and when its parent
dies: the command pipe then reads end-of-file (and the output pipe breaks) at the next step.
(Not PR_SET_PDEATHSIG: that fires when the *thread* that started the child ends, and Serve may
build a replica on a thread that does not outlive the constructor.)
"""
from __future__ import annotations

import gc
import itertools
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # an idle engine's wait for a command (thread or process)
STATS_PERIOD_S = 0.05  # how stale the frontend's get_stats may be while requests run
_START_TIMEOUT_S = 600.0  # loading a large checkpoint and pre-faulting its KV pool
CALLS = ("check_integrity", "get_stats", "check_health")  # what ("call", ...) may run


def by_default(device: str, compute_threads: int) -> bool:
    """The "auto" choice: a process of its own where the engine's compute leaves the servers a
    core (a GPU replica; a CPU replica computing on fewer threads than it may run on). Measured
    on 2 cores, 32 gRPC streams, the engine on 1 thread: 1.05x the in-process engine's tokens/s
    against 0.91x with a step thread. Where the step's threads take every core the split only
    adds wake-ups (0.88x either way at 32 streams; about 1 ms more per token at batch 1)."""
    if device.startswith("cuda"):
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return compute_threads < cores


def freeze_startup_objects() -> None:
    """Move everything alive once an engine is up (model, tokenizer, Ray, Serve: ~10^6 objects)
    out of the garbage collector's reach. A full collection otherwise scans all of it holding
    the GIL (~200 ms in a CPU replica, every minute or two under load): a stall of the step
    and of every stream. Frozen, it scans what requests allocated (~15 ms)."""
    gc.collect()
    gc.freeze()
    logger.info("%d start-up objects frozen out of garbage collection", gc.get_freeze_count())


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else one of the same kind (ValueError stays a
    ValueError: the servers answer it with INVALID_ARGUMENT / 400) carrying its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure
        kind = ValueError if isinstance(exc, ValueError) else RuntimeError
        return kind(f"{type(exc).__name__}: {exc}")


# -- engine side --------------------------------------------------------------------------------
class EngineLoop:
    """The child's loop: drain commands, step, send the step's outputs with the stats."""

    def __init__(self, core, inbox: Connection, outbox: Connection) -> None:
        self.core = core
        self.inbox = inbox
        self.outbox = outbox

    def run(self) -> None:
        stats_sent = 0.0
        while True:
            busy = self.core.has_unfinished()
            changed = self._drain(0.0 if busy else IDLE_WAIT_S)
            if changed is None:
                return
            if self.core.has_unfinished():
                outputs = self.core.step(emit_deltas=True)
                # stats when a request ended (its blocks are free now) or were last sent over
                # STATS_PERIOD_S ago: a batch-1 step is a few ms, the dict and its pickle ~50 us
                now = time.monotonic()
                stats = None
                if changed or now - stats_sent >= STATS_PERIOD_S or any(o.finished for o in outputs):
                    stats, stats_sent = self.core.get_stats(), now
                self.outbox.send(("outputs", outputs, stats))
            elif changed:
                self.outbox.send(("stats", self.core.get_stats()))

    def _drain(self, timeout: float) -> bool | None:
        """Handle every command waiting (waiting up to ``timeout`` for the first). Whether a
        request was added or aborted; None when told to stop or the frontend is gone."""
        changed = False
        while self.inbox.poll(timeout):
            timeout = 0.0
            try:
                kind, arg = self.inbox.recv()
            except EOFError:
                return None
            if kind == "add":
                changed = True
                try:
                    self.core.add_request(self.core.make_request(**arg))
                except Exception as e:  # noqa: BLE001 - reported to that request's caller
                    self.outbox.send(("error", arg["request_id"], portable(e)))
            elif kind == "abort":
                changed = True
                self.core.abort(arg)
            elif kind == "call":
                token, name = arg
                try:
                    result = getattr(self.core, name)() if name in CALLS else ValueError(name)
                except Exception as e:  # noqa: BLE001 - returned to the caller
                    result = portable(e)
                self.outbox.send(("reply", token, result))
            else:  # "stop"
                return None
        return changed


def main(fd_in: int, fd_out: int) -> None:
    inbox = Connection(fd_in, writable=False)
    outbox = Connection(fd_out, readable=False)
    config, num_threads, log_level = inbox.recv()
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s engine-process %(name)s: %(message)s")
    import torch

    torch.set_num_threads(num_threads)
    from raylm.cluster.engine_core import EngineCore

    try:
        core = EngineCore(config)
    except BaseException as e:  # noqa: BLE001 - the frontend raises it in its constructor
        outbox.send(("failed", portable(e)))
        return
    try:
        freeze_startup_objects()
        outbox.send(("ready", {"model_path": str(core.executor.model_path),
                               "max_model_len": core.max_model_len,
                               "stats": core.get_stats()}))
        EngineLoop(core, inbox, outbox).run()
    except (BrokenPipeError, ConnectionResetError):
        logger.info("the frontend is gone; the engine process exits")
    except BaseException as e:  # noqa: BLE001 - the loop must report, not vanish
        logger.exception("engine process step loop died")
        try:
            outbox.send(("dead", repr(e)))
        except OSError:
            pass
        raise
    finally:
        core.shutdown()


# -- frontend side ------------------------------------------------------------------------------
class EngineProcess:
    """The frontend's end: starts the child, sends commands, and hands every step's outputs
    to ``on_outputs`` and every refused request to ``on_error`` from a reader thread."""

    def __init__(self, config, on_outputs: Callable[[list], None],
                 on_error: Callable[[str, BaseException], None],
                 on_dead: Callable[[BaseException], None]) -> None:
        import torch

        self._on_outputs, self._on_error, self._on_dead = on_outputs, on_error, on_dead
        cmd_parent, cmd_child = socket.socketpair()
        out_parent, out_child = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "raylm.cluster.engine_process",
             str(cmd_child.fileno()), str(out_child.fileno())],
            pass_fds=(cmd_child.fileno(), out_child.fileno()),
            # the child imports raylm from where this process did (a source checkout included)
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        cmd_child.close()
        out_child.close()
        self._cmd = Connection(cmd_parent.detach(), readable=False)
        self._out = Connection(out_parent.detach(), writable=False)
        self._outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._replies: dict[int, Any] = {}
        self._reply_ready = threading.Condition()
        self._tokens = itertools.count()  # call() reply ids
        self.error: BaseException | None = None
        self._stopping = False
        self._cmd.send((config, torch.get_num_threads(), logging.getLogger().getEffectiveLevel()))
        kind, info = self._wait_ready()
        if kind == "failed":
            self._proc.wait(timeout=30)
            raise info
        self.model_path: str = info["model_path"]
        self.max_model_len: int = info["max_model_len"]
        self.stats: dict = info["stats"]
        self._reader = threading.Thread(target=self._read, name="raylm-engine-reader",
                                        daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write, name="raylm-engine-writer",
                                        daemon=True)
        self._writer.start()
        logger.info("engine process %d ready", self._proc.pid)

    def _wait_ready(self) -> tuple[str, Any]:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._out.poll(1.0):
            if self._proc.poll() is not None:
                raise RuntimeError(f"the engine process exited with code {self._proc.returncode} "
                                   f"while starting (its log says why)")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError(f"the engine process did not start in {_START_TIMEOUT_S:.0f}s")
        msg = self._out.recv()
        return msg[0], msg[1]

    @property
    def pid(self) -> int:
        return self._proc.pid

    def send(self, msg: Any) -> None:
        """Queue a command. Pickled here (a request that cannot travel raises in its caller);
        written by the sender thread, so that a full pipe (the engine inside a long step)
        never blocks the event loop."""
        self._outgoing.put(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def _write(self) -> None:
        while True:
            data = self._outgoing.get()
            if data is None:
                return
            try:
                self._cmd.send_bytes(data)
            except OSError:  # the engine is gone; the reader reports it
                return

    def call(self, name: str, timeout: float = 60.0) -> Any:
        """Run EngineCore.<name>() in the engine process between two steps; its result."""
        token = next(self._tokens)
        self.send(("call", (token, name)))
        deadline = time.monotonic() + timeout
        with self._reply_ready:
            while token not in self._replies:
                left = deadline - time.monotonic()
                if self.error is not None or left <= 0:
                    raise self.error or TimeoutError(f"{name} got no answer in {timeout}s")
                self._reply_ready.wait(left)
            result = self._replies.pop(token)
        if isinstance(result, BaseException):
            raise result
        return result

    def alive(self) -> bool:
        return self.error is None and self._proc.poll() is None

    def _read(self) -> None:
        try:
            while True:
                msg = self._out.recv()
                kind = msg[0]
                if kind == "outputs":
                    if msg[2] is not None:
                        self.stats = msg[2]
                    self._on_outputs(msg[1])
                elif kind == "stats":
                    self.stats = msg[1]
                elif kind == "error":
                    self._on_error(msg[1], msg[2])
                elif kind == "reply":
                    with self._reply_ready:
                        self._replies[msg[1]] = msg[2]
                        self._reply_ready.notify_all()
                elif kind == "dead":
                    raise RuntimeError(msg[1])
        except BaseException as e:  # noqa: BLE001 - EOF, a dead loop: the engine is gone
            if self._stopping:
                return
            code = self._proc.poll()
            self.error = e if not isinstance(e, EOFError) else RuntimeError(
                f"the engine process exited (code {code})")
            logger.error("engine process lost: %r", self.error)
            with self._reply_ready:
                self._reply_ready.notify_all()
            self._on_dead(self.error)

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.send(("stop", None))
        self._outgoing.put(None)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._cmd.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
