"""One writer, N readers on one node: the per-step control message of a tensor-parallel group.

The payload is pickled once into a ring of slots in POSIX shared memory; each reader is woken by
one byte written to its own FIFO (a blocking read, so idle ranks spin on nothing and leave the
cores to the ranks that compute). This replaces one Ray call per rank per step (~1 ms each) with
one pickle, one memcpy and N tiny writes (tens of microseconds), the route vLLM took after Ray
Compiled Graphs: actors for placement, shared memory for control, NCCL/gloo for data.

Layout of the shared segment:
    [read_seq[0..N) : int64]  then NUM_SLOTS x [length: int64][payload: slot_bytes]
A reader bumps its read_seq after copying a message out, so the writer never overwrites a slot
some reader has not consumed (it waits, which only happens when a reader is NUM_SLOTS messages
behind). A message larger than a slot travels inline through the FIFO behind its wake-up byte
(length stored negated in the slot), so there is no size limit.

The creator owns the segment and the FIFOs and unlinks them in ``close``; readers and the writer
on the other side ``attach`` with the handle (a small picklable dict).
"""
from __future__ import annotations

import os
import pickle
import select
import struct
import tempfile
import time
import uuid
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

NUM_SLOTS = 4
DEFAULT_SLOT_BYTES = 4 << 20
_I64 = struct.Struct("<q")


class ChannelClosed(RuntimeError):
    """The other side went away (its check said so) while this side waited."""


class ShmChannel:
    def __init__(self, handle: dict[str, Any], *, owner: bool) -> None:
        self.handle = handle
        self.num_readers: int = handle["num_readers"]
        self.slot_bytes: int = handle["slot_bytes"]
        self._owner = owner
        self._shm = shared_memory.SharedMemory(name=handle["shm"], create=False) if not owner \
            else self._create_shm(handle)
        if not owner and handle["owner_pid"] != os.getpid():
            _untrack(self._shm)
        self._buf = self._shm.buf
        # O_RDWR on both ends: opening never blocks waiting for the peer, and a FIFO stays
        # valid while either side has it open.
        self._fifos = [os.open(p, os.O_RDWR) for p in handle["fifos"]]
        self._write_seq = 0
        self._read_seq = 0
        self._reader_index: int | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, num_readers: int, slot_bytes: int = DEFAULT_SLOT_BYTES) -> "ShmChannel":
        """A new channel owned by the caller (who unlinks it in ``close``)."""
        name = f"raylm-{uuid.uuid4().hex[:12]}"
        fifo_dir = tempfile.gettempdir()
        fifos = [os.path.join(fifo_dir, f"{name}-r{i}.fifo") for i in range(num_readers)]
        for path in fifos:
            os.mkfifo(path, 0o600)
        handle = {"shm": name, "fifos": fifos, "num_readers": num_readers,
                  "slot_bytes": slot_bytes, "owner_pid": os.getpid()}
        return cls(handle, owner=True)

    @classmethod
    def attach(cls, handle: dict[str, Any], reader_index: int | None = None) -> "ShmChannel":
        """The other side of ``handle``: a reader (``reader_index``) or, when None, the writer."""
        channel = cls(handle, owner=False)
        channel._reader_index = reader_index
        return channel

    @staticmethod
    def _create_shm(handle: dict[str, Any]) -> shared_memory.SharedMemory:
        size = 8 * handle["num_readers"] + NUM_SLOTS * (8 + handle["slot_bytes"])
        shm = shared_memory.SharedMemory(name=handle["shm"], create=True, size=size)
        shm.buf[: 8 * handle["num_readers"]] = bytes(8 * handle["num_readers"])
        return shm

    def as_reader(self, reader_index: int) -> "ShmChannel":
        """The owner reads (e.g. the driver reading rank 0's outputs)."""
        self._reader_index = reader_index
        return self

    # -- layout ------------------------------------------------------------------------------
    def _slot_offset(self, seq: int) -> int:
        return 8 * self.num_readers + (seq % NUM_SLOTS) * (8 + self.slot_bytes)

    def _reader_seq(self, i: int) -> int:
        return _I64.unpack_from(self._buf, 8 * i)[0]

    # -- writer ------------------------------------------------------------------------------
    def put(self, obj: Any, check: Callable[[], None] | None = None) -> None:
        """Broadcast ``obj`` to every reader. ``check`` is called while waiting for a slow
        reader and should raise if a reader is gone."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        seq = self._write_seq
        while min(self._reader_seq(i) for i in range(self.num_readers)) <= seq - NUM_SLOTS:
            if check is not None:
                check()
            time.sleep(0.0001)
        offset = self._slot_offset(seq)
        inline = len(data) > self.slot_bytes
        _I64.pack_into(self._buf, offset, -len(data) if inline else len(data))
        if not inline:
            self._buf[offset + 8: offset + 8 + len(data)] = data
        for fd in self._fifos:
            _write_all(fd, b"\x01" + data if inline else b"\x01", check)
        self._write_seq = seq + 1

    # -- reader ------------------------------------------------------------------------------
    def get(self, timeout: float | None = None, check: Callable[[], None] | None = None) -> Any:
        """The next message. Blocks; with ``timeout``, calls ``check`` every ``timeout``
        seconds while nothing arrives (it raises to give up)."""
        assert self._reader_index is not None, "get() on a channel attached as the writer"
        fd = self._fifos[self._reader_index]
        while timeout is not None and not select.select([fd], [], [], timeout)[0]:
            if check is not None:
                check()
        _read_exact(fd, 1)
        seq = self._read_seq
        offset = self._slot_offset(seq)
        length = _I64.unpack_from(self._buf, offset)[0]
        if length < 0:
            data = _read_exact(fd, -length)
        else:
            data = bytes(self._buf[offset + 8: offset + 8 + length])
        self._read_seq = seq + 1
        _I64.pack_into(self._buf, 8 * self._reader_index, seq + 1)
        return pickle.loads(data)

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        for fd in self._fifos:
            os.close(fd)
        self._fifos = []
        self._buf = None
        self._shm.close()
        if self._owner:
            self._shm.unlink()
            for path in self.handle["fifos"]:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


def _write_all(fd: int, data: bytes, check: Callable[[], None] | None) -> None:
    view = memoryview(data)
    while view:
        if len(view) > 1 and not select.select([], [fd], [], 1.0)[1]:
            if check is not None:
                check()  # a reader that stopped draining its FIFO may be dead
            continue
        n = os.write(fd, view[: 1 << 16])
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise ChannelClosed("the channel's FIFO was closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _untrack(shm: shared_memory.SharedMemory) -> None:
    """Attaching registers the segment with this process's resource tracker, which would
    unlink it when this process exits; only the owner may unlink."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
    except Exception:  # noqa: BLE001 - best effort; Python >= 3.13 has track=False instead
        pass
