"""A failed receive leaves the stream in step (issue 11), on both implementations.

A receive takes from the socket only the bytes of the message it returns, so a receive that
fails for a reason of its own leaves the next message whole for the next receive:

* MemoryError: the result is allocated before anything is consumed, so the message stays in the
  socket and the next receive (once memory is there) gets it whole. A big payload whose content
  is itself shaped like a frame (a header and a pickle that would create a marker file when
  unpickled) proves that nothing is ever parsed from inside it: a receive that had consumed the
  outer header and then failed would parse the payload as the next frame. Run in a spawned
  child whose address space is limited with RLIMIT_AS, with the implementation under test
  selected as users select it (LOOPFAST_NO_EXTENSIONS).
* BufferTooShort from recv_bytes_into: the message is taken whole (args[0]); the next one is
  intact.
* An object message (out-of-band buffers) refused by the bytes receives (OSError): nothing is
  taken; recv() returns it whole and the message behind it is intact.
* A timeout in the middle of a message (in its header, its size table, its payload): the next
  receive resumes it and returns it whole.

The peer that cuts a frame is a channel's `_send_raw` (raw bytes, TCP_NODELAY: one segment per
call). Every wait is bounded.
"""

import contextlib
import hashlib
import multiprocessing
import os
import pickle
import select
import struct
import sys

import pytest
from conftest import (
    FRAME_HEADER,
    IMPLEMENTATIONS,
    JOIN_TIMEOUT,
    KIND_BYTES,
    KIND_PICKLE,
    RECV_TIMEOUT,
    Background,
    available_memory,
    connected_pair,
    frame,
    make_payload,
)

import loopfast

KiB = 1024
MiB = 1024 * KiB

KIND_OBJECT = 3
EXPIRES = 0.2  # a timeout meant to expire: the rest of the message is not sent yet
BIG_TIMEOUT = 120.0  # bound of a transfer of hundreds of MiB (normally well under a second)


def _readable_now(channel):
    return bool(select.select([channel.fileno()], [], [], 0)[0])


# ==== MemoryError =================================================================================

HEADROOM = 64 * MiB  # the child may allocate this much more than it has mapped when it starts
MEMORY_SIZES = {"192MiB": 192 * MiB, "512MiB": 512 * MiB}
needs_rlimit = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                  reason="RLIMIT_AS and /proc/self/status: Linux")


class _CreatesMarker:
    """Unpickling this runs open(path, 'w'): the file existing proves that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _booby_trapped_payload(size, marker):
    """`size` bytes that begin like a whole kind-2 frame whose pickle creates `marker`."""
    inner = pickle.dumps(_CreatesMarker(marker), protocol=2)
    payload = bytearray(size)
    head = FRAME_HEADER.pack(KIND_PICKLE, 0, 0, 0, len(inner)) + inner
    payload[:len(head)] = head
    # and the same again at the end, for a receive that skipped to the wrong place
    payload[-len(head):] = head
    return payload


def _vm_size():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def _attempt(call):
    """What a receive did: ("raised", exception type name) or ("returned", a short summary)."""
    try:
        result = call()
    except Exception as exc:
        return ("raised", type(exc).__name__)
    if isinstance(result, (bytes, bytearray)):
        return ("returned", f"{len(result)} bytes")
    return ("returned", repr(result)[:100])


def _memory_error_child(ch, control, size, first, head_first, marker):
    """In the spawned child: (head_first: time out with only the start of the big frame's header
    queued, so the receive holds a partial head) limit the address space so that `size` bytes
    cannot be allocated; receive with `first`, then with recv() (both must fail with MemoryError,
    and recv() would run the trap if the stream had moved into the payload); lift the limit;
    receive twice with recv_bytes. Everything is reported on `control` (a multiprocessing Pipe
    end, not a loopfast one)."""
    import resource

    report = {}
    try:
        if head_first:
            report["head-timeout"] = _attempt(lambda: ch.recv_bytes(timeout=EXPIRES))
            control.send(("head-timeout", None))
            if not control.poll(RECV_TIMEOUT):
                raise AssertionError("the parent did not send the rest of the frame")
            control.recv()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + HEADROOM, hard))
        try:
            try:
                bytearray(size)
            except MemoryError:
                pass
            else:
                control.send(("skip", "RLIMIT_AS does not stop the allocation here"))
                return
            calls = {
                "recv_bytes": lambda: ch.recv_bytes(timeout=RECV_TIMEOUT),
                "recv": lambda: ch.recv(timeout=RECV_TIMEOUT),
                "recv_bytes_into": lambda: ch.recv_bytes_into(bytearray(KiB),
                                                              timeout=RECV_TIMEOUT),
            }
            report["first"] = _attempt(calls[first])
            report["again-with-recv"] = _attempt(calls["recv"])
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        try:
            bytearray(size)
        except MemoryError:
            control.send(("skip", f"cannot allocate {size} bytes even without the limit"))
            return
        received = []
        try:
            for _ in range(2):
                message = ch.recv_bytes(timeout=BIG_TIMEOUT)
                received.append((len(message), hashlib.sha256(message).hexdigest()))
                del message
                if received[-1][0] != size:
                    break
        except Exception as exc:  # the stream out of step: reported with the rest
            received.append(("raised", f"{type(exc).__name__}: {exc}"))
        report["received"] = received
        report["marker-exists"] = os.path.exists(marker)
        control.send(("report", report))
    except BaseException as exc:
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        ch.close()


@contextlib.contextmanager
def _spawned(implementation, target, *args):
    """Start target(*args) in a spawned child whose loopfast uses `implementation` ("pure":
    LOOPFAST_NO_EXTENSIONS=1); killed if it overstays."""
    ctx = multiprocessing.get_context("spawn")
    saved = os.environ.get("LOOPFAST_NO_EXTENSIONS")
    if implementation == "pure":
        os.environ["LOOPFAST_NO_EXTENSIONS"] = "1"
    else:
        os.environ.pop("LOOPFAST_NO_EXTENSIONS", None)
    try:
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
    finally:
        if saved is None:
            os.environ.pop("LOOPFAST_NO_EXTENSIONS", None)
        else:
            os.environ["LOOPFAST_NO_EXTENSIONS"] = saved
    try:
        yield proc
    finally:
        proc.join(JOIN_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join(10)


AFTER = b"the small message after the big one"


def _memory_cases():
    cases = []
    for size_name, size in MEMORY_SIZES.items():
        marks = [pytest.mark.slow] if size > 256 * MiB else []
        marks.append(pytest.mark.skipif(available_memory() < 4 * size,
                                        reason=f"needs {4 * size // MiB} MiB of available memory"))
        firsts = ("recv_bytes", "recv", "recv_bytes_into") if size <= 256 * MiB else ("recv",)
        for first in firsts:
            for head_first in (False, True):
                cases.append(pytest.param(
                    size, first, head_first, marks=marks,
                    id=f"{size_name}-{first}-{'partial-head' if head_first else 'whole-head'}"))
    return cases


def _report(control):
    if not control.poll(BIG_TIMEOUT):
        pytest.fail("the child did not report")
    kind, value = control.recv()
    if kind == "skip":
        pytest.skip(value)
    assert kind != "error", f"the child failed: {value}"
    return kind, value


@needs_rlimit
@pytest.mark.timeout(600)
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize(("size", "first", "head_first"), _memory_cases())
@pytest.mark.parametrize("peer", ["trusted", "untrusted"])
def test_a_memoryerror_leaves_the_message_for_the_next_receive(
        tmp_path, implementation, size, first, head_first, peer):
    # From a trusted peer (authkey, same user) the message is allocated whole before any of it is
    # taken, so the MemoryError leaves it in the socket; from another, its payload is allocated as
    # it arrives, so the MemoryError comes part-way and leaves it pending: either way the next
    # receive gets it whole.
    impl = IMPLEMENTATIONS[implementation]
    marker = str(tmp_path / "the-payload-was-unpickled")
    payload = _booby_trapped_payload(size, marker)
    after = AFTER
    big_frame_header = FRAME_HEADER.pack(KIND_BYTES, 0, 0, 0, size)
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    parent_end, child_end = connected_pair(impl, impl)
    if peer == "untrusted":
        parent_end._trusted = child_end._trusted = False
    with parent_end, child_end, ours, theirs:
        with _spawned(implementation, _memory_error_child, child_end, theirs, size, first,
                      head_first, marker) as proc:
            child_end.close()
            theirs.close()
            if head_first:
                parent_end._send_raw(big_frame_header[:7], timeout=RECV_TIMEOUT)
                assert _report(ours) == ("head-timeout", None)

                def send():
                    parent_end._send_raw(big_frame_header[7:], timeout=RECV_TIMEOUT)
                    parent_end._send_raw(payload, timeout=BIG_TIMEOUT)
                    parent_end.send_bytes(after, timeout=RECV_TIMEOUT)

                ours.send("go")
            else:
                def send():
                    parent_end.send_bytes(payload, timeout=BIG_TIMEOUT)
                    parent_end.send_bytes(after, timeout=RECV_TIMEOUT)

            sending = Background(send)
            _, report = _report(ours)
        # The report first: a child whose stream went out of step closes with data unread, and
        # the sender then fails with ConnectionResetError, which says less.
        _check_memory_report(report, marker, size, payload, head_first)
        assert proc.exitcode == 0
        sending.result(BIG_TIMEOUT)


def _check_memory_report(report, marker, size, payload, head_first):
    assert not os.path.exists(marker), (
        f"a pickle from inside the big payload was unpickled (the child's report: {report})")
    assert report["marker-exists"] is False
    digest = hashlib.sha256(payload).hexdigest()
    after = AFTER
    if head_first:
        assert report["head-timeout"] == ("raised", "TimeoutError")
    assert report["first"] == ("raised", "MemoryError")
    assert report["again-with-recv"] == ("raised", "MemoryError"), (
        "after the MemoryError the big message was no longer next")
    after_digest = (len(after), hashlib.sha256(after).hexdigest())
    assert report["received"] in ([(size, digest), after_digest], [after_digest]), (
        f"after the MemoryError the stream was out of step: {report['received']}")


# ==== BufferTooShort ==============================================================================

@pytest.mark.parametrize("layout", ["short-buffer", "offset-leaves-too-little"])
@pytest.mark.parametrize("size", [10, 70 * KiB, 3 * MiB], ids=["10B", "70KiB", "3MiB"])
def test_buffertooshort_takes_the_message_whole_and_the_next_one_arrives_intact(
        make_pair, size, layout):
    a, b = make_pair()
    payload = make_payload(size)
    sending = Background(lambda: (b.send_bytes(payload, timeout=RECV_TIMEOUT),
                                  b.send_bytes(b"next", timeout=RECV_TIMEOUT)))
    if layout == "short-buffer":
        buf, offset = bytearray(size - 1), 0
    else:
        buf, offset = bytearray(size + 5), 6
    with pytest.raises(loopfast.BufferTooShort) as info:
        a.recv_bytes_into(buf, offset, timeout=RECV_TIMEOUT)
    assert len(info.value.args) == 1
    assert bytes(info.value.args[0]) == payload
    assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"next"
    sending.result()
    assert not a.poll(0)


# ==== an object message refused by the bytes receives =============================================

def _object(kind, size):
    if kind == "numpy":
        np = pytest.importorskip("numpy")
        return np.frombuffer(make_payload(size), dtype=np.uint8).copy()
    return pickle.PickleBuffer(bytearray(make_payload(size)))


def _same(got, sent, kind):
    if kind == "numpy":
        import numpy as np

        return isinstance(got, np.ndarray) and np.array_equal(got, sent)
    return bytes(got) == bytes(sent.raw())


BYTES_RECEIVES = {
    "recv_bytes": lambda c: c.recv_bytes(timeout=RECV_TIMEOUT),
    "recv_bytes_into": lambda c: c.recv_bytes_into(bytearray(8 * MiB), timeout=RECV_TIMEOUT),
    "recv_bytes_many": lambda c: c.recv_bytes_many(timeout=RECV_TIMEOUT),
}


@pytest.mark.parametrize("size", [8 * KiB, 3 * MiB], ids=["8KiB", "3MiB"])
@pytest.mark.parametrize("kind", ["numpy", "PickleBuffer"])
def test_an_object_message_refused_by_the_bytes_receives_is_then_received_whole(
        make_pair, kind, size):
    a, b = make_pair()
    sent = _object(kind, size)
    sending = Background(lambda: (b.send(sent, timeout=RECV_TIMEOUT),
                                  b.send_bytes(b"next", timeout=RECV_TIMEOUT)))
    for name, receive in BYTES_RECEIVES.items():
        for _ in range(2):
            with pytest.raises(OSError, match="out-of-band buffers") as info:
                receive(a)
            assert not isinstance(info.value, loopfast.ProtocolError), name
            assert not a.closed and a.readable, f"{name} refusing stopped the channel"
        assert a.poll(RECV_TIMEOUT), f"nothing left to read after {name} refused the message"
    assert _same(a.recv(timeout=RECV_TIMEOUT), sent, kind)
    assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"next"
    sending.result()
    assert not a.poll(0)


@pytest.mark.parametrize("size", [8 * KiB, 3 * MiB], ids=["8KiB", "3MiB"])
def test_a_refused_object_message_stays_in_the_socket(make_pair, size):
    """Refusing takes nothing: the socket stays readable (every selector sees the message)."""
    a, b = make_pair()
    sending = Background(lambda: b.send(pickle.PickleBuffer(bytearray(size)),
                                        timeout=RECV_TIMEOUT))
    with pytest.raises(OSError, match="out-of-band buffers"):
        a.recv_bytes(timeout=RECV_TIMEOUT)
    assert _readable_now(a), "the refused message is no longer in the socket"
    assert bytes(a.recv(timeout=RECV_TIMEOUT)) == bytes(size)
    sending.result()


# ==== a timeout in the middle of a message ========================================================

def _object_frame(data):
    """An object message (kind 3) carrying bytearray(data) out of band, as docs/protocol.md
    lays it out; returns (frame bytes, what recv() returns)."""
    buffers = []
    pickled = pickle.dumps(pickle.PickleBuffer(bytearray(data)), protocol=5,
                           buffer_callback=buffers.append)
    raw = [bytes(buf.raw()) for buf in buffers]
    sizes = [len(pickled)] + [len(r) for r in raw]
    body = struct.pack(f"<{len(sizes)}Q", *sizes) + pickled + b"".join(raw)
    return FRAME_HEADER.pack(KIND_OBJECT, 0, 0, len(raw), len(body)) + body, bytearray(data)


def _frame_for(case):
    """(frame bytes, where the first part stops, how it is received, expected result)."""
    small, large = make_payload(1000, seed=1), make_payload(3 * MiB, seed=2)
    if case == "mid-header":
        return frame(small), 7, "recv_bytes", small
    if case == "header-only":
        return frame(small), 16, "recv_bytes", small
    if case == "mid-small-payload":
        return frame(small), 16 + 500, "recv_bytes", small
    if case == "mid-large-payload":
        return frame(large), 16 + len(large) // 2, "recv_bytes", large
    if case == "mid-large-payload-into":
        return frame(large), 16 + len(large) // 2, "recv_bytes_into", large
    if case == "mid-pickle":
        obj = {"data": large}
        data = frame(pickle.dumps(obj, protocol=5), KIND_PICKLE)
        return data, len(data) // 2, "recv", obj
    data, expected = _object_frame(large)
    if case == "object-mid-size-table":
        return data, 16 + 4, "recv", expected
    assert case == "object-mid-buffer"
    return data, len(data) - 1 * MiB, "recv", expected


TIMEOUT_CASES = ["mid-header", "header-only", "mid-small-payload", "mid-large-payload",
                 "mid-large-payload-into", "mid-pickle", "object-mid-size-table",
                 "object-mid-buffer"]


def _receive(channel, how, timeout):
    if how == "recv_bytes":
        return channel.recv_bytes(timeout=timeout)
    if how == "recv_bytes_into":
        buf = bytearray(4 * MiB)
        n = channel.recv_bytes_into(buf, timeout=timeout)
        return bytes(buf[:n])
    return channel.recv(timeout=timeout)


@pytest.mark.parametrize("case", TIMEOUT_CASES)
def test_a_timeout_in_the_middle_of_a_message_is_resumed_by_the_next_receive(make_pair, case):
    a, b = make_pair()
    data, cut, how, expected = _frame_for(case)
    first = Background(b._send_raw, data[:cut], timeout=RECV_TIMEOUT)
    with pytest.raises(TimeoutError):
        _receive(a, how, EXPIRES)
    with pytest.raises(TimeoutError):
        _receive(a, how, 0)
    first.result()
    assert not a.closed
    rest = Background(lambda: (b._send_raw(data[cut:], timeout=RECV_TIMEOUT),
                               b.send_bytes(b"next", timeout=RECV_TIMEOUT)))
    assert _receive(a, how, RECV_TIMEOUT) == expected
    assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"next"
    rest.result()
    assert not a.poll(0)


def test_a_timeout_while_a_64_mib_message_streams_in_is_resumed_whole(make_pair):
    """The brief's plain version: a big message, a tiny timeout that expires part-way (or
    before anything arrived), then receives until it is complete."""
    a, b = make_pair()
    payload = make_payload(64 * MiB, seed=5)
    sending = Background(lambda: (b.send_bytes(payload, timeout=BIG_TIMEOUT),
                                  b.send_bytes(b"next", timeout=RECV_TIMEOUT)))
    timeouts = 0
    while True:
        try:
            got = a.recv_bytes(timeout=0.001)
            break
        except TimeoutError:
            timeouts += 1
            assert timeouts < 1_000_000, "the message never completed"
    assert got == payload
    assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"next"
    sending.result(BIG_TIMEOUT)
