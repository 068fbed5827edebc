"""Handing a Channel to another process: as a multiprocessing.Process argument (fork, spawn,
forkserver), inside a message sent over another Channel, or through a multiprocessing.Queue.
A receive takes from the socket only what it returns: messages sent before the handover and not
yet received wait in the socket, and the other process receives them, in order."""

import multiprocessing
import multiprocessing.connection
import os
import socket
import struct
import threading
from multiprocessing.reduction import ForkingPickler

import pytest

import loopfast

pytestmark = pytest.mark.timeout(120)

METHODS = [m for m in ("fork", "spawn", "forkserver")
           if m in multiprocessing.get_all_start_methods()]
FRAME_HEADER = struct.Struct("<BBHIQ")


def _ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# ---- child targets (module level, so that spawn can import them) ---------------------------------


def _echo(channel):
    with channel:
        message = channel.recv(timeout=60)
        channel.send(("echo", message, channel.readable, channel.writable))


def _one_way(reader, writer):
    """Gets the read-only end of one Pipe(duplex=False) and the write-only end of another."""
    message = reader.recv(timeout=60)
    writer.send((message, reader.readable, reader.writable, writer.readable, writer.writable))
    reader.close()
    writer.close()


def _recv_channel_and_echo(control):
    inner = control.recv(timeout=60)
    control.close()
    _echo(inner)


def _get_channel_and_echo(queue):
    _echo(queue.get(timeout=60))


def _recv_n_and_return(channel, count):
    with channel:
        messages = [channel.recv_bytes(timeout=60) for _ in range(count)]
        channel.send(messages)


def _recv_channel_then_n(control, count):
    inner = control.recv(timeout=60)
    control.close()
    _recv_n_and_return(inner, count)


# ---- helpers ----------------------------------------------------------------------------------


def _start(method, target, *args):
    process = multiprocessing.get_context(method).Process(target=target, args=args)
    process.start()
    return process


def _join(process):
    process.join(60)
    if process.is_alive():
        process.kill()
        process.join(10)
        pytest.fail("the child process did not finish")
    assert process.exitcode == 0


def _frame(payload):
    return FRAME_HEADER.pack(1, 0, 0, 0, len(payload)) + payload


def _queue_three_messages():
    """A Pipe whose second end has received one of three messages, all three queued in its
    socket at once; the other two still wait there."""
    a, b = loopfast.Pipe()
    for payload in (b"one", b"two", b"three"):
        a.send_bytes(payload)
    assert b.poll(10)
    assert b.recv_bytes(timeout=10) == b"one"
    # Precondition, not the behaviour under test: the other two are in the socket, where every
    # selector sees them. If this fails, the test no longer tests what it claims to.
    assert multiprocessing.connection.wait([b], timeout=0) == [b]
    with socket.socket(fileno=os.dup(b.fileno())) as raw_b:
        assert raw_b.recv(4096, socket.MSG_PEEK).endswith(_frame(b"two") + _frame(b"three"))
    return a, b


# ---- as a Process argument --------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_channel_as_process_argument(method):
    a, b = loopfast.Pipe()
    process = _start(method, _echo, b)
    with a, b:
        a.send("hi")
        assert a.recv(timeout=60) == ("echo", "hi", True, True)
    _join(process)


@pytest.mark.parametrize("method", METHODS)
def test_parent_closes_its_copy_right_after_start(method):
    a, b = loopfast.Pipe()
    process = _start(method, _echo, b)
    b.close()
    with a:
        a.send("after close")
        assert a.recv(timeout=60) == ("echo", "after close", True, True)
    _join(process)


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="::1 is not available")
@pytest.mark.parametrize("method", METHODS)
def test_ipv6_channel_as_process_argument(method):
    a, b = loopfast.Pipe(family="AF_INET6")
    process = _start(method, _echo, b)
    b.close()
    with a:
        a.send(6)
        assert a.recv(timeout=60) == ("echo", 6, True, True)
    _join(process)


@pytest.mark.parametrize("method", METHODS)
def test_one_way_ends_keep_their_direction_in_the_child(method):
    to_child_r, to_child_w = loopfast.Pipe(duplex=False)
    to_parent_r, to_parent_w = loopfast.Pipe(duplex=False)
    process = _start(method, _one_way, to_child_r, to_parent_w)
    to_child_r.close()
    to_parent_w.close()
    with to_child_w, to_parent_r:
        to_child_w.send("down")
        assert to_parent_r.recv(timeout=60) == ("down", True, False, False, True)
    _join(process)


def test_max_message_size_travels_with_the_channel():
    a, b = loopfast.Pipe(max_message_size=1234)
    clone = ForkingPickler.loads(ForkingPickler.dumps(b))
    with a, b, clone:
        assert clone.max_message_size == 1234
        a.send_bytes(b"x" * 2000)
        with pytest.raises(loopfast.ProtocolError):
            clone.recv_bytes(timeout=10)


# ---- inside a message -------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_channel_sent_over_another_channel_to_a_child(method):
    control, child_control = loopfast.Pipe()
    process = _start(method, _recv_channel_and_echo, child_control)
    child_control.close()
    a, b = loopfast.Pipe()
    with control, a:
        control.send(b)
        b.close()
        a.send("inner")
        assert a.recv(timeout=60) == ("echo", "inner", True, True)
    _join(process)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_channel_sent_through_a_multiprocessing_queue_to_a_child(method):
    queue = multiprocessing.get_context(method).Queue()
    process = _start(method, _get_channel_and_echo, queue)
    a, b = loopfast.Pipe()
    with a:
        queue.put(b)
        a.send("queued")
        assert a.recv(timeout=60) == ("echo", "queued", True, True)
    b.close()
    queue.close()
    queue.join_thread()
    _join(process)


# ---- queued messages are received by the other process ---------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_queued_messages_travel_with_a_process_argument(method):
    a, b = _queue_three_messages()
    process = _start(method, _recv_n_and_return, b, 3)
    b.close()
    with a:
        a.send_bytes(b"four")
        assert a.recv(timeout=60) == [b"two", b"three", b"four"]
    _join(process)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_queued_messages_travel_inside_a_message(method):
    control, child_control = loopfast.Pipe()
    process = _start(method, _recv_channel_then_n, child_control, 3)
    child_control.close()
    a, b = _queue_three_messages()
    with control, a:
        control.send(b)
        b.close()
        a.send_bytes(b"four")
        assert a.recv(timeout=60) == [b"two", b"three", b"four"]
    _join(process)


def test_queued_messages_travel_through_pickling_in_process():
    a, b = _queue_three_messages()
    clone = ForkingPickler.loads(ForkingPickler.dumps(b))
    b.close()
    with a, clone:
        assert clone.recv_bytes(timeout=10) == b"two"
        assert clone.recv_bytes(timeout=10) == b"three"
        a.send_bytes(b"four")
        assert clone.recv_bytes(timeout=10) == b"four"


# ---- a channel in the middle of a message cannot be handed over --------------------------------


def test_channel_in_the_middle_of_a_large_receive_cannot_be_handed_over():
    payload = os.urandom(300_000)
    a, b = loopfast.Pipe()
    with a, b, socket.socket(fileno=os.dup(a.fileno())) as raw_a:
        raw_a.setblocking(True)
        raw_a.sendall(FRAME_HEADER.pack(1, 0, 0, 0, len(payload)) + payload[:200_000])
        with pytest.raises(TimeoutError):
            b.recv_bytes(timeout=0.3)
        with pytest.raises(OSError):
            ForkingPickler.dumps(b)
        raw_a.sendall(payload[200_000:])
        assert b.recv_bytes(timeout=10) == payload


def test_failed_handover_keeps_no_copy_of_the_socket():
    """After a refused hand-over, closing the channel still closes the connection."""
    payload = os.urandom(300_000)
    a, b = loopfast.Pipe()
    with a, socket.socket(fileno=os.dup(a.fileno())) as raw_a:
        raw_a.setblocking(True)
        raw_a.sendall(FRAME_HEADER.pack(1, 0, 0, 0, len(payload)) + payload[:200_000])
        with pytest.raises(TimeoutError):
            b.recv_bytes(timeout=0.3)
        with pytest.raises(OSError):
            ForkingPickler.dumps(b)
        b.close()
        with pytest.raises(EOFError):
            a.recv_bytes(timeout=3)


def test_channel_in_the_middle_of_a_send_cannot_be_handed_over():
    big = bytes(64 * 1024 * 1024)
    a, b = loopfast.Pipe()
    with a, b:
        with pytest.raises(TimeoutError):
            a.send_bytes(big, timeout=0.3)  # nobody reads: only part of it goes out
        with pytest.raises(OSError):
            ForkingPickler.dumps(a)
        received = []
        reader = threading.Thread(
            target=lambda: received.extend(b.recv_bytes(timeout=30) for _ in range(2)))
        reader.start()
        a.send_bytes(b"next", timeout=30)  # the rest of `big` goes out first
        reader.join(60)
        assert not reader.is_alive()
        assert len(received) == 2
        assert received[0] == big
        assert received[1] == b"next"


def _close_it(channel):
    channel.close()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [10, 300_000])
def test_handover_does_not_wait_for_a_receive_in_another_thread(method, size):
    """multiprocessing.Pool's result handler waits in a receive on its result pipe while the pool
    starts workers, which are handed that pipe (they close it): the handover goes ahead, and the
    waiting receive gets its message, whole, also when it had begun to arrive (a large one)."""
    payload = os.urandom(size)
    a, b = loopfast.Pipe()
    with a, b:
        received = []
        receiver = threading.Thread(target=lambda: received.append(b.recv_bytes(timeout=60)))
        receiver.start()
        if size > 100_000:  # the receive is in the middle of a message when the handover comes
            with socket.socket(fileno=os.dup(a.fileno())) as raw_a:
                raw_a.setblocking(True)
                raw_a.sendall(_frame(payload)[:200_000])
                for _ in range(2):
                    _join(_start(method, _close_it, b))
                raw_a.sendall(_frame(payload)[200_000:])
        else:
            for _ in range(2):
                _join(_start(method, _close_it, b))
            a.send_bytes(payload)
        receiver.join(60)
        assert not receiver.is_alive()
        assert received == [payload]
        a.send_bytes(b"after")
        assert b.recv_bytes(timeout=10) == b"after"
