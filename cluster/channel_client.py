"""The driver's end of a group of worker actors served through shared-memory channels
(workers/shm_channel.py, workers/worker.py: serve_channel): one broadcast per call, the first
actor's answer back, and Ray only to notice that an actor died."""
from __future__ import annotations

import time
from typing import Any

from raylm.cluster.errors import WorkerDiedError

POLL_S = 0.5  # how often a waiting driver checks that every actor is alive


class ChannelClient:
    def __init__(self, actors: list, name: str) -> None:
        """``actors`` expose ``run_loop(inbox_handle, outbox_handle)``; actor 0 answers."""
        from raylm.workers.shm_channel import ShmChannel

        self.name = name
        self.inbox = ShmChannel.create(num_readers=len(actors))
        self.outbox = ShmChannel.create(num_readers=1).as_reader(0)
        self.loops = [a.run_loop.remote(self.inbox.handle, self.outbox.handle if i == 0 else None)
                      for i, a in enumerate(actors)]
        self.closed = False

    def call(self, kind: str, payload: Any) -> tuple[Any, float]:
        """Broadcast (kind, payload); returns actor 0's (answer, seconds it computed)."""
        from raylm.workers.worker import ERROR

        if self.closed:
            raise WorkerDiedError(f"the {self.name} workers are shut down")
        self.inbox.put((kind, payload), check=self.check)
        reply, answer, compute_s = self.outbox.get(timeout=POLL_S, check=self.check)
        if reply == ERROR:
            raise WorkerDiedError(f"a {self.name} worker failed: {answer}")
        return answer, compute_s

    def round_trips(self, num: int) -> list[float]:
        from raylm.workers.worker import PING

        times = []
        for i in range(num):
            start = time.perf_counter()
            self.call(PING, i)
            times.append(time.perf_counter() - start)
        return times

    def check(self) -> None:
        """Raise WorkerDiedError if any actor's loop ended (died, or stopped serving)."""
        import ray

        ready, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
        if not ready:
            return
        index = self.loops.index(ready[0])
        try:
            ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - RayActorError, the worker's own exception...
            raise WorkerDiedError(f"{self.name} worker {index} died: "
                                  f"{type(exc).__name__}: {str(exc)[:500]}") from exc
        raise WorkerDiedError(f"{self.name} worker {index} stopped serving")

    def close(self) -> None:
        from raylm.workers.worker import STOP

        if self.closed:
            return
        self.closed = True
        try:
            self.inbox.put((STOP, None), check=self.check)
        except Exception:  # noqa: BLE001 - a dead worker needs no stop message
            pass
        self.inbox.close()
        self.outbox.close()
