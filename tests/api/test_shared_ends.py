"""Several processes (and threads) on one end of a channel (issue 11: "a receive takes from the
socket only what it returns").

The pattern of multiprocessing's own queues and pools: three reader processes share the read end
of `Pipe(duplex=False)` and take one message at a time under a multiprocessing Lock, three writer
processes share the write end under another. Since a receive takes from the kernel only the bytes
of the message it returns, whichever reader takes the lock next finds the next message whole in
the kernel: every message arrives exactly once, intact, and each reader sees each writer's
messages in the order they were sent. A receive that read ahead (kept bytes of later messages in
its own process) would hide them from the other readers and leave them mid-frame.

Each message carries (writer id, sequence number, crc32 of its body); its size is drawn from 0 B
to 4 MiB (mostly small, some of 64 KiB and more, a few of 1-4 MiB). After the writers are done the
parent sends one stop message per reader; each reader sends what it got back on a
multiprocessing Queue (not on a loopfast channel: the channel is what is under test) and the
parent checks it all. Child targets are module-level functions so that spawn can import them.

Also here: the same with threads sharing one Channel object (the channel's own receive lock
serializes them; with a user lock on top too), and poll() / loopfast.wait() on an end whose next
message another process has taken.
"""

import collections
import contextlib
import multiprocessing
import pickle
import queue
import random
import struct
import threading
import time
import zlib

import pytest
from conftest import JOIN_TIMEOUT, Background

import loopfast

KiB = 1024
MiB = 1024 * KiB

READERS = 3
WRITERS = 3
# A tagged message: writer id, sequence number, crc32 of the body; then the body.
TAG = struct.Struct("<III")
STOP = b"STOP"  # shorter than a tag: never mistaken for a message
STOP_OBJECT = "STOP"
# Bounds only (a stuck child must not hang the test); nothing depends on how long anything takes.
IO_TIMEOUT = 20.0        # one receive or send inside a child
WHOLE_RUN = 100.0        # everything the parent waits for in one test
POLL_STEP = 0.05         # the Pool-like readers poll with this timeout, then look again
BIGGEST = 4 * MiB        # the largest message, tag included


def _body_sizes(writer):
    """The body sizes of one writer's messages, in sending order: mostly small (0 B - 2 KiB), 12
    of 64-512 KiB and 3 of 1-4 MiB (one exactly 4 MiB with its tag), shuffled. About 11 MiB."""
    rng = random.Random(f"shared-ends-{writer}")
    sizes = [rng.randint(0, 2 * KiB) for _ in range(98)] + [0, 1]
    sizes += [rng.randint(64 * KiB, 512 * KiB) for _ in range(11)] + [64 * KiB]
    sizes += [rng.randint(1 * MiB, 3 * MiB), 1 * MiB, BIGGEST - TAG.size]
    rng.shuffle(sizes)
    return sizes


def _body(writer, seq, size):
    return random.Random(f"body-{writer}-{seq}").randbytes(size)


# ---- child targets (module level: spawn imports them) -------------------------------------------

def _writer(w, lock, writer, how, close_when_done=True):
    """Send this writer's messages, each under `lock`: as tagged bytes (send_bytes), or as the
    tuple (writer, seq, crc, body) with send() (a body of 4 KiB or more as a
    pickle.PickleBuffer: an object message with an out-of-band buffer)."""
    for seq, size in enumerate(_body_sizes(writer)):
        body = _body(writer, seq, size)
        crc = zlib.crc32(body)
        if how in OBJECT_MODES:
            if size >= 4 * KiB:
                body = pickle.PickleBuffer(bytearray(body))
            with lock:
                w.send((writer, seq, crc, body), timeout=IO_TIMEOUT)
        else:
            message = TAG.pack(writer, seq, crc) + body
            with lock:
                w.send_bytes(message, timeout=IO_TIMEOUT)
    if close_when_done:
        w.close()


def _take(r, how, buf):
    """One message from the shared end (the caller holds the readers' lock): the tagged bytes,
    the received object, or None (poll-then-recv: nothing arrived within POLL_STEP)."""
    if how == "recv_bytes":
        return r.recv_bytes(timeout=IO_TIMEOUT)
    if how == "recv_bytes_into":
        n = r.recv_bytes_into(buf, timeout=IO_TIMEOUT)
        return bytes(buf[:n])
    if how == "recv":
        return r.recv(timeout=IO_TIMEOUT)
    assert how == "poll-then-recv"
    if not r.poll(POLL_STEP):
        return None
    return r.recv(timeout=IO_TIMEOUT)


def _record(message):
    """What the parent checks about one message: (writer, seq, body size, crc matches), or
    ("malformed", description)."""
    if isinstance(message, tuple):
        if len(message) != 4:
            return ("malformed", repr(message)[:200])
        writer, seq, crc, body = message
        body = bytes(body)
        return (writer, seq, len(body), zlib.crc32(body) == crc)
    if not isinstance(message, bytes) or len(message) < TAG.size:
        return ("malformed", repr(message)[:200])
    writer, seq, crc = TAG.unpack_from(message)
    body = memoryview(message)[TAG.size:]
    return (writer, seq, len(body), zlib.crc32(body) == crc)


def _reader(r, lock, results, how, reader, close_when_done=True):
    """Take messages under `lock` until a stop message; report (reader, records, error) on
    `results`."""
    records = []
    buf = bytearray(BIGGEST) if how == "recv_bytes_into" else None
    give_up = time.monotonic() + WHOLE_RUN
    try:
        while True:
            if time.monotonic() > give_up:
                raise AssertionError(f"no stop message within {WHOLE_RUN} s")
            with lock:
                message = _take(r, how, buf)
            if message is None:
                continue
            if message == STOP or (how in OBJECT_MODES and message == STOP_OBJECT):
                break
            records.append(_record(message))
    except BaseException as exc:  # reported to the parent, which fails the test with it
        results.put((reader, records, f"{type(exc).__name__}: {exc}"))
        raise
    results.put((reader, records, None))
    if close_when_done:
        r.close()


OBJECT_MODES = ("recv", "poll-then-recv")


# ---- the parent's side ---------------------------------------------------------------------------

class _Children:
    """Child processes started with one context, each killed (if still running) on leaving."""

    def __init__(self, ctx):
        self._ctx = ctx
        self.started = []

    def start(self, target, *args):
        proc = self._ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        self.started.append(proc)
        return proc

    def close(self):
        for proc in self.started:
            if proc.is_alive():
                proc.kill()
            proc.join(10)


@contextlib.contextmanager
def _children(ctx):
    children = _Children(ctx)
    try:
        yield children
    finally:
        children.close()


def _left(deadline):
    return max(0.1, deadline - time.monotonic())


def _collect(results, count, deadline, send_stops, writers_done):
    """`count` reports from the readers, within the deadline; the first reader's error fails the
    test at once (the other children are killed). `send_stops()` is called once, as soon as
    `writers_done()` says the writers have finished."""
    reports = []
    stopped = False
    while len(reports) < count:
        if not stopped and writers_done():
            send_stops()
            stopped = True
        try:
            report = results.get(timeout=0.1)
        except queue.Empty:
            if time.monotonic() > deadline:
                pytest.fail(f"only {len(reports)} of {count} readers reported within "
                            f"{WHOLE_RUN} s (writers done: {stopped}; reports so far: "
                            f"{[(r, len(rec), err) for r, rec, err in reports]})")
            continue
        reader, _, error = report
        assert error is None, f"reader {reader} failed: {error}"
        reports.append(report)
    assert stopped, "the readers stopped before the stop messages were sent"
    return {reader: records for reader, records, _ in reports}


def _check(by_reader):
    """Every message of every writer exactly once, intact, at its size; each reader's messages
    from one writer in increasing sequence order."""
    expected = {(writer, seq): size for writer in range(WRITERS)
                for seq, size in enumerate(_body_sizes(writer))}
    seen = collections.Counter()
    for reader, records in by_reader.items():
        malformed = [rec for rec in records if rec[0] == "malformed"]
        assert not malformed, f"reader {reader} got malformed messages: {malformed[:3]}"
        for writer, seq, size, intact in records:
            assert (writer, seq) in expected, f"reader {reader} got unknown message {writer, seq}"
            assert size == expected[writer, seq], (
                f"reader {reader} got writer {writer}'s message {seq} with {size} bytes, "
                f"expected {expected[writer, seq]}")
            assert intact, f"reader {reader} got writer {writer}'s message {seq} corrupted"
            seen[writer, seq] += 1
        for writer in range(WRITERS):
            seqs = [seq for w, seq, _, _ in records if w == writer]
            assert seqs == sorted(seqs), (
                f"reader {reader} saw writer {writer}'s messages out of order: {seqs}")
    duplicates = sorted(key for key, n in seen.items() if n > 1)
    missing = sorted(expected.keys() - seen.keys())
    assert not duplicates, f"{len(duplicates)} messages arrived more than once: {duplicates[:10]}"
    assert not missing, f"{len(missing)} messages never arrived: {missing[:10]}"


def _run_processes(start_method, how):
    ctx = multiprocessing.get_context(start_method)
    deadline = time.monotonic() + WHOLE_RUN
    r, w = loopfast.Pipe(duplex=False)
    readers_lock, writers_lock = ctx.Lock(), ctx.Lock()
    results = ctx.Queue()
    with r, w, _children(ctx) as children:
        for reader in range(READERS):
            children.start(_reader, r, readers_lock, results, how, reader)
        writers = [children.start(_writer, w, writers_lock, writer, how)
                   for writer in range(WRITERS)]
        r.close()  # the parent never reads
        stop = STOP_OBJECT if how in OBJECT_MODES else STOP

        def writers_done():
            for proc in writers:
                if proc.exitcode is None:
                    return False
                assert proc.exitcode == 0, f"a writer exited with {proc.exitcode}"
            return True

        def send_stops():
            for _ in range(READERS):
                with writers_lock:
                    if how in OBJECT_MODES:
                        w.send(stop, timeout=IO_TIMEOUT)
                    else:
                        w.send_bytes(stop, timeout=IO_TIMEOUT)

        by_reader = _collect(results, READERS, deadline, send_stops, writers_done)
        for proc in children.started:
            proc.join(_left(deadline))
            assert proc.exitcode == 0, f"a child exited with {proc.exitcode}"
    _check(by_reader)


# ---- reader and writer processes -----------------------------------------------------------------

@pytest.mark.timeout(180)
def test_reader_processes_sharing_an_end_under_a_lock_get_every_message_once(start_method):
    """`with lock: msg = r.recv_bytes()` in 3 processes, 3 writer processes on the other end."""
    _run_processes(start_method, "recv_bytes")


@pytest.mark.timeout(180)
def test_reader_processes_sharing_an_end_get_every_object_once(start_method):
    """recv() of pickled objects; bodies of 4 KiB or more travel as out-of-band buffers."""
    _run_processes(start_method, "recv")


@pytest.mark.timeout(180)
def test_reader_processes_sharing_an_end_with_recv_bytes_into_get_every_message_once(
        start_method):
    """recv_bytes_into() into each reader's own 4 MiB bytearray."""
    _run_processes(start_method, "recv_bytes_into")


@pytest.mark.timeout(180)
def test_pool_like_readers_polling_then_receiving_under_a_lock_get_every_object_once(
        start_method):
    """As multiprocessing.Pool's handlers do: `with lock: if r.poll(timeout): obj = r.recv()`.
    A poll() that says a message is there is never followed by a receive that takes part of it,
    or one that another reader already took."""
    _run_processes(start_method, "poll-then-recv")


# ---- threads sharing one Channel object ----------------------------------------------------------

THREAD_CASES = [
    pytest.param(how, user_lock, id=f"{how}-{'user-lock' if user_lock else 'channel-lock-only'}")
    for how in ("recv_bytes", "recv_bytes_into", "recv") for user_lock in (False, True)
] + [pytest.param("poll-then-recv", True, id="poll-then-recv-user-lock")]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("how", "user_lock"), THREAD_CASES)
def test_reader_threads_sharing_one_channel_get_every_message_once(make_pair, how, user_lock):
    """3 reader threads on one Channel object (its receive lock serializes them; with a
    threading.Lock on top in the user-lock cases), 3 writer threads on the other end."""
    r, w = make_pair()
    deadline = time.monotonic() + WHOLE_RUN
    readers_lock = threading.Lock() if user_lock else contextlib.nullcontext()
    results = queue.Queue()
    readers = [Background(_reader, r, readers_lock, results, how, reader, False)
               for reader in range(READERS)]
    writers = [Background(_writer, w, contextlib.nullcontext(), writer, how, False)
               for writer in range(WRITERS)]

    def writers_done():
        if not all(thread.done() for thread in writers):
            return False
        for thread in writers:
            thread.result()  # re-raises a writer's exception
        return True

    def send_stops():
        for _ in range(READERS):
            if how in OBJECT_MODES:
                w.send(STOP_OBJECT, timeout=IO_TIMEOUT)
            else:
                w.send_bytes(STOP, timeout=IO_TIMEOUT)

    by_reader = _collect(results, READERS, deadline, send_stops, writers_done)
    for thread in readers:
        thread.result(_left(deadline))
    _check(by_reader)
    assert not r.poll(0), "more arrived than was sent"


# ---- what another process took is gone for this one ---------------------------------------------

FIRST, SECOND, THIRD = b"first message", b"second message", b"third message"


def _take_one_then_look(r, control, check):
    """In the child: take the first message; once the parent says it has taken the second one
    (on its own copy of the end), look at the end: poll(0), loopfast.wait(timeout=0), or the next
    receive (which must be the third message, sent after). Reports on `control` (a
    multiprocessing Pipe end, not a loopfast one)."""
    try:
        control.send(("took", r.recv_bytes(timeout=IO_TIMEOUT)))
        if not control.poll(IO_TIMEOUT):
            raise AssertionError("the parent did not say it took the second message")
        control.recv()
        if check == "poll":
            outcome = r.poll(0)
        elif check == "loopfast.wait":
            outcome = loopfast.wait([r], timeout=0) == [r]
        else:
            control.send(("ready", None))
            outcome = r.recv_bytes(timeout=IO_TIMEOUT)
        control.send(("outcome", outcome))
    except BaseException as exc:
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        r.close()


def _another_process_takes_the_second_message(start_method, check):
    """The parent and a child share the read end; the child takes the first message (its
    receive may well have seen the second one queued behind it), then the parent takes the
    second. Returns what the child's `check` found."""
    ctx = multiprocessing.get_context(start_method)
    ours, theirs = ctx.Pipe()
    r, w = loopfast.Pipe(duplex=False)
    with r, w, ours, theirs, _children(ctx) as children:
        w.send_bytes(FIRST, timeout=IO_TIMEOUT)
        w.send_bytes(SECOND, timeout=IO_TIMEOUT)
        children.start(_take_one_then_look, r, theirs, check)
        theirs.close()

        def report():
            if not ours.poll(IO_TIMEOUT):
                pytest.fail("the child did not report")
            kind, value = ours.recv()
            assert kind != "error", f"the child failed: {value}"
            return kind, value

        assert report() == ("took", FIRST)
        assert r.recv_bytes(timeout=IO_TIMEOUT) == SECOND
        ours.send("took the second")
        kind, outcome = report()
        if kind == "ready":
            w.send_bytes(THIRD, timeout=IO_TIMEOUT)
            kind, outcome = report()
        assert kind == "outcome"
        children.started[0].join(JOIN_TIMEOUT)
        assert children.started[0].exitcode == 0
        return outcome


@pytest.mark.timeout(120)
def test_a_message_another_process_took_is_not_received_again(start_method):
    assert _another_process_takes_the_second_message(start_method, "recv_bytes") == THIRD


@pytest.mark.timeout(120)
def test_poll_does_not_report_a_message_another_process_took(start_method):
    assert _another_process_takes_the_second_message(start_method, "poll") is False


@pytest.mark.timeout(120)
def test_loopfast_wait_does_not_report_a_message_another_process_took(start_method):
    assert _another_process_takes_the_second_message(start_method, "loopfast.wait") is False
