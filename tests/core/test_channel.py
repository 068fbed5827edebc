"""Channel behaviour within one process: message sizes, buffers, objects, poll, timeouts,
byte-at-a-time peers, concurrency, EOF, Ctrl-C, closed channels and wait().

Where a behaviour is "as multiprocessing", the test runs the same call on a real
multiprocessing.Pipe() and compares.
"""

import array
import multiprocessing
import multiprocessing.connection
import os
import pickle
import select
import socket
import threading
import time

import pytest
from conftest import (
    KIND_PICKLE,
    RECV_TIMEOUT,
    Background,
    assert_interrupted_promptly,
    assert_same_object,
    buffer_rich_object,
    call_with_ctrl_c,
    frame,
    make_payload,
    recv_n_bytes,
    send_all_bytes,
)

import loopfast

KiB = 1024
MiB = 1024 * 1024

# Sizes on both sides of the core's internal thresholds (present and past): 8 and 16 KiB (small
# frames are copied into one send with their header), 64 KiB (larger payloads are read straight
# into their final object), 256 KiB (the receive buffer; a frame of 256 KiB - 16 fills it
# exactly), and beyond.
SIZES = [
    0, 1, 2, 15, 16, 17,
    8 * KiB - 1, 8 * KiB, 8 * KiB + 1,
    16 * KiB - 1, 16 * KiB, 16 * KiB + 1,
    64 * KiB - 1, 64 * KiB, 64 * KiB + 1,
    64 * KiB + 16,
    256 * KiB - 17, 256 * KiB - 16, 256 * KiB - 15,
    256 * KiB - 1, 256 * KiB, 256 * KiB + 1,
    1 * MiB + 3,
    64 * MiB,
]


@pytest.fixture
def mp_pipe():
    a, b = multiprocessing.Pipe()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def receive(channel, how, timeout=RECV_TIMEOUT):
    """Receive one message with recv_bytes / recv_bytes_into / recv, as the value a caller gets."""
    if how == "recv_bytes":
        return channel.recv_bytes(timeout=timeout)
    if how == "recv_bytes_into":
        buf = bytearray(4 * MiB)
        n = channel.recv_bytes_into(buf, timeout=timeout)
        return bytes(buf[:n])
    return channel.recv(timeout=timeout)


# ---- send_bytes / recv_bytes: sizes --------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_recv_bytes_returns_exactly_what_send_bytes_sent(pipe, size):
    a, b = pipe
    payload = make_payload(size)
    sender = Background(send_all_bytes, a, [payload, b"end"])
    got = b.recv_bytes(timeout=RECV_TIMEOUT)
    assert len(got) == size
    assert got == payload
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"end"
    sender.result()


@pytest.mark.parametrize("size", SIZES)
def test_recv_bytes_into_bytearray_gets_exactly_what_was_sent(pipe, size):
    a, b = pipe
    payload = make_payload(size)
    buf = bytearray(size + 8)
    sender = Background(send_all_bytes, a, [payload])
    assert b.recv_bytes_into(buf, 3, timeout=RECV_TIMEOUT) == size
    sender.result()
    assert buf[:3] == b"\0\0\0"
    assert buf[3:3 + size] == payload
    assert buf[3 + size:] == bytes(5)


def test_messages_of_every_size_back_to_back_in_one_stream(pipe):
    """Frames of all threshold sizes queued behind each other, so that they straddle receive
    buffer refills and the switch between buffered and direct reads."""
    a, b = pipe
    sizes = [s for s in SIZES if s <= 1 * MiB] * 2
    messages = [make_payload(s, seed=i) for i, s in enumerate(sizes)]
    sender = Background(send_all_bytes, a, messages)
    for i, expected in enumerate(messages):
        if i % 2:
            assert b.recv_bytes(timeout=RECV_TIMEOUT) == expected
        else:
            buf = bytearray(len(expected))
            assert b.recv_bytes_into(buf, timeout=RECV_TIMEOUT) == len(expected)
            assert buf == expected
    sender.result()


def test_many_empty_messages_each_arrive_as_one_message(pipe):
    a, b = pipe
    for _ in range(100):
        a.send_bytes(b"")
    a.send_bytes(b"last")
    assert [b.recv_bytes(timeout=RECV_TIMEOUT) for _ in range(101)] == [b""] * 100 + [b"last"]


# ---- buffer-protocol inputs ----------------------------------------------------------------------

def _buffer_inputs():
    cases = [
        ("bytes", b"hello bytes"),
        ("bytearray", bytearray(b"hello bytearray")),
        ("memoryview", memoryview(b"0123456789")[2:7]),
        ("memoryview-strided", memoryview(b"0123456789")[::3]),
        ("array-i", array.array("i", range(-5, 50))),
        ("array-d-large", array.array("d", range(20000))),
        ("bytearray-large", bytearray(make_payload(300 * KiB))),
    ]
    try:
        import numpy as np
    except ImportError:
        return cases
    base = np.arange(60000, dtype=np.int32)
    cases += [
        ("numpy-c", base),
        ("numpy-c-2d", base.reshape(300, 200)),
        ("numpy-slice-step", base[::7]),
        ("numpy-column", base.reshape(300, 200)[:, 3]),
        ("numpy-fortran", np.asfortranarray(base.reshape(300, 200))),
        ("numpy-fortran-small", np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))),
        ("numpy-empty", np.zeros(0, dtype=np.float32)),
    ]
    return cases


BUFFER_INPUTS = _buffer_inputs()


@pytest.mark.parametrize("name, obj", BUFFER_INPUTS, ids=[n for n, _ in BUFFER_INPUTS])
def test_send_bytes_accepts_any_buffer_and_sends_its_bytes_in_c_order(pipe, name, obj):
    a, b = pipe
    sender = Background(send_all_bytes, a, [obj])
    got = b.recv_bytes(timeout=RECV_TIMEOUT)
    sender.result()
    # memoryview.tobytes() is the C-order byte image multiprocessing sends for a contiguous
    # buffer (multiprocessing itself refuses non-contiguous ones; loopfast copies them once).
    assert got == memoryview(obj).tobytes()


@pytest.mark.parametrize(
    "name, obj",
    [(n, o) for n, o in BUFFER_INPUTS if memoryview(o).c_contiguous],
    ids=[n for n, o in BUFFER_INPUTS if memoryview(o).c_contiguous],
)
def test_send_bytes_sends_what_multiprocessing_sends(pipe, mp_pipe, name, obj):
    a, b = pipe
    mp_a, mp_b = mp_pipe
    mp_sender = Background(mp_a.send_bytes, obj)
    expected = mp_b.recv_bytes()
    mp_sender.result()
    sender = Background(send_all_bytes, a, [obj])
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == expected
    sender.result()


@pytest.mark.parametrize("offset, size",
                         [(0, None), (4, None), (4, 8), (6, 5), (40, 0), (0, 40), (37, 3)])
def test_send_bytes_offset_and_size_count_bytes_for_an_int_array(pipe, mp_pipe, offset, size):
    a, b = pipe
    mp_a, mp_b = mp_pipe
    arr = array.array("i", range(10))  # 40 bytes
    mp_a.send_bytes(arr, offset, size)
    expected = mp_b.recv_bytes()
    a.send_bytes(arr, offset, size)
    got = b.recv_bytes(timeout=RECV_TIMEOUT)
    assert got == expected == arr.tobytes()[offset:None if size is None else offset + size]


def test_send_bytes_offset_and_size_count_bytes_for_a_numpy_array(pipe):
    np = pytest.importorskip("numpy")
    a, b = pipe
    arr = np.arange(50000, dtype=np.float64)  # 400000 bytes: the large-send path
    a_thread = Background(lambda: a.send_bytes(arr, 24, 200000, timeout=RECV_TIMEOUT))
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == arr.tobytes()[24:200024]
    a_thread.result()


@pytest.mark.parametrize("offset, size",
                         [(-1, None), (-1, 4), (41, None), (0, -1), (4, 37), (40, 1), (41, 0)])
def test_send_bytes_bad_offset_or_size_raises_the_same_valueerror_as_multiprocessing(
        pipe, mp_pipe, offset, size):
    a, b = pipe
    mp_a, _ = mp_pipe
    arr = array.array("i", range(10))  # 40 bytes
    with pytest.raises(ValueError) as mp_error:
        mp_a.send_bytes(arr, offset, size)
    with pytest.raises(ValueError) as lf_error:
        a.send_bytes(arr, offset, size)
    assert str(lf_error.value) == str(mp_error.value)
    # nothing went out: the next message is the next one received
    a.send_bytes(b"after")
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"after"


# ---- recv_bytes_into -----------------------------------------------------------------------------

def test_recv_bytes_into_returns_the_byte_count_and_writes_at_the_offset(pipe):
    a, b = pipe
    a.send_bytes(b"abcde")
    buf = bytearray(b"." * 12)
    assert b.recv_bytes_into(buf, 4, timeout=RECV_TIMEOUT) == 5
    assert buf == bytearray(b"....abcde...")


def test_recv_bytes_into_int_array_uses_a_byte_offset(pipe):
    a, b = pipe
    a.send_bytes(b"\x01\x02\x03\x04\x05")
    buf = array.array("i", [0] * 4)
    # offset 3 is not a multiple of the item size: it still means 3 bytes in
    assert b.recv_bytes_into(buf, 3, timeout=RECV_TIMEOUT) == 5
    assert buf.tobytes() == b"\0\0\0\x01\x02\x03\x04\x05" + bytes(8)


def test_recv_bytes_into_int_array_matches_multiprocessing_for_aligned_offsets(pipe, mp_pipe):
    a, b = pipe
    mp_a, mp_b = mp_pipe
    message = array.array("i", [7, 8, 9]).tobytes()
    mp_buf = array.array("i", [0] * 6)
    lf_buf = array.array("i", [0] * 6)
    mp_a.send_bytes(message)
    a.send_bytes(message)
    assert b.recv_bytes_into(lf_buf, 8, timeout=RECV_TIMEOUT) == mp_b.recv_bytes_into(mp_buf, 8)
    assert lf_buf == mp_buf == array.array("i", [0, 0, 7, 8, 9, 0])


def test_recv_bytes_into_numpy_uses_a_byte_offset(pipe):
    np = pytest.importorskip("numpy")
    a, b = pipe
    values = np.arange(10, dtype=np.int64)
    a.send_bytes(values)
    dest = np.zeros(12, dtype=np.int64)
    assert b.recv_bytes_into(dest, 16, timeout=RECV_TIMEOUT) == 80
    assert dest.tolist() == [0, 0, *range(10)]


def test_recv_bytes_into_fills_exactly_the_remaining_space(pipe):
    a, b = pipe
    a.send_bytes(b"xyz")
    buf = bytearray(5)
    assert b.recv_bytes_into(buf, 2, timeout=RECV_TIMEOUT) == 3
    assert buf == bytearray(b"\0\0xyz")


def test_recv_bytes_into_empty_message_at_the_end_of_the_buffer(pipe):
    a, b = pipe
    a.send_bytes(b"")
    buf = bytearray(4)
    assert b.recv_bytes_into(buf, 4, timeout=RECV_TIMEOUT) == 0
    assert buf == bytearray(4)


@pytest.mark.parametrize("size", [10, 16 * KiB + 1, 64 * KiB + 1, 3 * MiB])
@pytest.mark.parametrize("offset", [0, 5])
def test_recv_bytes_into_too_small_raises_buffertooshort_with_the_whole_message(pipe, size, offset):
    a, b = pipe
    payload = make_payload(size)
    sender = Background(send_all_bytes, a, [payload, b"next"])
    buf = bytearray(size - 1 + offset)
    with pytest.raises(loopfast.BufferTooShort) as excinfo:
        b.recv_bytes_into(buf, offset, timeout=RECV_TIMEOUT)
    assert isinstance(excinfo.value, multiprocessing.BufferTooShort)
    assert excinfo.value.args[0] == payload
    # the message was consumed as a whole; the channel goes on with the next one
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"next"
    sender.result()


def test_recv_bytes_into_buffertooshort_like_multiprocessing(pipe, mp_pipe):
    a, b = pipe
    mp_a, mp_b = mp_pipe
    mp_a.send_bytes(b"0123456789")
    a.send_bytes(b"0123456789")
    with pytest.raises(multiprocessing.BufferTooShort) as mp_error:
        mp_b.recv_bytes_into(bytearray(10), 1)
    with pytest.raises(multiprocessing.BufferTooShort) as lf_error:
        b.recv_bytes_into(bytearray(10), 1, timeout=RECV_TIMEOUT)
    assert lf_error.value.args == mp_error.value.args == (b"0123456789",)


@pytest.mark.parametrize("make_buf", [
    lambda: bytearray(10),
    lambda: array.array("i", [0] * 3),  # 12 bytes
], ids=["bytearray", "array-i"])
@pytest.mark.parametrize("offset_from_end", [-100, 1, 2])
def test_recv_bytes_into_bad_offset_raises_the_same_valueerror_as_multiprocessing(
        pipe, mp_pipe, make_buf, offset_from_end):
    a, b = pipe
    mp_a, mp_b = mp_pipe
    mp_buf, lf_buf = make_buf(), make_buf()
    nbytes = memoryview(lf_buf).nbytes
    offset = -1 if offset_from_end == -100 else nbytes + offset_from_end
    mp_a.send_bytes(b"abc")
    a.send_bytes(b"abc")
    with pytest.raises(ValueError) as mp_error:
        mp_b.recv_bytes_into(mp_buf, offset)
    with pytest.raises(ValueError) as lf_error:
        b.recv_bytes_into(lf_buf, offset, timeout=RECV_TIMEOUT)
    assert str(lf_error.value) == str(mp_error.value)
    assert str(lf_error.value) in ("negative offset", "offset too large")
    # the check comes before receiving: the message is still there
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"abc"


@pytest.mark.parametrize("size", [64 * KiB + 1, 5 * MiB + 7, 64 * MiB])
def test_recv_bytes_into_large_message_into_bytearray(pipe, size):
    a, b = pipe
    payload = make_payload(size)
    buf = bytearray(size + 100)
    sender = Background(send_all_bytes, a, [payload, b"after"])
    assert b.recv_bytes_into(buf, 100, timeout=RECV_TIMEOUT) == size
    assert buf[:100] == bytes(100)
    assert buf[100:] == payload
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"after"
    sender.result()


@pytest.mark.parametrize("size", [64 * KiB + 8, 16 * MiB])
def test_recv_bytes_into_large_message_into_numpy(pipe, size):
    np = pytest.importorskip("numpy")
    a, b = pipe
    src = np.frombuffer(make_payload(size), dtype=np.uint64)
    dest = np.zeros(src.size + 1, dtype=np.uint64)
    sender = Background(send_all_bytes, a, [src])
    assert b.recv_bytes_into(dest, 8, timeout=RECV_TIMEOUT) == size
    sender.result()
    assert dest[0] == 0
    assert np.array_equal(dest[1:], src)


# ---- recv_bytes(maxlength) -----------------------------------------------------------------------

def test_recv_bytes_maxlength_equal_to_the_size_is_accepted(pipe):
    a, b = pipe
    a.send_bytes(b"12345")
    assert b.recv_bytes(5, timeout=RECV_TIMEOUT) == b"12345"


@pytest.mark.parametrize("size", [6, 70 * KiB])
def test_recv_bytes_maxlength_exceeded_raises_oserror_and_stops_reading_like_multiprocessing(
        pipe, mp_pipe, size):
    a, b = pipe
    mp_a, mp_b = mp_pipe
    payload = make_payload(size)
    mp_sender = Background(mp_a.send_bytes, payload)
    sender = Background(send_all_bytes, a, [payload])
    with pytest.raises(OSError) as mp_error:
        mp_b.recv_bytes(5)
    with pytest.raises(OSError) as lf_error:
        b.recv_bytes(5, timeout=RECV_TIMEOUT)
    assert str(lf_error.value) == str(mp_error.value)
    # reading is over on this end, as in multiprocessing; writing still works
    with pytest.raises(OSError) as mp_again:
        mp_b.recv_bytes()
    with pytest.raises(OSError) as lf_again:
        b.recv_bytes(timeout=RECV_TIMEOUT)
    # multiprocessing's words, then why (on a two-way channel "write-only" alone misleads)
    assert str(lf_again.value).startswith(str(mp_again.value) + " since recv_bytes(maxlength=5)")
    assert not b.readable
    b.send_bytes(b"still writable")
    assert a.recv_bytes(timeout=RECV_TIMEOUT) == b"still writable"
    sender.result()
    mp_sender.result()


def test_recv_bytes_maxlength_exceeded_on_a_read_only_end_closes_it_like_multiprocessing():
    mp_r, mp_w = multiprocessing.Pipe(duplex=False)
    r, w = loopfast.Pipe(duplex=False)
    with mp_r, mp_w, r, w:
        mp_w.send_bytes(b"too long")
        w.send_bytes(b"too long")
        with pytest.raises(OSError) as mp_error:
            mp_r.recv_bytes(3)
        with pytest.raises(OSError) as lf_error:
            r.recv_bytes(3, timeout=RECV_TIMEOUT)
        assert str(lf_error.value) == str(mp_error.value)
        assert r.closed == mp_r.closed is True


def test_recv_bytes_negative_maxlength_raises_valueerror_like_multiprocessing(pipe, mp_pipe):
    a, b = pipe
    _, mp_b = mp_pipe
    with pytest.raises(ValueError) as mp_error:
        mp_b.recv_bytes(-1)
    with pytest.raises(ValueError) as lf_error:
        b.recv_bytes(-1)
    assert str(lf_error.value) == str(mp_error.value)
    a.send_bytes(b"ok")
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"ok"


# ---- objects -------------------------------------------------------------------------------------

def _nested(depth):
    value = {"leaf": list(range(5)), "none": None}
    for i in range(depth):
        value = {"level": i, "child": value, "items": [value, (i, str(i))]}
    return value


OBJECTS = [
    None,
    0,
    "text é",
    b"bytes",
    [1, 2.5, "three", None, [4]],
    {"a": 1, "b": [1, 2, {"c": (3, 4)}], 5: None},
    {"big": bytes(make_payload(3 * MiB)), "list": list(range(100000))},
    _nested(12),
]


@pytest.mark.parametrize("obj", OBJECTS,
                         ids=[type(o).__name__ + str(i) for i, o in enumerate(OBJECTS)])
def test_send_and_recv_round_trip_objects(pipe, obj):
    a, b = pipe
    sender = Background(lambda: a.send(obj, timeout=RECV_TIMEOUT))
    assert b.recv(timeout=RECV_TIMEOUT) == obj
    sender.result()


def test_objects_carrying_numpy_arrays_and_bytearrays_round_trip(pipe):
    np = pytest.importorskip("numpy")
    a, b = pipe
    obj = buffer_rich_object(np)
    sender = Background(lambda: a.send(obj, timeout=RECV_TIMEOUT))
    assert_same_object(b.recv(timeout=RECV_TIMEOUT), obj)
    sender.result()


def test_objects_with_buffers_interleaved_with_byte_messages_keep_the_stream_whole(pipe):
    np = pytest.importorskip("numpy")
    a, b = pipe
    objects = [buffer_rich_object(np), {"one": bytearray(b"1")}, [np.arange(10)],
               buffer_rich_object(np, big=3 * MiB)]

    def send_mixed():
        for i, obj in enumerate(objects):
            a.send(obj, timeout=RECV_TIMEOUT)
            a.send_bytes(make_payload(i * 50 * KiB, seed=i), timeout=RECV_TIMEOUT)

    sender = Background(send_mixed)
    for i, obj in enumerate(objects):
        assert_same_object(b.recv(timeout=RECV_TIMEOUT), obj)
        assert b.recv_bytes(timeout=RECV_TIMEOUT) == make_payload(i * 50 * KiB, seed=i)
    sender.result()


def test_tiny_timeouts_while_a_large_object_with_buffers_streams_in_lose_nothing(pipe):
    np = pytest.importorskip("numpy")
    a, b = pipe
    obj = buffer_rich_object(np, big=32 * MiB)
    sender = Background(lambda: (a.send(obj, timeout=RECV_TIMEOUT),
                                 a.send_bytes(b"after", timeout=RECV_TIMEOUT)))
    assert_same_object(_receive_with_tiny_timeouts(lambda: b.recv(timeout=0.0005)), obj)
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"after"
    sender.result()


def test_recv_bytes_of_a_sent_object_is_its_pickle(pipe):
    a, b = pipe
    a.send({"x": 1})
    assert pickle.loads(b.recv_bytes(timeout=RECV_TIMEOUT)) == {"x": 1}


@pytest.mark.parametrize("unpicklable", [
    lambda: (lambda: None),
    lambda: [1, 2, threading.Lock()],
    lambda: {"ok": 1, "gen": (i for i in range(3))},
], ids=["lambda", "lock-in-list", "generator-in-dict"])
def test_unpicklable_object_raises_on_the_sender_and_the_stream_stays_usable(pipe, unpicklable):
    a, b = pipe
    a.send("before")
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        a.send(unpicklable())
    a.send("after")
    assert b.recv(timeout=RECV_TIMEOUT) == "before"
    assert b.recv(timeout=RECV_TIMEOUT) == "after"
    assert not b.poll()


# ---- poll ----------------------------------------------------------------------------------------

def test_poll_without_argument_returns_false_at_once_when_nothing_arrived(pipe):
    _, b = pipe
    assert b.poll() is False


def test_poll_returns_true_when_a_message_is_waiting(pipe):
    a, b = pipe
    a.send_bytes(b"x")
    assert b.poll(RECV_TIMEOUT) is True
    assert b.poll() is True


def test_poll_none_waits_for_a_message(pipe):
    a, b = pipe
    timer = threading.Timer(0.2, a.send_bytes, (b"late",))
    timer.start()
    try:
        assert b.poll(None) is True
    finally:
        timer.join(RECV_TIMEOUT)
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"late"


@pytest.mark.parametrize("timeout", [-1, -0.5, -1e9])
def test_poll_negative_timeout_means_zero(pipe, timeout):
    a, b = pipe
    assert b.poll(timeout) is False
    a.send_bytes(b"x")
    assert b.poll(RECV_TIMEOUT)
    assert b.poll(timeout) is True


def test_poll_with_a_timeout_returns_false_when_nothing_arrives(pipe):
    _, b = pipe
    assert b.poll(0.05) is False


@pytest.mark.parametrize("size", [0, 10, 20 * KiB, 100 * KiB, 8 * MiB])
def test_poll_never_consumes_a_message(pipe, size):
    a, b = pipe
    payload = make_payload(size)
    sender = Background(send_all_bytes, a, [payload, b"second"])
    for _ in range(5):
        assert b.poll(RECV_TIMEOUT) is True
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == payload
    assert b.poll(RECV_TIMEOUT) is True
    assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"second"
    sender.result()
    assert b.poll() is False


def test_poll_true_on_a_partial_frame_does_not_split_it(raw_peer):
    channel, raw = raw_peer
    data = frame(b"whole message")
    raw.sendall(data[:7])
    assert channel.poll(RECV_TIMEOUT) is True
    raw.sendall(data[7:])
    assert channel.recv_bytes(timeout=RECV_TIMEOUT) == b"whole message"


# ---- timeouts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["recv_bytes", "recv_bytes_into", "recv"])
def test_receive_timeout_raises_timeouterror_and_next_call_gets_the_message(pipe, how):
    a, b = pipe
    with pytest.raises(TimeoutError):
        receive(b, how, timeout=0.05)
    with pytest.raises(TimeoutError):
        receive(b, how, timeout=0)
    if how == "recv":
        a.send({"n": 1})
        a.send({"n": 2})
        assert receive(b, how) == {"n": 1}
        assert receive(b, how) == {"n": 2}
    else:
        a.send_bytes(b"one")
        a.send_bytes(b"two")
        assert receive(b, how) == b"one"
        assert receive(b, how) == b"two"


# Where the peer stops in the middle of a frame: inside the header, right after it, inside a small
# payload, inside a payload of the direct-read size (> 64 KiB).
CUTS = [
    ("mid-header", 100, 7),
    ("header-only", 100, 16),
    ("mid-small-payload", 20 * KiB, 16 + 10 * KiB),
    ("mid-large-payload", 1 * MiB, 16 + 300 * KiB),
    ("large-header-only", 1 * MiB, 16),
]


def _frame_for(how, size):
    """(encoded frame, value the receiver should get) for a message of about `size` bytes."""
    if how == "recv":
        obj = {"data": make_payload(size)}
        return frame(pickle.dumps(obj), KIND_PICKLE), obj
    payload = make_payload(size)
    return frame(payload), payload


@pytest.mark.parametrize("how", ["recv_bytes", "recv_bytes_into", "recv"])
@pytest.mark.parametrize("case, size, cut", CUTS, ids=[c[0] for c in CUTS])
def test_timeout_in_the_middle_of_a_frame_leaves_the_stream_intact(raw_peer, how, case, size, cut):
    channel, raw = raw_peer
    data, expected = _frame_for(how, size)
    first = Background(raw.sendall, data[:cut])
    with pytest.raises(TimeoutError):
        receive(channel, how, timeout=0.2)
    with pytest.raises(TimeoutError):
        receive(channel, how, timeout=0)
    first.result()
    rest = Background(raw.sendall, data[cut:] + frame(pickle.dumps("next"), KIND_PICKLE))
    assert receive(channel, how) == expected
    assert channel.recv(timeout=RECV_TIMEOUT) == "next"
    rest.result()


def test_timeout_in_recv_bytes_into_then_recv_bytes_resumes_the_same_message(raw_peer):
    channel, raw = raw_peer
    payload = make_payload(2 * MiB)
    data = frame(payload)
    first = Background(raw.sendall, data[:1 * MiB])
    with pytest.raises(TimeoutError):
        channel.recv_bytes_into(bytearray(3 * MiB), timeout=0.2)
    first.result()
    rest = Background(raw.sendall, data[1 * MiB:])
    assert channel.recv_bytes(timeout=RECV_TIMEOUT) == payload
    rest.result()


def test_timeout_in_recv_bytes_then_recv_bytes_into_resumes_the_same_message(raw_peer):
    channel, raw = raw_peer
    payload = make_payload(2 * MiB)
    data = frame(payload)
    first = Background(raw.sendall, data[:1 * MiB])
    with pytest.raises(TimeoutError):
        channel.recv_bytes(timeout=0.2)
    first.result()
    rest = Background(raw.sendall, data[1 * MiB:])
    buf = bytearray(2 * MiB)
    assert channel.recv_bytes_into(buf, timeout=RECV_TIMEOUT) == 2 * MiB
    assert buf == payload
    rest.result()


def _receive_with_tiny_timeouts(receive_once, limit=120.0):
    """Call receive_once() with a tiny timeout until it returns; give up after `limit` s."""
    give_up = time.monotonic() + limit
    while True:
        try:
            return receive_once()
        except TimeoutError:
            if time.monotonic() > give_up:
                raise


@pytest.mark.parametrize("how", ["recv_bytes", "recv_bytes_into", "recv"])
def test_tiny_timeouts_while_a_64_mib_message_streams_in_lose_nothing(pipe, how):
    a, b = pipe
    payload = make_payload(64 * MiB)
    if how == "recv":
        sender = Background(lambda: (a.send(("big", payload), timeout=RECV_TIMEOUT),
                                     a.send("after", timeout=RECV_TIMEOUT)))
        got = _receive_with_tiny_timeouts(lambda: b.recv(timeout=0.0005))
        assert got == ("big", payload)
        assert b.recv(timeout=RECV_TIMEOUT) == "after"
    elif how == "recv_bytes":
        sender = Background(send_all_bytes, a, [payload, b"after"])
        got = _receive_with_tiny_timeouts(lambda: b.recv_bytes(timeout=0.0005))
        assert got == payload
        assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"after"
    else:
        sender = Background(send_all_bytes, a, [payload, b"after"])
        buf = bytearray(64 * MiB)
        n = _receive_with_tiny_timeouts(lambda: b.recv_bytes_into(buf, timeout=0.0005))
        assert n == 64 * MiB
        assert buf == payload
        assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"after"
    sender.result()


@pytest.mark.parametrize("how", ["send_bytes", "send"])
def test_send_timeout_part_way_then_the_rest_goes_out_before_the_next_message(pipe, how):
    a, b = pipe
    payload = make_payload(64 * MiB)  # far more than the socket buffers hold: nobody is reading
    with pytest.raises(TimeoutError):
        if how == "send":
            a.send(payload, timeout=0.2)
        else:
            a.send_bytes(payload, timeout=0.2)
    reader = Background(recv_n_bytes, b, 2)
    a.send_bytes(b"next", timeout=RECV_TIMEOUT)
    first, second = reader.result()
    assert (pickle.loads(first) if how == "send" else first) == payload
    assert second == b"next"


def test_repeated_send_timeouts_keep_the_stream_whole(pipe):
    """After a large send times out part-way, further sends that time out while the rest of it is
    still stuck must keep that rest queued: the reader still gets whole messages in order."""
    a, b = pipe
    payload = make_payload(64 * MiB)
    with pytest.raises(TimeoutError):
        a.send_bytes(payload, timeout=0.2)
    retries = [b"retry-%d" % i for i in range(4)]
    for message in retries:
        with pytest.raises(TimeoutError):
            a.send_bytes(message, timeout=0.05)
    received = []

    def read_until_final():
        while True:
            received.append(b.recv_bytes(timeout=RECV_TIMEOUT))
            if received[-1] == b"final":
                return

    reader = Background(read_until_final)
    a.send_bytes(b"final", timeout=RECV_TIMEOUT)
    a.close()  # a broken stream then ends in ProtocolError at once instead of a receive timeout
    reader.result()
    assert received[0] == payload
    assert received[-1] == b"final"
    # A retry whose send timed out was either sent whole or not at all; order is kept.
    middle = received[1:-1]
    assert middle == [m for m in retries if m in middle]


# ---- a peer that writes one byte at a time -------------------------------------------------------

def test_frames_written_one_byte_at_a_time_arrive_whole(raw_peer):
    channel, raw = raw_peer
    messages = [b"", b"x", make_payload(20 * KiB), make_payload(70 * KiB, seed=1)]
    obj = {"key": [1, 2, 3], "text": "one byte at a time"}
    stream = b"".join(frame(m) for m in messages) + frame(pickle.dumps(obj), KIND_PICKLE)

    def trickle():
        for i in range(len(stream)):
            raw.sendall(stream[i:i + 1])

    writer = Background(trickle)
    for i, expected in enumerate(messages):
        if i % 2:
            buf = bytearray(len(expected))
            assert channel.recv_bytes_into(buf, timeout=RECV_TIMEOUT) == len(expected)
            assert buf == expected
        else:
            assert channel.recv_bytes(timeout=RECV_TIMEOUT) == expected
    assert channel.recv(timeout=RECV_TIMEOUT) == obj
    writer.result()


# ---- many small messages both ways at once -------------------------------------------------------

def _numbered(tag, count):
    return [b"%s-%06d-" % (tag, i) + bytes([i % 256]) * (i % 300) for i in range(count)]


def test_thousands_of_small_messages_in_both_directions_at_once(pipe):
    a, b = pipe
    count = 5000
    a_to_b, b_to_a = _numbered(b"ab", count), _numbered(b"ba", count)
    workers = [
        Background(send_all_bytes, a, a_to_b),
        Background(send_all_bytes, b, b_to_a),
        Background(recv_n_bytes, b, count),
        Background(recv_n_bytes, a, count),
    ]
    workers[0].result()
    workers[1].result()
    assert workers[2].result() == a_to_b
    assert workers[3].result() == b_to_a


def test_thousands_of_small_objects_in_both_directions_at_once(pipe):
    a, b = pipe
    count = 3000

    def send_objects(channel, tag):
        for i in range(count):
            channel.send((tag, i, "x" * (i % 50)), timeout=RECV_TIMEOUT)

    def recv_objects(channel):
        return [channel.recv(timeout=RECV_TIMEOUT) for _ in range(count)]

    workers = [Background(send_objects, a, "ab"), Background(send_objects, b, "ba"),
               Background(recv_objects, b), Background(recv_objects, a)]
    workers[0].result()
    workers[1].result()
    assert workers[2].result() == [("ab", i, "x" * (i % 50)) for i in range(count)]
    assert workers[3].result() == [("ba", i, "x" * (i % 50)) for i in range(count)]


# ---- EOF and a peer that vanishes mid-frame ------------------------------------------------------

@pytest.mark.parametrize("how", ["recv_bytes", "recv_bytes_into", "recv"])
def test_peer_closing_between_messages_gives_eoferror_after_every_message(pipe, how):
    a, b = pipe
    if how == "recv":
        for i in range(3):
            a.send(i)
    else:
        for message in (b"one", b"", b"three"):
            a.send_bytes(message)
    a.close()
    expected = [0, 1, 2] if how == "recv" else [b"one", b"", b"three"]
    assert [receive(b, how) for _ in range(3)] == expected
    with pytest.raises(EOFError):
        receive(b, how)
    with pytest.raises(EOFError):
        receive(b, how)


def test_eof_after_large_messages_delivers_them_all_first(pipe):
    a, b = pipe
    messages = [make_payload(s) for s in (10, 70 * KiB, 3 * MiB, 0)]

    def send_and_close():
        send_all_bytes(a, messages)
        a.close()

    sender = Background(send_and_close)
    assert recv_n_bytes(b, len(messages)) == messages
    with pytest.raises(EOFError):
        b.recv_bytes(timeout=RECV_TIMEOUT)
    sender.result()


def test_poll_reports_eof_as_readable_and_recv_raises_eoferror(pipe):
    a, b = pipe
    a.close()
    assert b.poll(RECV_TIMEOUT) is True
    with pytest.raises(EOFError):
        b.recv_bytes(timeout=RECV_TIMEOUT)


@pytest.mark.parametrize("how", ["recv_bytes", "recv_bytes_into", "recv"])
@pytest.mark.parametrize("case, size, cut", CUTS, ids=[c[0] for c in CUTS])
def test_peer_closing_mid_frame_raises_protocolerror_after_the_earlier_messages(
        raw_peer, how, case, size, cut):
    channel, raw = raw_peer
    earlier = [_frame_for(how, n) for n in (5, 70 * KiB)]
    data, _ = _frame_for(how, size)

    def send_then_close():
        raw.sendall(b"".join(f for f, _ in earlier) + data[:cut])
        raw.close()

    writer = Background(send_then_close)
    for _, expected in earlier:
        assert receive(channel, how) == expected
    with pytest.raises(loopfast.ProtocolError):
        receive(channel, how)
    writer.result()
    assert channel.closed
    with pytest.raises(OSError):
        receive(channel, how)


# ---- Ctrl-C --------------------------------------------------------------------------------------

needs_sigint = pytest.mark.skipif(os.name == "nt", reason="needs POSIX signals")
# method="thread": if the core ignored signals, a signal-based test timeout could not stop it.
ctrl_c_timeout = pytest.mark.timeout(120, method="thread")


@needs_sigint
@ctrl_c_timeout
@pytest.mark.parametrize("timeout", [None, 60.0])
@pytest.mark.parametrize("how", ["recv_bytes", "recv_bytes_into", "recv"])
def test_ctrl_c_interrupts_a_blocked_receive_promptly(pipe, timeout, how):
    a, b = pipe
    assert_interrupted_promptly(*call_with_ctrl_c(lambda: receive(b, how, timeout=timeout)))
    if how == "recv":
        a.send("after")
    else:
        a.send_bytes(b"after")
    assert receive(b, how) in ("after", b"after")


@needs_sigint
@ctrl_c_timeout
@pytest.mark.parametrize("how", ["recv_bytes", "recv_bytes_into"])
def test_ctrl_c_in_the_middle_of_a_large_message_keeps_the_stream_whole(raw_peer, how):
    channel, raw = raw_peer
    payload = make_payload(1 * MiB)
    data = frame(payload)
    first = Background(raw.sendall, data[:300 * KiB])
    assert_interrupted_promptly(*call_with_ctrl_c(lambda: receive(channel, how, timeout=60.0)))
    first.result()
    rest = Background(raw.sendall, data[300 * KiB:] + frame(b"next"))
    assert receive(channel, how) == payload
    assert channel.recv_bytes(timeout=RECV_TIMEOUT) == b"next"
    rest.result()


@needs_sigint
@ctrl_c_timeout
def test_ctrl_c_interrupts_a_blocked_send_and_the_stream_stays_whole(pipe):
    a, b = pipe
    payload = make_payload(64 * MiB)  # more than the socket buffers: blocks with nobody reading
    assert_interrupted_promptly(*call_with_ctrl_c(lambda: a.send_bytes(payload, timeout=60.0)))
    reader = Background(recv_n_bytes, b, 2)
    a.send_bytes(b"next", timeout=RECV_TIMEOUT)
    assert reader.result() == [payload, b"next"]


# ---- closed channels, context manager, directions ------------------------------------------------

CHANNEL_CALLS = {
    "send": lambda ch: ch.send(1),
    "send_bytes": lambda ch: ch.send_bytes(b"x"),
    "recv": lambda ch: ch.recv(timeout=1),
    "recv_bytes": lambda ch: ch.recv_bytes(timeout=1),
    "recv_bytes_maxlength": lambda ch: ch.recv_bytes(10, timeout=1),
    "recv_bytes_into": lambda ch: ch.recv_bytes_into(bytearray(10), timeout=1),
    "poll": lambda ch: ch.poll(),
    "poll_none": lambda ch: ch.poll(None),
    "fileno": lambda ch: ch.fileno(),
}


@pytest.mark.parametrize("call", list(CHANNEL_CALLS), ids=list(CHANNEL_CALLS))
def test_every_method_of_a_closed_channel_raises_oserror(pipe, call):
    a, b = pipe
    a.send_bytes(b"pending")  # even with data waiting
    b.close()
    with pytest.raises(OSError):
        CHANNEL_CALLS[call](b)


def test_close_twice_is_fine_and_closed_reports_it(pipe):
    a, _ = pipe
    assert a.closed is False
    a.close()
    assert a.closed is True
    a.close()
    assert a.closed is True


def test_context_manager_closes_the_channel(family):
    a, b = loopfast.Pipe(family=family)
    with a as entered, b:
        assert entered is a
        a.send_bytes(b"in block")
        assert b.recv_bytes(timeout=RECV_TIMEOUT) == b"in block"
    assert a.closed and b.closed


def test_duplex_pipe_ends_are_readable_and_writable(pipe):
    a, b = pipe
    assert (a.readable, a.writable, b.readable, b.writable) == (True, True, True, True)


def test_one_way_pipe_directions(family):
    r, w = loopfast.Pipe(duplex=False, family=family)
    with r, w:
        assert (r.readable, r.writable) == (True, False)
        assert (w.readable, w.writable) == (False, True)
        w.send_bytes(b"one way")
        assert r.recv_bytes(timeout=RECV_TIMEOUT) == b"one way"


WRONG_DIRECTION = {
    "reader.send": lambda r, w: r.send(1),
    "reader.send_bytes": lambda r, w: r.send_bytes(b"x"),
    "writer.recv": lambda r, w: w.recv(),
    "writer.recv_bytes": lambda r, w: w.recv_bytes(),
    "writer.recv_bytes_into": lambda r, w: w.recv_bytes_into(bytearray(4)),
    "writer.poll": lambda r, w: w.poll(),
}


@pytest.mark.parametrize("call", list(WRONG_DIRECTION), ids=list(WRONG_DIRECTION))
def test_one_way_pipe_wrong_direction_raises_oserror_like_multiprocessing(family, call):
    mp_r, mp_w = multiprocessing.Pipe(duplex=False)
    r, w = loopfast.Pipe(duplex=False, family=family)
    with mp_r, mp_w, r, w:
        with pytest.raises(OSError) as mp_error:
            WRONG_DIRECTION[call](mp_r, mp_w)
        with pytest.raises(OSError) as lf_error:
            WRONG_DIRECTION[call](r, w)
        assert str(lf_error.value) == str(mp_error.value)
        # and the right direction still works
        w.send_bytes(b"fine")
        assert r.recv_bytes(timeout=RECV_TIMEOUT) == b"fine"


# ---- wait() --------------------------------------------------------------------------------------

def test_wait_returns_the_channels_that_have_data(family):
    pairs = [loopfast.Pipe(family=family) for _ in range(3)]
    try:
        pairs[1][0].send_bytes(b"one")
        readers = [b for _, b in pairs]
        assert loopfast.wait(readers, timeout=RECV_TIMEOUT) == [readers[1]]
        pairs[2][0].send_bytes(b"two")
        for _ in range(100):  # until the kernel reports both readable (bounded)
            ready = loopfast.wait(readers, timeout=RECV_TIMEOUT)
            if len(ready) == 2:
                break
        assert sorted(ready, key=readers.index) == [readers[1], readers[2]]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_wait_timeout_returns_empty_list(pipe):
    _, b = pipe
    assert loopfast.wait([b], timeout=0.05) == []
    assert loopfast.wait([b], timeout=0) == []


def test_wait_without_timeout_waits_for_data(pipe):
    a, b = pipe
    timer = threading.Timer(0.2, a.send_bytes, (b"late",))
    timer.start()
    try:
        assert loopfast.wait([b]) == [b]
    finally:
        timer.join(RECV_TIMEOUT)


def test_every_wait_reports_a_channel_ready_while_a_whole_frame_is_queued(raw_peer):
    channel, raw = raw_peer
    raw.sendall(frame(b"first") + frame(b"second"))  # one segment: both frames queued at once
    assert channel.recv_bytes(timeout=RECV_TIMEOUT) == b"first"
    # A receive takes from the socket only what it returns: the second frame waits in the
    # kernel, so multiprocessing's wait and select see the channel ready, as loopfast's wait does.
    assert multiprocessing.connection.wait([channel], timeout=0) == [channel]
    assert select.select([channel], [], [], 0)[0] == [channel]
    assert loopfast.wait([channel], timeout=0) == [channel]
    assert loopfast.wait([channel]) == [channel]
    assert channel.recv_bytes(timeout=0) == b"second"
    # Every message received: no wait reports the channel any more.
    assert loopfast.wait([channel], timeout=0) == []
    assert multiprocessing.connection.wait([channel], timeout=0) == []
    assert select.select([channel], [], [], 0)[0] == []


def test_wait_reports_a_queued_partial_frame_as_the_socket_does(raw_peer):
    channel, raw = raw_peer
    second = frame(b"second")
    raw.sendall(frame(b"first") + second[:5])
    assert channel.recv_bytes(timeout=RECV_TIMEOUT) == b"first"
    # The first 5 bytes of the next frame wait in the socket: the OS reports it readable, and
    # loopfast's wait reports what the socket does.
    assert multiprocessing.connection.wait([channel], timeout=0) == [channel]
    assert loopfast.wait([channel], timeout=0) == [channel]
    # The frame is not whole: a receive with a short timeout times out ...
    with pytest.raises(TimeoutError):
        channel.recv_bytes(timeout=0.05)
    assert loopfast.wait([channel], timeout=0) == \
        multiprocessing.connection.wait([channel], timeout=0)
    # ... and the stream stays intact: the rest completes the same frame.
    raw.sendall(second[5:])
    assert loopfast.wait([channel], timeout=RECV_TIMEOUT) == [channel]
    assert multiprocessing.connection.wait([channel], timeout=RECV_TIMEOUT) == [channel]
    assert channel.recv_bytes(timeout=RECV_TIMEOUT) == b"second"
    assert loopfast.wait([channel], timeout=0) == []
    raw.sendall(frame(b"third"))
    assert channel.recv_bytes(timeout=RECV_TIMEOUT) == b"third"


def test_wait_accepts_plain_sockets_alongside_channels(pipe):
    _, b = pipe
    s1, s2 = socket.socketpair()
    with s1, s2:
        assert loopfast.wait([b, s2], timeout=0) == []
        s1.sendall(b"ping")
        assert loopfast.wait([b, s2], timeout=RECV_TIMEOUT) == [s2]


def test_wait_accepts_objects_with_fileno(pipe):
    a, b = pipe

    class HasFileno:
        def __init__(self, fd):
            self.fd = fd

        def fileno(self):
            return self.fd

    read_fd, write_fd = os.pipe()
    try:
        wrapper = HasFileno(read_fd)
        assert loopfast.wait([wrapper, b], timeout=0) == []
        os.write(write_fd, b"x")
        assert loopfast.wait([wrapper, b], timeout=RECV_TIMEOUT) == [wrapper]
        a.send_bytes(b"y")
        ready = []
        for _ in range(100):  # until both are reported (bounded)
            ready = loopfast.wait([wrapper, b], timeout=RECV_TIMEOUT)
            if len(ready) == 2:
                break
        assert len(ready) == 2 and wrapper in ready and b in ready
    finally:
        os.close(read_fd)
        os.close(write_fd)
