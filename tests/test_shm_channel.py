"""The shared-memory broadcast channel of a tensor-parallel group: every reader gets every
message in order, messages larger than a slot travel inline, and a writer never overwrites a
slot a reader has not consumed."""
import threading

import pytest

from raylm.workers.shm_channel import NUM_SLOTS, ShmChannel


@pytest.fixture
def channel():
    ch = ShmChannel.create(num_readers=2, slot_bytes=256)
    yield ch
    ch.close()


def _read_all(handle, index, count, into):
    reader = ShmChannel.attach(handle, reader_index=index)
    try:
        into.extend(reader.get(timeout=5.0) for _ in range(count))
    finally:
        reader.close()


def test_every_reader_gets_every_message_in_order(channel):
    # Small and larger-than-a-slot messages, more than NUM_SLOTS of them back to back.
    messages = [("execute", list(range(i * 50))) for i in range(3 * NUM_SLOTS)]
    got = [[], []]
    readers = [threading.Thread(target=_read_all, args=(channel.handle, i, len(messages), got[i]))
               for i in range(2)]
    for r in readers:
        r.start()
    for m in messages:
        channel.put(m)
    for r in readers:
        r.join(timeout=30)
    assert got[0] == messages and got[1] == messages


def test_a_writer_waits_for_a_slow_reader_and_check_can_give_up(channel):
    reader = ShmChannel.attach(channel.handle, reader_index=0)
    other = ShmChannel.attach(channel.handle, reader_index=1)
    for i in range(NUM_SLOTS):
        channel.put(i)  # fills the ring: nobody has read yet

    class Gone(Exception):
        pass

    def check():
        raise Gone

    with pytest.raises(Gone):  # the next put would overwrite slot 0: it waits, asks check()
        channel.put("one too many", check=check)
    assert [reader.get(), other.get()] == [0, 0]
    channel.put(NUM_SLOTS)  # a slot is free again
    assert [reader.get() for _ in range(NUM_SLOTS)] == list(range(1, NUM_SLOTS + 1))
    reader.close()
    other.close()


def test_a_reader_with_a_timeout_polls_its_check(channel):
    reader = ShmChannel.attach(channel.handle, reader_index=0)
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise TimeoutError

    with pytest.raises(TimeoutError):
        reader.get(timeout=0.01, check=check)
    assert len(calls) == 3
    reader.close()
