"""Fault injection (issue 6): peers killed before, inside and after a frame; peers that close with
our data unread or stop reading; tiny writes and oversized headers; close() from another thread;
fork() while a channel is in use; EINTR at every blocking point and Ctrl-C from a signal handler;
garbage after a valid handshake.

Every case checks the exact exception *and* that every message delivered before the fault is
still received whole. Core behaviour runs on both implementations (the `impl` / `make_pair`
fixtures); the peer that misbehaves is a channel's `_send_raw` (raw bytes, TCP_NODELAY: one
segment per call), a raw socket (`raw_peer`) or a real child process.

fork() (the contract is in tests/core/test_threads.py): the child's copy of a channel shares the
socket; a lock a parent thread held at the fork stays held in the child, so a receive there
ends in TimeoutError (its timeout bounds the wait for the lock). A child that closes its copy of
a channel on which a parent thread was blocked closes only its own descriptor (the core forgets
the parent's blocked threads after fork; this was a bug, found here).
Not tested: close() from another thread does not wake loopfast.wait() (it waits on the fd,
which the channel does not know about; multiprocessing.connection.wait behaves the same).
"""

import contextlib
import gc
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
import tracemalloc
import weakref

import pytest
from conftest import (
    FRAME_HEADER,
    KIND_BYTES,
    KIND_PICKLE,
    RECV_TIMEOUT,
    Background,
    child_process,
    frame,
    make_payload,
)

import loopfast
from loopfast._wire import DEFAULT_MAX_MESSAGE_SIZE

KiB = 1024
MiB = 1024 * KiB

KIND_OBJECT = 3
# More than the kernel buffers of one loopback connection hold (tcp_wmem + tcp_rmem maxima are
# 4 + 32 MiB here): a send of this much to a peer that does not read must block part-way.
BIG = 64 * MiB
# A timeout meant to expire (the data it waits for is not coming).
EXPIRES = 0.2
# How long a call whose timeout is EXPIRES may take before it counts as hung (10x: only a call
# that ignores its timeout takes this long; no outcome depends on the machine's speed).
HUNG = 2.0

posix_signals = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="needs the fork start method")
# Tests that use SIGALRM themselves: pytest-timeout's default (signal) method uses SIGALRM and
# setitimer too, so these are bounded by its thread method instead.
own_sigalrm = pytest.mark.timeout(120, method="thread")

SPINS = pytest.mark.parametrize("spin", [0, None], ids=["spin=0", "spin=default"])


def _spun(make_pair, spin):
    options = {"spin": spin}
    return make_pair(options, options)


def _later(fn, *args, delay=EXPIRES, **kwargs):
    """Run fn(*args, **kwargs) in a background thread after `delay` seconds."""
    def run():
        threading.Event().wait(delay)
        return fn(*args, **kwargs)
    return Background(run)


# ==== 1. a peer SIGKILLed before, inside and after a frame ========================================

def _send_then_die(channel, messages, partial):
    """In the child: send whole messages, then the start of a frame (if any), then SIGKILL
    ourselves: no close(), no flush, no exit handler."""
    for message in messages:
        channel.send_bytes(message, timeout=RECV_TIMEOUT)
    if partial:
        channel._send_raw(partial, timeout=RECV_TIMEOUT)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(RECV_TIMEOUT)  # not reached


EARLIER = [b"first", make_payload(70 * KiB, seed=7)]
_CUT_FRAME = frame(make_payload(200 * KiB, seed=8))  # 200 KiB: read straight into its object
KILLS = {
    # name: (messages sent before the kill, the partial frame, what the receiver gets after them)
    "before-any-frame": ([], b"", EOFError),
    "after-a-frame": (EARLIER, b"", EOFError),
    "mid-header": (EARLIER, _CUT_FRAME[:7], loopfast.ProtocolError),
    "header-only": (EARLIER, _CUT_FRAME[:16], loopfast.ProtocolError),
    "mid-payload": (EARLIER, _CUT_FRAME[:16 + 100 * KiB], loopfast.ProtocolError),
}


@posix_signals
@pytest.mark.parametrize("when", list(KILLS))
def test_a_peer_sigkilled_gives_the_earlier_messages_then_the_right_error(
        make_pair, start_method, when):
    messages, partial, error = KILLS[when]
    a, b = make_pair()
    with child_process(start_method, _send_then_die, b, messages, partial,
                       exitcode=-signal.SIGKILL, close_after_start=[b]):
        for expected in messages:
            assert a.recv_bytes(timeout=RECV_TIMEOUT) == expected
        with pytest.raises(error):
            a.recv_bytes(timeout=RECV_TIMEOUT)
    if error is EOFError:  # between messages: the channel stays open, and stays at the end
        assert not a.closed
        with pytest.raises(EOFError):
            a.recv_bytes(timeout=RECV_TIMEOUT)
    else:  # in the middle of one: the stream cannot be trusted, the channel is closed
        assert a.closed
        with pytest.raises(OSError, match="^handle is closed$"):
            a.recv_bytes(timeout=RECV_TIMEOUT)


# ==== 2. a peer that closes with our data unread ==================================================

def _peer_closes_with_our_data_unread(a, b):
    """b sends two messages, a sends one that b never reads, b closes: with unread data, the
    kernel resets the connection instead of closing it cleanly."""
    b.send_bytes(EARLIER[0], timeout=RECV_TIMEOUT)
    b.send_bytes(EARLIER[1], timeout=RECV_TIMEOUT)
    a.send_bytes(b"never read" * 100, timeout=RECV_TIMEOUT)
    assert b.poll(RECV_TIMEOUT)  # it reached b (poll() consumes nothing)
    b.close()


def _send_until_it_fails(channel):
    """Send until the reset surfaces (the first send after it; a few more if it is still on its
    way); return the exception."""
    for _ in range(100_000):
        try:
            channel.send_bytes(b"x" * 1000, timeout=RECV_TIMEOUT)
        except OSError as exc:
            return exc
    raise AssertionError("sending to a peer that closed never failed")


def test_a_peer_closing_with_our_data_unread_fails_our_next_send_and_keeps_its_messages(
        make_pair):
    a, b = make_pair()
    _peer_closes_with_our_data_unread(a, b)
    error = Background(_send_until_it_fails, a).result()
    assert isinstance(error, (BrokenPipeError, ConnectionResetError)), repr(error)
    for expected in EARLIER:
        assert a.recv_bytes(timeout=RECV_TIMEOUT) == expected
    with pytest.raises(EOFError):  # the send reported the reset; what remains is the end
        a.recv_bytes(timeout=RECV_TIMEOUT)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's reset semantics")
def test_a_peer_closing_with_our_data_unread_is_a_reset_after_its_messages(make_pair):
    """Without a send to report it, the reset comes out of the receive, after every message
    that arrived before it (as multiprocessing: ConnectionResetError, not a clean EOF)."""
    a, b = make_pair()
    _peer_closes_with_our_data_unread(a, b)
    for expected in EARLIER:
        assert a.recv_bytes(timeout=RECV_TIMEOUT) == expected
    with pytest.raises(ConnectionResetError):
        a.recv_bytes(timeout=RECV_TIMEOUT)
    assert not a.closed  # between messages: nothing was cut
    with pytest.raises(EOFError):
        a.recv_bytes(timeout=RECV_TIMEOUT)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's reset semantics")
@SPINS
@pytest.mark.parametrize("wait", ["recv_bytes", "poll"])
def test_a_reset_met_while_awaiting_a_reply_is_raised_not_an_end(make_pair, spin, wait):
    """A channel that sent since its last receive awaits a reply: it busy-polls first, peeking
    (spin=default). The kernel reports a reset once, so the peek that meets it must raise it (as
    the read does without spinning): swallowed, the receive after it saw a clean end instead."""
    a, b = _spun(make_pair, spin)
    a.send_bytes(b"never read" * 100, timeout=RECV_TIMEOUT)
    assert b.poll(RECV_TIMEOUT)
    b.close()  # with a's message unread: a reset
    readable, _, _ = select.select([a.fileno()], [], [], RECV_TIMEOUT)  # it has arrived
    assert readable
    with pytest.raises(ConnectionResetError):
        if wait == "poll":
            a.poll(RECV_TIMEOUT)
        a.recv_bytes(timeout=RECV_TIMEOUT)
    with pytest.raises(EOFError):
        a.recv_bytes(timeout=RECV_TIMEOUT)


def test_a_send_blocked_on_a_peer_that_closes_without_reading_raises(make_pair):
    a, b = make_pair()
    sender = Background(a.send_bytes, bytes(BIG))  # no timeout: blocks, b does not read
    assert b.poll(RECV_TIMEOUT)  # the big frame is arriving: unread data at b
    b.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        sender.result()



class _Payload(bytearray):
    """A buffer a weak reference can watch."""

    __slots__ = ("__weakref__",)


def _reset(channel):
    """Close `channel` with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    with socket.socket(fileno=os.dup(channel.fileno())) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    channel.close()


def _fail_sending(a, b, payload, how):
    a.send_bytes(b"never read" * 100, timeout=RECV_TIMEOUT)
    assert b.poll(RECV_TIMEOUT)
    b.close()  # with a's message unread: a reset
    for _ in range(1000):
        if how == "send":
            a.send(pickle.PickleBuffer(memoryview(payload)), timeout=RECV_TIMEOUT)
        else:
            a.send_bytes(memoryview(payload), timeout=RECV_TIMEOUT)


def _fail_receiving(a, b, payload, how):
    if how == "recv_bytes_into":  # cut in the middle of a message: the rest will never come
        b._send_raw(FRAME_HEADER.pack(KIND_BYTES, 0, 0, 0, len(payload)) + bytes(1000),
                    timeout=RECV_TIMEOUT)
    else:
        a.send_bytes(b"never read" * 100, timeout=RECV_TIMEOUT)
        assert b.poll(RECV_TIMEOUT)  # closed with a's message unread: a reset
    _reset(b)
    readable, _, _ = select.select([a.fileno()], [], [], RECV_TIMEOUT)
    assert readable
    if how == "recv_bytes_into":
        a.recv_bytes_into(payload, timeout=RECV_TIMEOUT)
    else:
        a.recv_bytes(timeout=RECV_TIMEOUT)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's reset semantics")
@pytest.mark.parametrize("fail, how", [(_fail_sending, "send"), (_fail_sending, "send_bytes"),
                                       (_fail_receiving, "recv_bytes_into"),
                                       (_fail_receiving, "recv_bytes")],
                         ids=["send(PickleBuffer)", "send_bytes", "recv_bytes_into",
                              "recv_bytes"])
def test_a_failed_send_or_receive_leaves_no_cycle_holding_the_callers_buffer(make_pair, fail,
                                                                             how):
    """The error a socket call raises must not be kept in a local of a frame on its own
    traceback: that cycle holds the caller's buffer (often MiBs) until a collection, and on
    CPython before 3.12.7 the collector could crash clearing it when the buffer was a
    memoryview a PickleBuffer exported (gh-77894; the twin's soak with --inject kill died of
    SIGSEGV so). With the collector off, the buffer is freed when the caller lets go of it."""
    a, b = make_pair()
    payload = _Payload(MiB)
    watch = weakref.ref(payload)
    gc.collect()
    gc.disable()
    try:
        try:
            fail(a, b, payload, how)
        except (OSError, EOFError) as exc:
            raised = exc.__class__.__name__
        else:
            raised = None
        del payload
        freed = watch() is None
        cyclic = gc.collect()
    finally:
        gc.enable()
    assert raised is not None, "the operation did not fail"
    assert freed, f"after {raised}, a cycle still holds the buffer"
    assert cyclic == 0, f"after {raised}, {cyclic} objects in reference cycles"

# ==== 3. tiny writes and oversized headers ========================================================

def _object_frame(obj):
    """An object message (kind 3) as docs/protocol.md spells it, and the object it decodes to."""
    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    parts = [data] + [bytes(buffer.raw()) for buffer in buffers]
    table = struct.pack(f"<{len(parts)}Q", *(len(part) for part in parts))
    length = len(table) + sum(len(part) for part in parts)
    return FRAME_HEADER.pack(KIND_OBJECT, 0, 0, len(buffers), length) + table + b"".join(parts)


_OOB_OBJECT = {"buffer": pickle.PickleBuffer(bytearray(make_payload(8 * KiB, seed=2))), "n": 1}
SPLIT_FRAMES = {
    # name: (the frame, how many leading bytes to deliver one at a time, the receive, expected)
    "bytes-small": (frame(b"small message"), 16 + 5, "recv_bytes", b"small message"),
    "bytes-large": (frame(make_payload(100 * KiB, seed=3)), 16 + 3, "recv_bytes",
                    make_payload(100 * KiB, seed=3)),
    "bytes-into": (frame(b"into a buffer"), 16, "recv_bytes_into", b"into a buffer"),
    "pickle": (frame(pickle.dumps(("t", 1)), KIND_PICKLE), 16 + 2, "recv", ("t", 1)),
    "object-size-table": (_object_frame(_OOB_OBJECT), 16 + 16 + 3, "recv",
                          {"buffer": bytearray(make_payload(8 * KiB, seed=2)), "n": 1}),
}


def _receive(channel, how, timeout):
    if how == "recv_bytes":
        return channel.recv_bytes(timeout=timeout)
    if how == "recv_bytes_into":
        buf = bytearray(1 * MiB)
        return bytes(buf[:channel.recv_bytes_into(buf, timeout=timeout)])
    return channel.recv(timeout=timeout)


@pytest.mark.parametrize("case", list(SPLIT_FRAMES))
def test_a_header_arriving_one_byte_at_a_time_decodes_to_the_message(make_pair, case):
    """Each byte of the header (and of an object's size table) is its own segment, with a
    receive that times out on the partial frame in between: the buffered bytes are kept."""
    wire, trickled, how, expected = SPLIT_FRAMES[case]
    a, b = make_pair()
    a.send_bytes(b"before", timeout=RECV_TIMEOUT)
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"before"
    for i in range(trickled):
        a._send_raw(wire[i:i + 1], timeout=RECV_TIMEOUT)
        with pytest.raises(TimeoutError):
            _receive(b, how, timeout=0.005)
    a._send_raw(wire[trickled:] + frame(b"after"), timeout=RECV_TIMEOUT)
    assert _receive(b, how, timeout=RECV_TIMEOUT) == expected
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"after"


@pytest.mark.parametrize("kind", [KIND_BYTES, KIND_PICKLE], ids=["bytes", "pickle"])
@pytest.mark.parametrize("limit", [256 * MiB, DEFAULT_MAX_MESSAGE_SIZE], ids=["256MiB", "default"])
def test_a_declared_length_over_the_limit_is_refused_before_any_allocation(make_pair, kind, limit):
    """Only the header is sent, after a whole message: the error comes from the header, the
    earlier message is delivered, and (nearly) nothing is allocated for the announced size."""
    a, b = make_pair(None, None if limit == DEFAULT_MAX_MESSAGE_SIZE else
                     {"max_message_size": limit})
    a.send_bytes(b"before", timeout=RECV_TIMEOUT)
    a._send_raw(FRAME_HEADER.pack(kind, 0, 0, 0, limit + 1), timeout=RECV_TIMEOUT)
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"before"
    assert b.poll(RECV_TIMEOUT)
    tracemalloc.start()
    try:
        receive = b.recv if kind == KIND_PICKLE else b.recv_bytes
        with pytest.raises(loopfast.ProtocolError) as info:
            receive(timeout=RECV_TIMEOUT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value) == (f"the peer announced a {limit + 1}-byte message, over this "
                               f"channel's max_message_size of {limit} bytes")
    assert b.closed
    assert peak < 1 * MiB


# ==== 4. a peer that stops reading ================================================================

def test_a_timed_out_send_then_close_is_prompt_and_the_peer_gets_a_cut_message(make_pair):
    """The peer gets every message before the timed-out one, then ProtocolError: the timed-out
    message went out in part, and close() discards the rest (it never waits to send it)."""
    a, b = make_pair()
    a.send_bytes(b"before", timeout=RECV_TIMEOUT)
    with pytest.raises(TimeoutError, match="^timed out after sending"):
        a.send_bytes(bytes(BIG), timeout=EXPIRES)
    Background(a.close).result(RECV_TIMEOUT)
    assert a.closed
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"before"
    with pytest.raises(loopfast.ProtocolError,
                       match="^the peer closed the connection in the middle of a message$"):
        b.recv_bytes(timeout=RECV_TIMEOUT)
    assert b.closed


@SPINS
def test_a_send_blocked_on_a_full_socket_is_woken_by_close_from_another_thread(make_pair, spin):
    a, b = _spun(make_pair, spin)
    sender = Background(a.send_bytes, bytes(BIG))  # no timeout
    assert b.poll(RECV_TIMEOUT)  # it is sending; b never reads, so it blocks
    threading.Event().wait(EXPIRES)  # let it reach the wait (if not, it finds the fd closed)
    a.close()
    with pytest.raises(OSError, match="^handle is closed") as info:
        sender.result(RECV_TIMEOUT)
    assert not isinstance(info.value, TimeoutError)


# ==== 5. close() from another thread during a blocking receive ====================================

def _receive_for_close(channel, how):
    if how == "poll(None)":
        return channel.poll(None)
    return _receive(channel, how.split("-")[0], timeout=None)


@SPINS
@pytest.mark.parametrize("how", ["recv_bytes", "recv_bytes_into", "recv", "poll(None)",
                                 "recv_bytes-mid-message", "recv_bytes_into-mid-message"])
def test_close_from_another_thread_wakes_a_receive_without_timeout(make_pair, spin, how):
    a, b = _spun(make_pair, spin)
    a.send_bytes(b"delivered", timeout=RECV_TIMEOUT)
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"delivered"
    part = frame(make_payload(512 * KiB))[:200 * KiB] if how.endswith("mid-message") else b""
    sender = Background(a._send_raw, part, timeout=RECV_TIMEOUT)  # a frame cut in two
    receiver = Background(_receive_for_close, b, how)
    sender.result()  # the receive took in what was sent: it waits inside the message
    threading.Event().wait(EXPIRES)  # let it block (if not yet, it gets "handle is closed")
    b.close()
    with pytest.raises(OSError, match="^handle is closed") as info:
        receiver.result(RECV_TIMEOUT)
    assert not isinstance(info.value, (TimeoutError, loopfast.ProtocolError, EOFError))
    assert b.closed


# ==== 6. fork() while a channel is in use =========================================================

def _fork_child_uses_its_copies(a_end, b_end):
    """In the child: B works both ways; A (whose receive lock a parent thread held at the fork)
    can still send and poll."""
    b_end.send_bytes(b"child via B", timeout=RECV_TIMEOUT)
    assert b_end.recv_bytes(timeout=RECV_TIMEOUT) == b"parent via B"
    a_end.send_bytes(b"child via A", timeout=RECV_TIMEOUT)
    assert a_end.poll() is False


def _fork_child_receives_on_a(a_end):
    """In the child: the receive lock of A was held by a parent thread at the fork, and stays
    held here (that thread does not exist in the child); the timeout bounds the wait for it."""
    try:
        a_end.recv_bytes(timeout=EXPIRES)
    except TimeoutError as exc:
        assert str(exc).startswith("timed out waiting for another thread's receive"), str(exc)
        return
    raise AssertionError("a message arrived on A in the child")


def _fork_child_closes_a(a_end):
    a_end.close()


def _blocked_receiver(make_pair):
    """Two pairs; a thread of this process blocked in a receive on A's second end."""
    a1, a2 = make_pair()
    b1, b2 = make_pair()
    receiver = Background(a2.recv_bytes, timeout=RECV_TIMEOUT)
    threading.Event().wait(EXPIRES)  # let it take the receive lock and block
    assert not receiver.done()
    return a1, a2, b1, b2, receiver


def _bounded_join(proc, timeout=HUNG + 1):
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
        raise AssertionError(f"the fork child hung (still running after {timeout} s)")


@needs_fork
def test_a_fork_child_uses_its_channels_while_a_parent_thread_is_blocked_in_recv(make_pair):
    a1, a2, b1, b2, receiver = _blocked_receiver(make_pair)
    with child_process("fork", _fork_child_uses_its_copies, a2, b2) as proc:
        assert b1.recv_bytes(timeout=RECV_TIMEOUT) == b"child via B"
        b1.send_bytes(b"parent via B", timeout=RECV_TIMEOUT)
        assert a1.recv_bytes(timeout=RECV_TIMEOUT) == b"child via A"
        _bounded_join(proc)
    a1.send_bytes(b"for the parent thread", timeout=RECV_TIMEOUT)
    assert receiver.result() == b"for the parent thread"


@needs_fork
def test_a_fork_child_receiving_on_a_channel_a_parent_thread_was_receiving_on_times_out(
        make_pair):
    a1, a2, _, _, receiver = _blocked_receiver(make_pair)
    with child_process("fork", _fork_child_receives_on_a, a2) as proc:
        _bounded_join(proc)
    a1.send_bytes(b"for the parent thread", timeout=RECV_TIMEOUT)
    assert receiver.result() == b"for the parent thread"


@needs_fork
def test_a_fork_child_closing_its_copy_leaves_the_parents_channel_working(make_pair):
    a1, a2, _, _, receiver = _blocked_receiver(make_pair)
    with child_process("fork", _fork_child_closes_a, a2) as proc:
        _bounded_join(proc)
    a1.send_bytes(b"for the parent thread", timeout=RECV_TIMEOUT)
    assert receiver.result() == b"for the parent thread"
    a2.send_bytes(b"and back", timeout=RECV_TIMEOUT)
    assert a1.recv_bytes(timeout=RECV_TIMEOUT) == b"and back"


# ==== 7. EINTR at every blocking point, and Ctrl-C ================================================

@contextlib.contextmanager
def sigalrm_every(interval, handler=None, *, repeat=True):
    """Deliver SIGALRM every `interval` seconds (once, with repeat=False) while the block runs;
    each one interrupts the system call the main thread is blocked in (EINTR). Yields a list
    whose length counts them. `handler` (optional) runs on each signal. The previous handler is
    restored."""
    delivered = []
    stopped = []

    def on_alarm(signum, frame):
        if stopped:
            return  # a signal still on its way when the block ended
        delivered.append(signum)
        if handler is not None:
            handler()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, interval, interval if repeat else 0)
        yield delivered
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        stopped.append(True)
        # Let a signal sent just before the timer stopped reach this handler, not the previous
        # one (Python reports one that finds SIG_DFL as "ignored due to race condition"; the
        # default action of a late one would end the test run).
        for _ in range(100):
            if signal.SIGALRM not in signal.sigpending():
                break
            time.sleep(0.001)
        time.sleep(0.01)
        signal.signal(signal.SIGALRM, previous)


_BIG16 = 16 * MiB


def _eintr_recv(a, b, timeout=RECV_TIMEOUT):
    peer = _later(a.send_bytes, b"hello", timeout=RECV_TIMEOUT)
    assert b.recv_bytes(timeout=timeout) == b"hello"
    return peer


def _eintr_recv_into(a, b):
    peer = _later(a.send_bytes, b"into", timeout=RECV_TIMEOUT)
    buf = bytearray(100)
    assert b.recv_bytes_into(buf, 10, timeout=RECV_TIMEOUT) == 4
    assert buf[10:14] == b"into"
    return peer


def _eintr_recv_object(a, b):
    peer = _later(a.send, {"x": [1, 2]}, timeout=RECV_TIMEOUT)
    assert b.recv(timeout=RECV_TIMEOUT) == {"x": [1, 2]}
    return peer


def _eintr_recv_16_mib(a, b):
    data = make_payload(_BIG16, seed=5)
    peer = _later(a.send_bytes, data, timeout=RECV_TIMEOUT)
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == data
    return peer


def _eintr_send_16_mib(a, b, timeout=RECV_TIMEOUT):
    data = make_payload(_BIG16, seed=6)
    reader = _later(b.recv_bytes, timeout=RECV_TIMEOUT)  # a slow reader: starts late
    a.send_bytes(data, timeout=timeout)
    assert reader.result() == data
    return None


def _eintr_recv_bytes_many(a, b):
    peer = _later(a.send_bytes_many, [b"one", b"two"], timeout=RECV_TIMEOUT)
    got = b.recv_bytes_many(timeout=RECV_TIMEOUT)
    while len(got) < 2:
        got += b.recv_bytes_many(timeout=RECV_TIMEOUT)
    assert got == [b"one", b"two"]
    return peer


def _eintr_send_bytes_many(a, b):
    data = [make_payload(8 * MiB, seed=12), b"small", make_payload(8 * MiB, seed=13)]
    reader = _later(lambda: [b.recv_bytes(timeout=RECV_TIMEOUT) for _ in data])
    a.send_bytes_many(data, timeout=RECV_TIMEOUT)
    assert reader.result() == data
    return None


def _eintr_recv_timeout_expires(a, b):
    with pytest.raises(TimeoutError):
        b.recv_bytes(timeout=EXPIRES)


def _eintr_poll(a, b):
    peer = _later(a.send_bytes, b"p", timeout=RECV_TIMEOUT)
    assert b.poll(RECV_TIMEOUT) is True
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"p"
    return peer


def _eintr_poll_expires(a, b):
    assert b.poll(EXPIRES) is False


def _eintr_wait(a, b):
    peer = _later(a.send_bytes, b"w", timeout=RECV_TIMEOUT)
    assert loopfast.wait([b], timeout=RECV_TIMEOUT) == [b]
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"w"
    return peer


def _eintr_wait_expires(a, b):
    assert loopfast.wait([b], timeout=EXPIRES) == []


EINTR_CASES = {
    "recv_bytes": _eintr_recv,
    "recv_bytes-no-timeout": lambda a, b: _eintr_recv(a, b, timeout=None),
    "recv_bytes_into": _eintr_recv_into,
    "recv": _eintr_recv_object,
    "recv_bytes-16MiB": _eintr_recv_16_mib,
    "send_bytes-16MiB-slow-reader": _eintr_send_16_mib,
    "send_bytes-16MiB-no-timeout": lambda a, b: _eintr_send_16_mib(a, b, timeout=None),
    "recv_bytes_many": _eintr_recv_bytes_many,
    "send_bytes_many-16MiB-slow-reader": _eintr_send_bytes_many,
    "recv_bytes-timeout-expires": _eintr_recv_timeout_expires,
    "poll": _eintr_poll,
    "poll-expires": _eintr_poll_expires,
    "wait": _eintr_wait,
    "wait-expires": _eintr_wait_expires,
}


@posix_signals
@own_sigalrm
@SPINS
@pytest.mark.parametrize("case", list(EINTR_CASES))
def test_eintr_at_a_blocking_point_is_retried_transparently(make_pair, spin, case):
    """A signal every millisecond (its handler does nothing) while the call blocks: the call
    completes as if no signal came, and the stream stays whole."""
    a, b = _spun(make_pair, spin)
    with sigalrm_every(0.001) as delivered:
        peer = EINTR_CASES[case](a, b)
    if peer is not None:
        peer.result()
    assert delivered, "no signal was delivered during the call"
    a.send_bytes(b"after", timeout=RECV_TIMEOUT)
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"after"


@posix_signals
@own_sigalrm
@pytest.mark.parametrize("authkey", [None, b"secret"], ids=["no-authkey", "authkey"])
def test_eintr_during_accept_and_its_handshake_is_retried(authkey):
    with loopfast.Listener(authkey=authkey) as listener:
        client = _later(loopfast.Client, listener.address, authkey=authkey, timeout=RECV_TIMEOUT)
        with sigalrm_every(0.001) as delivered:
            accepted = listener.accept()
        with accepted, client.result() as connected:
            assert delivered
            connected.send_bytes(b"to the listener", timeout=RECV_TIMEOUT)
            assert accepted.recv_bytes(timeout=RECV_TIMEOUT) == b"to the listener"


@posix_signals
@own_sigalrm
@pytest.mark.parametrize("authkey", [None, b"secret"], ids=["no-authkey", "authkey"])
def test_eintr_during_the_client_handshake_is_retried(authkey):
    """The connection is made at once (the backlog), but the listener's hello comes only when
    accept() runs, later: the client waits for it under the signals, in Client() with an
    authkey, at the channel's first use without one (Client then returns once connected)."""
    with loopfast.Listener(authkey=authkey) as listener:

        def accept_and_send():
            accepted = listener.accept()
            accepted.send_bytes(b"to the client", timeout=RECV_TIMEOUT)
            return accepted

        accepter = _later(accept_and_send)
        with sigalrm_every(0.001) as delivered:
            connected = loopfast.Client(listener.address, authkey=authkey, timeout=RECV_TIMEOUT)
            try:
                received = connected.recv_bytes(timeout=RECV_TIMEOUT)
            except BaseException:
                connected.close()
                raise
        with connected, accepter.result() as accepted:
            assert delivered
            assert received == b"to the client"
            connected.send_bytes(b"to the listener", timeout=RECV_TIMEOUT)
            assert accepted.recv_bytes(timeout=RECV_TIMEOUT) == b"to the listener"


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


@posix_signals
@own_sigalrm
@SPINS
@pytest.mark.parametrize("where", ["waiting", "mid-message"])
def test_a_keyboardinterrupt_from_a_signal_handler_interrupts_a_receive_and_keeps_the_stream(
        make_pair, spin, where):
    a, b = _spun(make_pair, spin)
    payload = make_payload(1 * MiB, seed=9)
    wire = frame(payload)
    cut = 300 * KiB if where == "mid-message" else 0
    first = Background(a._send_raw, wire[:cut], timeout=RECV_TIMEOUT)
    with pytest.raises(KeyboardInterrupt), sigalrm_every(
            EXPIRES, _raise_keyboard_interrupt, repeat=False):
        b.recv_bytes()  # no timeout: only the signal ends it
    first.result()
    rest = Background(a._send_raw, wire[cut:] + frame(b"next"), timeout=RECV_TIMEOUT)
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == payload
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"next"
    rest.result()


# ==== 8. garbage after a valid handshake ==========================================================

CLOSED_CALLS = {
    "recv_bytes": lambda ch: ch.recv_bytes(timeout=1),
    "recv": lambda ch: ch.recv(timeout=1),
    "recv_bytes_into": lambda ch: ch.recv_bytes_into(bytearray(10), timeout=1),
    "send_bytes": lambda ch: ch.send_bytes(b"x", timeout=1),
    "send": lambda ch: ch.send(1, timeout=1),
    "poll": lambda ch: ch.poll(),
    "fileno": lambda ch: ch.fileno(),
}


def _assert_closed_for_good(channel):
    assert channel.closed
    for call in CLOSED_CALLS.values():
        with pytest.raises(OSError, match="^handle is closed$"):
            call(channel)


# Random bytes whose first frame header is certainly malformed (kind 0xee).
GARBAGE = b"\xee" + make_payload(4 * KiB, seed=11)


def test_garbage_after_a_valid_handshake_is_a_protocol_error_that_closes_the_channel(make_pair):
    a, b = make_pair()
    for message in EARLIER:
        a.send_bytes(message, timeout=RECV_TIMEOUT)
    a._send_raw(GARBAGE, timeout=RECV_TIMEOUT)
    for expected in EARLIER:
        assert b.recv_bytes(timeout=RECV_TIMEOUT) == expected
    with pytest.raises(loopfast.ProtocolError, match="^malformed frame header ee"):
        b.recv_bytes(timeout=RECV_TIMEOUT)
    _assert_closed_for_good(b)


def test_garbage_from_a_raw_socket_peer_is_a_protocol_error_that_closes_the_channel(raw_peer):
    channel, raw = raw_peer
    raw.sendall(frame(b"whole") + GARBAGE)
    assert channel.recv_bytes(timeout=RECV_TIMEOUT) == b"whole"
    with pytest.raises(loopfast.ProtocolError, match="^malformed frame header ee"):
        channel.recv(timeout=RECV_TIMEOUT)
    _assert_closed_for_good(channel)
