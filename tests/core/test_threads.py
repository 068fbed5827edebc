"""Threads sharing one channel, on both implementations (the compiled core and its pure twin).

Thread-safety contract, as these tests (and the code in _core/channel.pyx and
_core/channel_py.py) show it:

* Sends are safe from any number of threads at once. Each channel has one send lock, held for
  the whole of a frame (header and payload), so frames never interleave: every message arrives
  whole, and the messages of one thread arrive in the order that thread sent them. Messages of
  different threads are ordered by who took the lock first. send_bytes_many() is one atomic
  run: its messages arrive back to back, with no other thread's message among them.
* Receives are safe from any number of threads at once. Each channel has one receive lock, held
  for a whole message, so each receiver gets whole messages, and every message goes to exactly
  one receiver (recv_bytes_many() takes a run of consecutive messages).
* A send and a receive on the same channel run at the same time (separate locks: full duplex).
* close() may be called from any thread; a thread blocked in a receive or a send on the channel
  wakes up and raises OSError ("handle is closed ...").
* Every wait (for data, for room in the socket, for the other end in accept(), poll(),
  loopfast.wait(), and the busy-poll of `spin=`) releases the GIL: other Python threads run.
* Not per thread: batch() belongs to the channel. While one thread has a batch open, the small
  sends of every other thread on that channel join it too and go out when the batch is flushed
  (at 64 KiB or when the last open batch ends); order is still kept. Do not hold a batch open
  while another thread waits for the answer to its own message.
* A timeout bounds the whole call, the wait for another thread's receive (send) on the same
  channel included: that wait ends in TimeoutError ("timed out waiting for another thread's
  receive on this channel to finish") when the deadline passes. The one exception: leaving a
  batch() block waits for the send lock without limit (its timeout bounds the final write).
* fork(): the child gets a copy of the channel that shares the socket with the parent. Use a
  channel from one process only (or hand it over with multiprocessing, as Process arguments).
  A lock held by a parent thread at the moment of fork() stays held in the child forever: if
  another thread is inside a send or a receive on a channel when the process forks, the child
  must not send (receive) on its copy; without a timeout it would block for ever (with one, it
  raises TimeoutError).
"""

import pickle
import random
import struct
import threading
import zlib

import pytest
from conftest import (
    IMPLEMENTATIONS,
    JOIN_TIMEOUT,
    RECV_TIMEOUT,
    Background,
    connected_pair,
    make_payload,
    socket_buffer_bound,
)

import loopfast

KiB = 1024
MiB = 1024 * KiB

# A tagged message: b"T", thread id, sequence number, crc32 of the body; then the body.
TAG = struct.Struct("<cIII")
# Around the thresholds of both implementations: 8 KiB (one contiguous send), 64 KiB (a payload
# read straight into its object), the 256 KiB receive buffer; and a 2 MiB one.
SIZES = [0, 64, 8 * KiB, 8 * KiB + 1, 100 * KiB, 2 * MiB]
THREADS = 8


def tagged(tid, seq, size):
    """A message of `size` bytes (at least TAG.size) naming its thread and sequence number."""
    body = make_payload(max(0, size - TAG.size), seed=tid * 1000 + seq % 7)
    return TAG.pack(b"T", tid, seq, zlib.crc32(body)) + body


def untag(message):
    """(thread id, sequence number) of a tagged message, after checking its checksum."""
    marker, tid, seq, crc = TAG.unpack_from(message)
    assert marker == b"T", f"not a tagged message: {bytes(message[:32])!r}"
    assert zlib.crc32(message[TAG.size:]) == crc, f"corrupted message {tid}/{seq}"
    return tid, seq


def plan(tid, count):
    """The sizes thread `tid` sends: every size of SIZES, 2 MiB ones only twice."""
    rng = random.Random(tid)
    sizes = [SIZES[i % (len(SIZES) - 1)] for i in range(count - 2)] + [2 * MiB, 2 * MiB]
    rng.shuffle(sizes)
    return sizes


def as_message(tid, seq, size):
    """b"" for size 0 (it cannot carry a tag), else a tagged message of that size."""
    return b"" if size == 0 else tagged(tid, seq, max(size, TAG.size))


# ---- many senders, one receiver -----------------------------------------------------------------

def _sender(channel, tid, count):
    """Send `count` messages in one of four ways, chosen by the thread id."""
    sizes = plan(tid, count)
    messages = [as_message(tid, seq, size) for seq, size in enumerate(sizes)]
    mode = tid % 4
    if mode == 0:
        for message in messages:
            channel.send_bytes(message, timeout=RECV_TIMEOUT)
    elif mode == 1:
        # send(): in-band pickles of bytes, and bytearrays that travel out of band (>= 4 KiB).
        for seq, message in enumerate(messages):
            channel.send(bytearray(message) if seq % 2 else message, timeout=RECV_TIMEOUT)
    elif mode == 2:
        for start in range(0, count, 5):
            channel.send_bytes_many(messages[start:start + 5], timeout=RECV_TIMEOUT)
    else:
        for start in range(0, count, 5):
            with channel.batch(timeout=RECV_TIMEOUT):
                for message in messages[start:start + 5]:
                    channel.send_bytes(message, timeout=RECV_TIMEOUT)
    return messages


def _receive_any(channel):
    """One message of any kind as bytes: a raw one, an in-band pickle (unpickled here), or an
    object with out-of-band buffers (recv_bytes refuses it without consuming it: recv())."""
    try:
        data = channel.recv_bytes(timeout=RECV_TIMEOUT)
    except OSError as exc:
        if "out-of-band" not in str(exc):
            raise
        return bytes(channel.recv(timeout=RECV_TIMEOUT))
    if data[:1] == b"\x80":  # a pickle (tagged messages start with b"T")
        return bytes(pickle.loads(data))
    return data


def test_many_threads_sending_at_once_never_interleave_frames(make_pair):
    a, b = make_pair()
    count = 24
    start = threading.Barrier(THREADS)

    def send(tid):
        start.wait(JOIN_TIMEOUT)
        return _sender(a, tid, count)

    senders = [Background(send, tid) for tid in range(THREADS)]
    received = [_receive_any(b) for _ in range(THREADS * count)]
    sent = [s.result() for s in senders]

    expected_empty = sum(m == b"" for messages in sent for m in messages)
    assert sum(m == b"" for m in received) == expected_empty
    by_thread = {tid: [] for tid in range(THREADS)}
    for message in received:
        if message:
            tid, seq = untag(message)
            assert message == sent[tid][seq]
            by_thread[tid].append(seq)
    for tid, seqs in by_thread.items():
        assert seqs == [seq for seq, m in enumerate(sent[tid]) if m], f"thread {tid} order"
    assert not b.poll(0)  # nothing more than what was sent


# ---- many receivers -----------------------------------------------------------------------------

def _receiver(channel, mode):
    """Receive until EOF with one receive method; return the messages as bytes."""
    got = []
    buf = bytearray(3 * MiB)
    while True:
        try:
            if mode == "recv_bytes":
                got.append(pickle.loads(channel.recv_bytes(timeout=RECV_TIMEOUT)))
            elif mode == "recv":
                got.append(channel.recv(timeout=RECV_TIMEOUT))
            elif mode == "recv_bytes_into":
                n = channel.recv_bytes_into(buf, timeout=RECV_TIMEOUT)
                got.append(pickle.loads(buf[:n]))
            else:
                got.extend(pickle.loads(m) for m in channel.recv_bytes_many(timeout=RECV_TIMEOUT))
        except EOFError:
            return got


def test_many_threads_receiving_at_once_each_get_whole_messages(make_pair):
    a, b = make_pair()
    modes = ["recv_bytes", "recv", "recv_bytes_into", "recv_bytes_many"] * 2
    receivers = [Background(_receiver, b, mode) for mode in modes]
    sent = []
    for seq, size in enumerate(plan(0, 300)):
        # send() of bytes: an in-band pickle, which every receive method takes.
        message = tagged(seq % 5, seq, max(size, TAG.size))
        a.send(message, timeout=RECV_TIMEOUT)
        sent.append(message)
    a.close()  # every receiver ends with EOFError
    results = [r.result() for r in receivers]

    everything = [m for got in results for m in got]
    assert len(everything) == len(sent)
    assert sorted(untag(m)[1] for m in everything) == list(range(len(sent)))
    for message in everything:
        assert message == sent[untag(message)[1]]
    for got in results:  # one receiver's messages are in the order they were sent
        seqs = [untag(m)[1] for m in got]
        assert seqs == sorted(seqs)


# ---- the GIL is released while waiting --------------------------------------------------------

# A spin budget far longer than the watchdog below: if the busy-poll held the GIL, no other
# thread could run until the watchdog ends the wait (a spin of 1 s would end by itself and hide
# it; the budget is capped at 10^9 us).
BIG_SPIN = 1_000_000_000
WATCHDOG = 20.0  # the helper process ends the wait by itself after this long
SPIN_CASES = [pytest.param(name, 0, id=f"{name}-spin0") for name in sorted(IMPLEMENTATIONS)]
if "compiled" in IMPLEMENTATIONS:
    SPIN_CASES.append(pytest.param("compiled", BIG_SPIN, id="compiled-bigspin"))


def _context():
    import multiprocessing

    return multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _unblock(go, action, target):
    """In a helper process: once `go` is set (or after WATCHDOG s, so that a thread holding the
    GIL cannot hang the test), do what ends the wait."""
    go.wait(WATCHDOG)
    if action == "send":
        target.send_bytes(b"wake up", timeout=RECV_TIMEOUT)
    elif action == "drain":
        target.recv_bytes(timeout=RECV_TIMEOUT)
    else:
        loopfast.Client(target, timeout=RECV_TIMEOUT).close()


def _count(n):
    total = 0
    for i in range(n):
        total += i
    return total


def assert_progress_while_blocked(blocking_call, action, target):
    """Run blocking_call() in a thread; while it waits, another thread must run pure-Python code
    to the end; only then is the wait ended (by a helper process)."""
    ctx = _context()
    go = ctx.Event()
    helper = ctx.Process(target=_unblock, args=(go, action, target), daemon=True)
    helper.start()
    progressed = threading.Event()

    def blocked():
        result = blocking_call()
        return result, progressed.is_set()  # read at once, with the GIL held

    try:
        waiter = Background(blocked)
        threading.Event().wait(0.1)  # let it start waiting (else the test is only weaker)
        counter = Background(lambda: (_count(200_000), progressed.set()))
        counter.result()
        returned_early = waiter.done()
        go.set()
        result, progress_first = waiter.result()
        assert progress_first, ("no other thread ran while the call waited (the GIL was held: "
                                "the helper process's watchdog ended the wait)")
        assert not returned_early, "the blocking call returned before anything ended its wait"
    finally:
        go.set()
        helper.join(JOIN_TIMEOUT)
        if helper.is_alive():
            helper.kill()
            helper.join(10)
    assert helper.exitcode == 0
    return result


@pytest.mark.parametrize(("name", "spin"), SPIN_CASES)
def test_a_blocking_receive_releases_the_gil(name, spin):
    a, b = connected_pair(
        IMPLEMENTATIONS[name], IMPLEMENTATIONS[name], second_options={"spin": spin})
    with a, b:
        assert assert_progress_while_blocked(b.recv_bytes, "send", a) == b"wake up"


@pytest.mark.parametrize(("name", "spin"), SPIN_CASES)
def test_poll_none_releases_the_gil(name, spin):
    a, b = connected_pair(
        IMPLEMENTATIONS[name], IMPLEMENTATIONS[name], second_options={"spin": spin})
    with a, b:
        assert assert_progress_while_blocked(lambda: b.poll(None), "send", a) is True


@pytest.mark.parametrize(("name", "spin"), SPIN_CASES)
def test_loopfast_wait_releases_the_gil(name, spin):
    a, b = connected_pair(
        IMPLEMENTATIONS[name], IMPLEMENTATIONS[name], second_options={"spin": spin})
    with a, b:
        assert assert_progress_while_blocked(lambda: loopfast.wait([b]), "send", a) == [b]


@pytest.mark.parametrize(("name", "spin"), SPIN_CASES)
def test_a_send_blocked_on_a_full_socket_releases_the_gil(name, spin):
    a, b = connected_pair(
        IMPLEMENTATIONS[name], IMPLEMENTATIONS[name], first_options={"spin": spin})
    big = bytes(socket_buffer_bound())
    with a, b:
        assert assert_progress_while_blocked(lambda: a.send_bytes(big), "drain", b) is None


def test_listener_accept_releases_the_gil():
    with loopfast.Listener() as listener:
        channel = assert_progress_while_blocked(listener.accept, "connect", listener.address)
        with channel:
            assert not channel.closed


# ---- full duplex --------------------------------------------------------------------------------

def test_a_send_and_a_receive_on_one_channel_run_at_once(make_pair):
    """Both ends send more than the socket buffers hold while receiving in another thread: one
    lock for both directions would deadlock here."""
    a, b = make_pair()
    count, size = 6, 8 * MiB
    forth = [make_payload(size, seed=i) for i in range(count)]
    back = [make_payload(size, seed=100 + i) for i in range(count)]

    def send_all(channel, messages):
        for message in messages:
            channel.send_bytes(message, timeout=RECV_TIMEOUT)

    def recv_all(channel):
        return [channel.recv_bytes(timeout=RECV_TIMEOUT) for _ in range(count)]

    jobs = [Background(send_all, a, forth), Background(send_all, b, back),
            Background(recv_all, b), Background(recv_all, a)]
    results = [job.result() for job in jobs]
    assert results[2] == forth
    assert results[3] == back


# ---- close from another thread ------------------------------------------------------------------

def test_close_from_another_thread_wakes_a_blocked_send(make_pair):
    a, _ = make_pair()
    big = bytes(socket_buffer_bound())
    sender = Background(a.send_bytes, big, timeout=RECV_TIMEOUT)
    threading.Event().wait(0.2)  # let it block (if not yet, it gets "handle is closed" anyway)
    a.close()
    with pytest.raises(OSError, match="^handle is closed") as info:
        sender.result()
    assert not isinstance(info.value, TimeoutError)


# ---- a timeout and another thread's call (known limitation) -------------------------------------

def _assert_timeout_not_held_up(channel, own_call, other_call, release):
    """While another thread is inside `other_call` (no timeout), own_call (timeout=0.2 s) must
    raise TimeoutError by itself, before a watchdog timer releases the other thread."""
    fired = threading.Event()

    def watchdog():
        fired.set()
        release()

    other = Background(other_call)
    threading.Event().wait(0.2)  # let it take the lock
    timer = threading.Timer(2.0, watchdog)
    timer.start()
    try:
        with pytest.raises(TimeoutError, match="^timed out waiting for another thread's "):
            own_call()
        assert not fired.is_set(), "the timeout waited for the other thread's call"
    finally:
        timer.cancel()
        timer.join(JOIN_TIMEOUT)
        if not fired.is_set():
            watchdog()
        other.result()


def test_a_receive_timeout_also_bounds_the_wait_for_another_receiving_thread(make_pair):
    a, b = make_pair()
    _assert_timeout_not_held_up(
        b, lambda: b.recv_bytes(timeout=0.2), b.recv_bytes, lambda: a.send_bytes(b"x"))


def test_a_send_timeout_also_bounds_the_wait_for_another_sending_thread(make_pair):
    a, b = make_pair()
    big = bytes(socket_buffer_bound())
    drainer = []

    def drain():
        drainer.append(Background(b.recv_bytes, timeout=RECV_TIMEOUT))

    try:
        _assert_timeout_not_held_up(a, lambda: a.send_bytes(b"x", timeout=0.2),
                                    lambda: a.send_bytes(big), drain)
    finally:
        if drainer:
            assert drainer[0].result() == big
