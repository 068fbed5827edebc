"""Channels between real processes (multiprocessing fork and spawn): round trips of every size,
objects, traffic both ways at once, timeouts, EOF, a peer killed mid-frame, poll() in a child
that shares the socket, and Ctrl-C in a child.

Child targets are module-level functions so that spawn can import them. A child that finds
something wrong raises (exit code 1); the parent checks every child's exit code.
"""

import os
import signal
import sys
import time

import pytest
from conftest import (
    FRAME_HEADER,
    KIND_BYTES,
    RECV_TIMEOUT,
    Background,
    assert_same_object,
    buffer_rich_object,
    child_process,
    make_payload,
    recv_n_bytes,
    send_all_bytes,
)

import loopfast

KiB = 1024
MiB = 1024 * 1024

STOP = b"\xffSTOP"
ECHO_SIZES = [0, 1, 16 * KiB - 1, 16 * KiB, 16 * KiB + 1, 64 * KiB, 64 * KiB + 1,
              256 * KiB - 16, 256 * KiB + 1, 4 * MiB + 5, 64 * MiB]


# ---- child targets -------------------------------------------------------------------------------

def _echo_bytes(ch):
    """Echo messages until STOP; even ones through recv_bytes, odd ones through recv_bytes_into
    and send_bytes(buf, 0, n)."""
    buf = bytearray(64 * MiB + 16)
    i = 0
    while True:
        if i % 2 == 0:
            message = ch.recv_bytes(timeout=RECV_TIMEOUT)
            if message == STOP:
                break
            ch.send_bytes(message, timeout=RECV_TIMEOUT)
        else:
            n = ch.recv_bytes_into(buf, timeout=RECV_TIMEOUT)
            if buf[:n] == STOP:
                break
            ch.send_bytes(buf, 0, n, timeout=RECV_TIMEOUT)
        i += 1
    ch.close()


def _echo_objects(ch):
    while True:
        obj = ch.recv(timeout=RECV_TIMEOUT)
        if obj == "STOP":
            break
        ch.send(obj, timeout=RECV_TIMEOUT)
    ch.close()


def _tagged(tag, count):
    return [b"%s:%06d:" % (tag, i) + bytes([i % 251]) * (i % 200) for i in range(count)]


def _both_ways(ch, count):
    """Send `count` messages from a thread while receiving `count` in this one; check them."""
    sender = Background(send_all_bytes, ch, _tagged(b"child", count))
    received = recv_n_bytes(ch, count)
    sender.result()
    assert received == _tagged(b"parent", count), "child received wrong or reordered messages"
    ch.send_bytes(b"child verified", timeout=RECV_TIMEOUT)
    ch.close()


def _send_sizes_and_exit(ch, sizes):
    for i, size in enumerate(sizes):
        ch.send_bytes(make_payload(size, seed=i), timeout=RECV_TIMEOUT)
    # exits without close(): the process ending must look like a clean close to the peer


def _send_then_hang_in_big_send(ch, count, big_size):
    for i in range(count):
        ch.send_bytes(b"before-kill-%d" % i, timeout=RECV_TIMEOUT)
    ch.send_bytes(b"\xab" * big_size, timeout=120)  # blocks: the parent does not read it
    time.sleep(120)  # not reached while the parent kills us


def _send_then_hang_mid_frame(ch, count, partial):
    for i in range(count):
        ch.send_bytes(b"before-kill-%d" % i, timeout=RECV_TIMEOUT)
    ch._send_raw(partial, timeout=RECV_TIMEOUT)  # the start of a frame, never finished
    time.sleep(120)  # until killed


def _poll_only(ch):
    """Look at the channel without receiving: poll() must not take anything from the parent."""
    assert ch.poll(RECV_TIMEOUT) is True
    assert ch.poll() is True
    assert ch.poll(-1) is True
    assert loopfast.wait([ch], timeout=RECV_TIMEOUT) == [ch]


def _recv_until_interrupted(ch):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ch.send_bytes(b"ready", timeout=RECV_TIMEOUT)
        ch.recv_bytes(timeout=60.0)
        outcome = b"not interrupted"
    except KeyboardInterrupt:
        outcome = b"interrupted"
    ch.send_bytes(outcome, timeout=RECV_TIMEOUT)
    # the channel still works after the interruption
    ch.send_bytes(ch.recv_bytes(timeout=RECV_TIMEOUT), timeout=RECV_TIMEOUT)
    ch.close()


# ---- tests ---------------------------------------------------------------------------------------

def test_round_trip_of_every_size_through_a_child(start_method, family):
    a, b = loopfast.Pipe(family=family)
    with a, child_process(start_method, _echo_bytes, b, close_after_start=[b]):
        for i, size in enumerate(ECHO_SIZES):
            payload = make_payload(size, seed=i)
            a.send_bytes(payload, timeout=RECV_TIMEOUT)
            if i % 2:
                assert a.recv_bytes(timeout=RECV_TIMEOUT) == payload
            else:
                buf = bytearray(size + 3)
                assert a.recv_bytes_into(buf, 3, timeout=RECV_TIMEOUT) == size
                assert buf[3:] == payload
        a.send_bytes(STOP, timeout=RECV_TIMEOUT)
        with pytest.raises(EOFError):
            a.recv_bytes(timeout=RECV_TIMEOUT)


def test_round_trip_of_numpy_arrays_through_a_child(start_method):
    np = pytest.importorskip("numpy")
    a, b = loopfast.Pipe()
    arrays = [
        np.arange(100_000, dtype=np.float64),
        np.asfortranarray(np.arange(40_000, dtype=np.int32).reshape(200, 200)),
        np.arange(300_000, dtype=np.int16)[::3],
    ]
    with a, child_process(start_method, _echo_bytes, b, close_after_start=[b]):
        for i, arr in enumerate(arrays):
            a.send_bytes(arr, timeout=RECV_TIMEOUT)
            dest = np.zeros(arr.size, dtype=arr.dtype)  # C order
            if i % 2:
                dest[:] = np.frombuffer(a.recv_bytes(timeout=RECV_TIMEOUT), dtype=arr.dtype)
            else:
                assert a.recv_bytes_into(dest, timeout=RECV_TIMEOUT) == arr.nbytes
            assert np.array_equal(dest, arr.ravel(order="C"))
        a.send_bytes(STOP, timeout=RECV_TIMEOUT)


OBJECTS = [
    None,
    {"a": [1, 2, 3], "b": {"c": None, "d": (4.5, "six")}},
    ["x" * 100_000, list(range(50_000)), {i: str(i) for i in range(1000)}],
    {"blob": make_payload(3 * MiB), "nested": [[[[["deep"]]]]]},
]


def test_objects_carrying_numpy_arrays_round_trip_through_a_child(start_method):
    np = pytest.importorskip("numpy")
    objects = [buffer_rich_object(np), buffer_rich_object(np, big=20 * MiB)]
    a, b = loopfast.Pipe()
    with a, child_process(start_method, _echo_objects, b, close_after_start=[b]):
        for obj in objects:
            a.send(obj, timeout=RECV_TIMEOUT)
            assert_same_object(a.recv(timeout=RECV_TIMEOUT), obj)
        a.send("STOP", timeout=RECV_TIMEOUT)


def test_objects_round_trip_through_a_child(start_method):
    a, b = loopfast.Pipe()
    with a, child_process(start_method, _echo_objects, b, close_after_start=[b]):
        for obj in OBJECTS:
            a.send(obj, timeout=RECV_TIMEOUT)
            assert a.recv(timeout=RECV_TIMEOUT) == obj
        a.send("STOP", timeout=RECV_TIMEOUT)


@pytest.mark.parametrize("fam", ["AF_INET", "AF_INET6"])
def test_thousands_of_messages_both_ways_at_once_between_processes(start_method, fam):
    from conftest import skip_if_family_unavailable
    skip_if_family_unavailable(fam)
    count = 5000
    a, b = loopfast.Pipe(family=fam)
    with a, child_process(start_method, _both_ways, b, count, close_after_start=[b]):
        sender = Background(send_all_bytes, a, _tagged(b"parent", count))
        received = recv_n_bytes(a, count)
        sender.result()
        assert received == _tagged(b"child", count)
        assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"child verified"


def test_child_exit_after_sending_gives_all_messages_then_eoferror(start_method):
    sizes = [0, 5, 20 * KiB, 100 * KiB, 8 * MiB, 1]
    a, b = loopfast.Pipe()
    with a, child_process(start_method, _send_sizes_and_exit, b, sizes, close_after_start=[b]):
        for i, size in enumerate(sizes):
            assert a.recv_bytes(timeout=RECV_TIMEOUT) == make_payload(size, seed=i)
        with pytest.raises(EOFError):
            a.recv_bytes(timeout=RECV_TIMEOUT)


def test_tiny_receive_timeouts_against_a_child_sending_large_messages(start_method):
    sizes = [64 * MiB, 3, 5 * MiB]
    a, b = loopfast.Pipe()
    with a, child_process(start_method, _send_sizes_and_exit, b, sizes, close_after_start=[b]):
        give_up = time.monotonic() + 120
        for i, size in enumerate(sizes):
            while True:
                try:
                    got = a.recv_bytes(timeout=0.001)
                    break
                except TimeoutError:
                    assert time.monotonic() < give_up, "gave up waiting for the child"
            assert got == make_payload(size, seed=i)
        with pytest.raises(EOFError):
            a.recv_bytes(timeout=RECV_TIMEOUT)


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(RECV_TIMEOUT)
    assert proc.exitcode == -signal.SIGKILL


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_child_killed_in_the_middle_of_a_large_send_gives_protocolerror(start_method, family):
    a, b = loopfast.Pipe(family=family)
    # 80 MiB: more than the socket buffers can hold, so the child is certainly still sending.
    with a, child_process(start_method, _send_then_hang_in_big_send, b, 3, 80 * MiB,
                          exitcode=None, close_after_start=[b]) as proc:
        for i in range(3):
            assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"before-kill-%d" % i
        assert a.poll(RECV_TIMEOUT)  # the big frame has started to arrive
        _kill(proc)
        with pytest.raises(loopfast.ProtocolError):
            a.recv_bytes(timeout=RECV_TIMEOUT)
        assert a.closed


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("how", ["recv_bytes", "recv_bytes_into", "recv"])
@pytest.mark.parametrize("cut", [7, 16, 16 + 1000],
                         ids=["mid-header", "header-only", "mid-payload"])
def test_child_killed_mid_frame_delivers_earlier_messages_then_protocolerror(
        start_method, how, cut):
    full = FRAME_HEADER.pack(KIND_BYTES, 0, 0, 0, 5000) + make_payload(5000)
    a, b = loopfast.Pipe()
    with a, child_process(start_method, _send_then_hang_mid_frame, b, 2, full[:cut],
                          exitcode=None, close_after_start=[b]) as proc:
        assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"before-kill-0"
        assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"before-kill-1"
        assert a.poll(RECV_TIMEOUT)  # the partial frame has started to arrive
        _kill(proc)
        with pytest.raises(loopfast.ProtocolError):
            if how == "recv_bytes":
                a.recv_bytes(timeout=RECV_TIMEOUT)
            elif how == "recv_bytes_into":
                a.recv_bytes_into(bytearray(10_000), timeout=RECV_TIMEOUT)
            else:
                a.recv(timeout=RECV_TIMEOUT)
        assert a.closed


@pytest.mark.parametrize("size", [10, 70 * KiB, 2 * MiB])
def test_poll_in_a_child_sharing_the_socket_does_not_take_the_message(start_method, size):
    a, b = loopfast.Pipe()
    payload = make_payload(size)
    with a, b:
        with child_process(start_method, _poll_only, b):
            sender = Background(send_all_bytes, a, [payload, b"second"])
            # The child polls while the message is arriving; the parent does not read yet.
        assert b.recv_bytes(timeout=RECV_TIMEOUT) == payload
        assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"second"
        sender.result()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_interrupts_a_child_blocked_in_recv(start_method):
    a, b = loopfast.Pipe()
    with a, child_process(start_method, _recv_until_interrupted, b,
                          close_after_start=[b]) as proc:
        assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"ready"
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"interrupted"
        # the child's receive had a 60 s timeout: it did not wait that out
        assert time.monotonic() - started < 50
        a.send_bytes(b"still works", timeout=RECV_TIMEOUT)
        assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"still works"
