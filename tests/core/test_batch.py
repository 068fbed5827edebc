"""Explicit batching: send_bytes_many, recv_bytes_many and batch()."""

import array
import os
import pickle
import threading

import pytest

import loopfast

TIMEOUT = 30


@pytest.fixture
def pipe():
    a, b = loopfast.Pipe()
    yield a, b
    a.close()
    b.close()


def _receive(channel, count):
    out = []
    while len(out) < count:
        out += channel.recv_bytes_many(timeout=TIMEOUT)
    return out


def _in_thread(target, *args):
    result = {}

    def run():
        try:
            result["value"] = target(*args)
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _joined(thread, result):
    thread.join(TIMEOUT * 2)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.mark.parametrize("count", [0, 1, 100_000])
def test_send_bytes_many_sends_each_buffer_as_its_own_message(pipe, count):
    a, b = pipe
    messages = [i.to_bytes(4, "little") * (i % 5) for i in range(count)]
    thread, result = _in_thread(_receive, b, count)
    a.send_bytes_many(messages, timeout=TIMEOUT)
    assert _joined(thread, result) == messages
    a.send_bytes(b"after")
    assert b.recv_bytes(timeout=TIMEOUT) == b"after"  # nothing more was sent


def test_send_bytes_many_with_buffers_larger_than_the_socket_buffers(pipe):
    a, b = pipe
    messages = [os.urandom(8 << 20), b"small", bytearray(os.urandom(3 << 20)), b"",
                memoryview(os.urandom(100_000))[::2], array.array("i", range(1000))]
    expected = [bytes(m) if not isinstance(m, array.array) else m.tobytes() for m in messages]
    thread, result = _in_thread(_receive, b, len(messages))
    a.send_bytes_many(messages, timeout=TIMEOUT)
    assert _joined(thread, result) == expected


def test_send_bytes_many_refuses_a_non_buffer_and_sends_nothing(pipe):
    a, b = pipe
    with pytest.raises(TypeError):
        a.send_bytes_many([b"one", "two"])
    a.send_bytes(b"next")
    assert b.recv_bytes_many(timeout=TIMEOUT) == [b"next"]


def test_recv_bytes_many_respects_max_messages(pipe):
    a, b = pipe
    a.send_bytes_many([b"%d" % i for i in range(10)])
    assert b.recv_bytes_many(max_messages=1, timeout=TIMEOUT) == [b"0"]
    got = b.recv_bytes_many(max_messages=4, timeout=TIMEOUT)
    assert 1 <= len(got) <= 4
    rest = _receive(b, 10 - 1 - len(got))
    assert [b"0", *got, *rest] == [b"%d" % i for i in range(10)]
    with pytest.raises(ValueError):
        b.recv_bytes_many(max_messages=0)


def test_recv_bytes_many_times_out_and_keeps_the_stream(pipe):
    a, b = pipe
    with pytest.raises(TimeoutError):
        b.recv_bytes_many(timeout=0.05)
    a.send_bytes(b"x" * 200_000)  # larger than a direct read: left for a call of its own
    a.send_bytes(b"y")
    first = b.recv_bytes_many(timeout=TIMEOUT)
    assert first[0] == b"x" * 200_000
    assert (first[1:] or b.recv_bytes_many(timeout=TIMEOUT)) == [b"y"]


def test_recv_bytes_many_leaves_an_object_message_for_recv(pipe):
    a, b = pipe
    a.send_bytes(b"raw")
    a.send({"blob": pickle.PickleBuffer(bytearray(10_000))})  # an out-of-band buffer
    assert _receive(b, 1) == [b"raw"]
    with pytest.raises(OSError):
        b.recv_bytes_many(timeout=TIMEOUT)
    assert b.recv(timeout=TIMEOUT) == {"blob": bytearray(10_000)}


def test_batch_holds_messages_until_the_block_ends(pipe):
    a, b = pipe
    with a.batch():
        for i in range(100):
            a.send_bytes(b"%d" % i)
        assert not b.poll(0.05)  # nothing written yet
    assert _receive(b, 100) == [b"%d" % i for i in range(100)]


def test_batch_flushes_at_the_threshold(pipe):
    a, b = pipe
    with a.batch():
        for _ in range(100):
            a.send_bytes(b"z" * 1000)  # 100 kB: past the 64 KiB threshold
        assert b.poll(5)
        first = b.recv_bytes(timeout=TIMEOUT)
    assert first == b"z" * 1000
    assert len(_receive(b, 99)) == 99


def test_batch_flushes_on_exception(pipe):
    a, b = pipe
    with pytest.raises(RuntimeError):
        with a.batch():
            a.send_bytes(b"kept")
            raise RuntimeError("boom")
    assert b.recv_bytes(timeout=TIMEOUT) == b"kept"


def test_batch_keeps_order_with_large_payloads_and_objects(pipe):
    a, b = pipe
    big = os.urandom(1 << 20)
    thread, result = _in_thread(lambda: [b.recv(timeout=TIMEOUT), b.recv_bytes(timeout=TIMEOUT)]
                                + [b.recv(timeout=TIMEOUT) for _ in range(3)])
    with a.batch():
        a.send("small-1")
        a.send_bytes(big)   # flushes the batch, then goes out
        a.send("small-2")
        a.send({"blob": pickle.PickleBuffer(bytearray(big))})  # an out-of-band buffer
        a.send("small-3")
    received = _joined(thread, result)
    assert received[0] == "small-1"
    assert received[1] == big
    assert received[2] == "small-2"
    assert received[3] == {"blob": bytearray(big)}
    assert received[4] == "small-3"


def test_sends_outside_a_batch_go_out_at_once(pipe):
    a, b = pipe
    with a.batch():
        pass
    a.send_bytes(b"now")
    assert b.poll(5)
    assert b.recv_bytes(timeout=TIMEOUT) == b"now"
