"""Object messages: pickle protocol 5 with out-of-band buffers (frame kind 3), docs/protocol.md
"Objects".

Every behaviour runs on both implementations, the compiled channel and its pure-Python twin (the
`impl` fixture); round trips also run between the two, in both directions (the `link` fixture);
a representative subset runs across real processes (fork and spawn, each implementation in the
child). The wire format is written out here from the specification (`object_frame`), not
imported from loopfast, so the tests check the spec and not merely agree with the code.

numpy is a test dependency only: tests that need it take the `np` fixture, and one test checks
that loopfast imports and sends objects with numpy made unimportable. Every wait is bounded and
no outcome depends on how long anything takes.
"""

import contextlib
import json
import multiprocessing
import os
import pickle
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import tracemalloc

import pytest
from conftest import (
    IMPLEMENTATIONS,
    Background,
    assert_interrupted_promptly,
    available_memory,
    call_with_ctrl_c,
    connected_pair,
    socket_buffer_bound,
)

import loopfast
from loopfast._core import channel_py as _channel_py

# The twins side by side: where the extension is not built, there is nothing to compare.
_channel = pytest.importorskip("loopfast._core.channel",
                               reason="the compiled extension is not built")
pytestmark = pytest.mark.compiled

COMPILED = _channel.Channel
PURE = _channel_py.Channel
# What loopfast.implementation says in a process that uses each one.
IMPLEMENTATION_NAMES = {"compiled": "compiled", "pure": "python"}

# Upper bounds that only stop a broken test from hanging.
TIMEOUT = 30.0
JOIN_TIMEOUT = 60.0
# A timeout meant to expire: the data it waits for is not sent before it does.
EXPIRES = 0.1

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# ---- the wire format, from docs/protocol.md ------------------------------------------------------
FRAME_HEADER = struct.Struct("<BBHIQ")  # kind, flags, reserved, count, length
KIND_BYTES, KIND_PICKLE, KIND_OBJECT = 1, 2, 3
MAX_BUFFERS = 8191   # most out-of-band buffers in one object message
OOB_MIN_SIZE = 4096  # loopfast's senders keep smaller buffers in band

NOT_PICKLABLE = (pickle.PicklingError, TypeError, AttributeError)


def frame(payload, kind=KIND_BYTES):
    """A kind 1 or 2 frame."""
    return FRAME_HEADER.pack(kind, 0, 0, 0, len(payload)) + bytes(payload)


def object_head(count, length, sizes):
    """Header and size table of an object message (any values, for bad-input tests)."""
    return FRAME_HEADER.pack(KIND_OBJECT, 0, 0, count, length) + struct.pack(
        f"<{len(sizes)}Q", *sizes)


def split_for_the_wire(obj):
    """(pickle, out-of-band buffers) of `obj` as a loopfast sender makes them: protocol 5, buffers
    of 4096 bytes or more out of band."""
    buffers = []

    def keep_large(pickle_buffer):
        raw = pickle_buffer.raw()
        if raw.nbytes < OOB_MIN_SIZE:
            return True
        buffers.append(bytes(raw))
        return False

    return pickle.dumps(obj, protocol=5, buffer_callback=keep_large), buffers


def object_frame(obj):
    """The whole frame that send(obj) writes when `obj` has 1..8191 large buffers."""
    data, buffers = split_for_the_wire(obj)
    assert 1 <= len(buffers) <= MAX_BUFFERS
    sizes = [len(data)] + [len(b) for b in buffers]
    length = 8 * len(sizes) + sum(sizes)
    return object_head(len(buffers), length, sizes) + data + b"".join(buffers)


def head_size(wire):
    """Bytes of header + size table at the start of an object frame."""
    return FRAME_HEADER.size + 8 * (FRAME_HEADER.unpack_from(wire)[3] + 1)


def part_sizes(wire):
    count = FRAME_HEADER.unpack_from(wire)[3]
    return struct.unpack_from(f"<{count + 1}Q", wire, FRAME_HEADER.size)


# ---- channels ------------------------------------------------------------------------------------

@contextlib.contextmanager
def channel_and_raw_socket(cls, **options):
    """A channel and a plain socket at the other end of its connection (no handshake: the
    socket reads and writes frames as they are on the wire)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        listening.settimeout(TIMEOUT)
        raw = socket.create_connection(listening.getsockname(), timeout=TIMEOUT)
        accepted, _ = listening.accept()
    with raw, cls(accepted.detach(), **options) as channel:
        raw.settimeout(TIMEOUT)
        yield channel, raw


def recv_exactly(sock, size):
    received = bytearray()
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        assert chunk, "the channel's socket closed early"
        received += chunk
    return bytes(received)


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def np():
    return pytest.importorskip("numpy")


@pytest.fixture
def pair(make_pair):
    return make_pair()


LINKS = {"compiled": (COMPILED, COMPILED), "pure": (PURE, PURE),
         "compiled-to-pure": (COMPILED, PURE), "pure-to-compiled": (PURE, COMPILED)}


@pytest.fixture(params=sorted(LINKS))
def link(request):
    """(sender, receiver): each implementation with itself, and each sending to the other."""
    sender, receiver = connected_pair(*LINKS[request.param])
    yield sender, receiver
    sender.close()
    receiver.close()


def round_trip(link, obj):
    sender, receiver = link
    sending = Background(sender.send, obj, timeout=TIMEOUT)
    got = receiver.recv(timeout=TIMEOUT)
    sending.result()
    return got


# ---- comparing what arrived ----------------------------------------------------------------------

def reference_round_trip(obj):
    """What pickle itself gives back for `obj` sent at protocol 5 with out-of-band buffers
    received as writable bytearrays: the oracle for types and flags."""
    data, buffers = split_for_the_wire(obj)
    return pickle.loads(data, buffers=[bytearray(b) for b in buffers])


def assert_same_array(got, expected):
    """Same type, dtype, shape, values and memory order; a non-contiguous array arrives as a
    C-ordered copy, as pickle makes it."""
    numpy = sys.modules["numpy"]
    assert type(got) is numpy.ndarray
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    if expected.flags.c_contiguous or expected.flags.f_contiguous:
        assert got.flags.c_contiguous == expected.flags.c_contiguous
        assert got.flags.f_contiguous == expected.flags.f_contiguous
    else:
        assert got.flags.c_contiguous
    assert numpy.array_equal(got, expected)


def assert_writable(array):
    assert array.flags.writeable
    index = (0,) * array.ndim if array.size else None
    if index is not None:
        array[index] = array[(-1,) * array.ndim]  # raises if the memory is read-only


def assert_same(got, expected):
    """Deep equality that understands numpy arrays; received arrays must be writable."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(expected, numpy.ndarray):
        assert_same_array(got, expected)
        if expected.flags.writeable:
            assert_writable(got)
        return
    if isinstance(expected, pickle.PickleBuffer):
        assert type(got) is type(reference_round_trip(expected))  # bytearray, bytes, memoryview
        assert bytes(got) == bytes(expected.raw())
        return
    assert type(got) is type(expected), f"{type(got)} is not {type(expected)}"
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_same(got[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_same(g, e)
    else:
        assert got == expected


# ==== numpy arrays ================================================================================

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "longdouble", "complex64", "complex128", ">i4", "<f8",
          "datetime64[ns]", "datetime64[D]", "timedelta64[us]", "<U7", "S5", "object",
          "structured"]


def make_array(np, dtype, n):
    """n items of every kind of dtype, with values that differ from item to item."""
    if dtype == "object":
        return np.array([{"i": i} if i % 2 else f"s{i}" for i in range(n)] + [None], dtype=object)
    if dtype == "structured":
        record = np.dtype([("id", "<i4"), ("x", "<f8"), ("tag", "S3"), ("pair", "<i2", (2,))])
        out = np.zeros(n, dtype=record)
        out["id"] = np.arange(n)
        out["x"] = np.arange(n) * 0.5
        out["tag"] = [b"t%d" % (i % 10) for i in range(n)]
        out["pair"] = np.arange(2 * n).reshape(n, 2)
        return out
    if dtype.startswith(("<U", "S")):
        return np.array([f"v{i % 10000}" for i in range(n)], dtype=dtype)
    if dtype.startswith(("datetime64", "timedelta64")):
        return np.arange(n, dtype=np.int64).astype(dtype)
    if dtype.startswith("complex"):
        return (np.arange(n) % 1000 + 1j * (np.arange(n) % 7)).astype(dtype)
    if dtype == "bool":
        return np.arange(n) % 3 == 0
    return (np.arange(n) % 100).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arrays_of_every_dtype_round_trip_in_band_and_out_of_band(link, np, dtype):
    """Seven items stay in the pickle; 20,000 (at least 20 kB) travel out of band, except object
    arrays, which numpy always pickles in band."""
    for n in (7, 20_000):
        sent = make_array(np, dtype, n)
        got = round_trip(link, sent)
        assert_same_array(got, sent)
        assert_writable(got)


LAYOUTS = {
    "0-d": lambda np: np.array(3.25),
    "0-d-structured": lambda np: np.zeros((), dtype=[("a", "<i4"), ("b", "<f8")]),
    "empty": lambda np: np.zeros(0, dtype=np.float64),
    "empty-2-d": lambda np: np.zeros((0, 5), dtype=np.int32),
    "c-order-3-d": lambda np: np.arange(60_000, dtype=np.int32).reshape(30, 40, 50),
    "fortran-order": lambda np: np.asfortranarray(np.arange(20_000.0).reshape(100, 200)),
    "small-fortran-order": lambda np: np.asfortranarray(np.arange(12).reshape(3, 4)),
    "fortran-order-3-d": lambda np: np.asfortranarray(
        np.arange(24_000, dtype=np.int16).reshape(20, 30, 40)),
    "transposed": lambda np: np.arange(20_000.0).reshape(100, 200).T,
    "every-third-item": lambda np: np.arange(60_000, dtype=np.int64)[::3],
    "every-other-column": lambda np: np.arange(60_000.0).reshape(300, 200)[:, ::2],
    "reversed": lambda np: np.arange(20_000.0)[::-1],
    "sub-block": lambda np: np.arange(1_000_000, dtype=np.uint8).reshape(1000, 1000)[10:900, 5:600],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_arrays_of_every_shape_and_memory_order_round_trip(link, np, layout):
    sent = LAYOUTS[layout](np)
    got = round_trip(link, sent)
    assert_same_array(got, sent)
    assert_writable(got)


@pytest.mark.parametrize("nbytes", [16, 4095, 4096, 60 * KiB, 64 * KiB + 8, 1 * MiB, 5 * MiB + 3])
def test_arrays_below_and_above_each_threshold_round_trip(link, np, nbytes):
    """In band (< 4 KiB), out of band through the receive buffer (< 64 KiB) and out of band
    read straight into its bytearray (> 64 KiB)."""
    sent = {"array": np.frombuffer(random.Random(nbytes).randbytes(nbytes), np.uint8).copy(),
            "after": "tail"}
    got = round_trip(link, sent)
    assert_same(got, sent)


def test_an_array_travels_out_of_band_from_4096_bytes(pair, np):
    """The 4096-byte threshold: recv_bytes() takes the in-band pickle (kind 2) and refuses the
    object message (kind 3)."""
    a, b = pair
    a.send(np.zeros(4095, np.uint8))
    assert pickle.loads(b.recv_bytes(timeout=TIMEOUT)).shape == (4095,)
    a.send(np.zeros(4096, np.uint8))
    with pytest.raises(OSError, match="carries out-of-band buffers"):
        b.recv_bytes(timeout=TIMEOUT)
    assert b.recv(timeout=TIMEOUT).shape == (4096,)


def test_received_arrays_live_in_their_own_writable_memory(link, np):
    sent = [np.arange(100_000, dtype=np.float64), np.arange(10, dtype=np.int8)]
    got = round_trip(link, sent)
    assert all(array.flags.writeable for array in got)
    assert not np.shares_memory(got[0], sent[0]) and not np.shares_memory(got[0], got[1])
    got[0][:] = -1
    got[1][:] = -1
    assert (got[0] == -1).all() and (got[1] == -1).all()
    assert np.array_equal(sent[0], np.arange(100_000)) and np.array_equal(sent[1], np.arange(10))


def test_wait_reports_a_channel_with_an_object_message(pair, np):
    a, b = pair
    assert loopfast.wait([b], timeout=0) == []
    a.send(np.arange(1000))
    assert loopfast.wait([b], timeout=TIMEOUT) == [b]
    assert np.array_equal(b.recv(timeout=TIMEOUT), np.arange(1000))


def test_a_read_only_array_arrives_read_only_as_pickle_restores_it(link, np):
    """Protocol 5 carries the sender's read-only flag (READONLY_BUFFER): loopfast gives what
    pickle.loads gives, in band and out of band."""
    for n in (100, 100_000):
        sent = np.frombuffer(bytes(range(256)) * (n // 256 + 1), dtype=np.uint8)[:n]
        assert not sent.flags.writeable
        got = round_trip(link, sent)
        assert np.array_equal(got, sent)
        assert got.flags.writeable == reference_round_trip(sent).flags.writeable


def test_the_same_array_twice_arrives_as_one_object(link, np):
    array = np.arange(10_000, dtype=np.int32)
    got = round_trip(link, {"x": array, "y": array, "pair": (array, array)})
    assert got["x"] is got["y"] is got["pair"][0] is got["pair"][1]
    assert np.array_equal(got["x"], array)


# ==== other objects ===============================================================================

def many_arrays(np, count=200, seed=11):
    """`count` arrays of mixed sizes (empty, in band, out of band, large) and dtypes."""
    rng = random.Random(seed)
    dtypes = [np.uint8, np.int32, np.float64, np.complex128, np.int16]
    arrays = []
    for i in range(count):
        n = rng.choice([0, 1, 10, 500, 600, 4096, 9000, 20_000, 100_000])
        array = (np.arange(n) * (i + 1) % 251).astype(rng.choice(dtypes))
        if i % 5 == 0 and n >= 100:
            array = np.asfortranarray(array[: n // 10 * 10].reshape(-1, 10))
        arrays.append(array)
    return arrays


def test_a_nested_structure_of_200_arrays_round_trips(link, np):
    arrays = many_arrays(np)
    sent = {
        "list": arrays[:100],
        "by_name": {f"a{i}": a for i, a in enumerate(arrays[100:150])},
        "deep": [{"level": 1, "data": [(i, arrays[150 + i]) for i in range(50)]}],
        "bytes": random.Random(1).randbytes(200 * KiB),
        "bytearray": bytearray(random.Random(2).randbytes(300 * KiB)),
        "text": "h\u00e9llo",
        "numbers": [1, 2.5, 3 + 4j, None, True],
    }
    got = round_trip(link, sent)
    assert_same(got, sent)


@pytest.mark.parametrize("value", [
    pytest.param(b"", id="empty-bytes"),
    pytest.param(bytes(range(256)) * 400, id="bytes"),
    pytest.param(bytearray(b"x" * 100_000), id="bytearray"),
    pytest.param(bytearray(), id="empty-bytearray"),
    pytest.param({"k": [1, "two", 3.0, None, (4, 5)], "s": {1, 2}}, id="no-buffers"),
    pytest.param(12345678901234567890, id="int"),
    pytest.param(None, id="none"),
])
def test_objects_without_out_of_band_buffers_round_trip(link, value):
    got = round_trip(link, value)
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize("source", [bytearray, bytes])
@pytest.mark.parametrize("size", [100, 100_000])
def test_a_pickle_buffer_arrives_as_pickle_protocol_5_restores_it(link, source, size):
    """A PickleBuffer arrives as what pickle.loads makes of it: a bytearray from a writable
    buffer; from a read-only one, bytes in band or a read-only memoryview out of band."""
    data = source(random.Random(size).randbytes(size))
    got = round_trip(link, pickle.PickleBuffer(data))
    expected = reference_round_trip(pickle.PickleBuffer(data))
    assert type(got) is type(expected)
    assert bytes(got) == bytes(data)
    if isinstance(got, memoryview):
        assert got.readonly == expected.readonly


def test_a_memoryview_cannot_be_pickled_nothing_is_sent_and_the_stream_goes_on(pair):
    """pickle refuses memoryview (TypeError), as multiprocessing does; send a PickleBuffer or
    bytes instead."""
    a, b = pair
    with pytest.raises(TypeError, match="memoryview"):
        a.send({"view": memoryview(b"x" * 100_000)})
    a.send("next")
    assert b.recv(timeout=TIMEOUT) == "next"
    assert not b.poll(0)


@pytest.mark.parametrize("unpicklable", [
    pytest.param(lambda np: (lambda: 0), id="lambda"),
    pytest.param(lambda np: threading.Lock(), id="lock"),
    pytest.param(lambda np: [np.zeros(100_000), np.ones(5000), lambda: 0],
                 id="lambda-after-large-arrays"),
])
def test_an_unpicklable_object_raises_on_the_sender_and_nothing_is_sent(pair, np, unpicklable):
    a, b = pair
    obj = unpicklable(np)
    with pytest.raises(NOT_PICKLABLE) as info:
        a.send(obj)
    with pytest.raises(type(info.value)):
        pickle.dumps(obj, protocol=5)  # the pickler's own error, passed on
    a.send(np.arange(1000))  # 8000 bytes: out of band
    assert np.array_equal(b.recv(timeout=TIMEOUT), np.arange(1000))
    assert not b.poll(0)


@pytest.mark.parametrize("count", [MAX_BUFFERS, MAX_BUFFERS + 1])
def test_up_to_8191_buffers_are_one_object_message_and_more_go_in_band(pair, np, count):
    """8191 buffers: one gather write of 8193 pieces, more than IOV_MAX (1024 on Linux) at a
    time. 8192: the whole object in band, as a kind 2 message that recv_bytes() accepts."""
    a, b = pair
    sent = [np.full(OOB_MIN_SIZE // 8, i, dtype=np.int64) for i in range(count)]
    sending = Background(a.send, sent, timeout=TIMEOUT)
    if count <= MAX_BUFFERS:
        with pytest.raises(OSError, match="carries out-of-band buffers"):
            b.recv_bytes(timeout=TIMEOUT)
        got = b.recv(timeout=TIMEOUT)
    else:
        got = pickle.loads(b.recv_bytes(timeout=TIMEOUT))
    sending.result()
    assert len(got) == count
    assert all(np.array_equal(g, s) for g, s in zip(got, sent))


@pytest.mark.parametrize("cls", [
    pytest.param(COMPILED, id="compiled"),
    pytest.param(PURE, id="pure"),
])
def test_more_than_8191_pickle_buffers_go_in_band(cls):
    """Objects made of PickleBuffers (no numpy needed) with too many buffers for one object
    message are still sent: all in band, at protocol 5."""
    a, b = connected_pair(cls, cls)
    try:
        sent = [pickle.PickleBuffer(bytearray(bytes([i % 256])) * OOB_MIN_SIZE)
                for i in range(MAX_BUFFERS + 1)]
        sending = Background(a.send, sent, timeout=TIMEOUT)
        for _ in range(1000):  # until the message starts arriving, or the send fails
            if b.poll(EXPIRES) or sending.done():
                break
        if not b.poll(0):
            sending.result()  # raises the sender's error
        got = b.recv(timeout=TIMEOUT)
        sending.result()
        assert [bytes(g) for g in got] == [bytes(s.raw()) for s in sent]
    finally:
        a.close()
        b.close()


def test_8191_buffers_between_the_implementations(link, np):
    sent = [np.full(OOB_MIN_SIZE // 8, i, dtype=np.int64) for i in range(MAX_BUFFERS)]
    got = round_trip(link, sent)
    assert all(np.array_equal(g, s) for g, s in zip(got, sent))


def test_object_and_bytes_messages_interleave_both_ways_between_the_implementations(np):
    """A compiled end and a pure end send each other hundreds of mixed messages at once."""
    compiled, pure = connected_pair(COMPILED, PURE)
    try:
        def send_mixed(channel, seed):
            rng = random.Random(seed)
            for i in range(300):
                size = rng.choice([0, 100, 5000, 70_000, 300_000])
                if i % 3 == 0:
                    channel.send_bytes(random.Random(seed + i).randbytes(size), timeout=TIMEOUT)
                else:
                    message = {"i": i, "a": np.full(size // 8, i, np.int64), "s": "x" * (i % 50)}
                    channel.send(message, timeout=TIMEOUT)

        def receive_mixed(channel, seed):
            rng = random.Random(seed)
            wrong = []
            for i in range(300):
                size = rng.choice([0, 100, 5000, 70_000, 300_000])
                if i % 3 == 0:
                    expected = random.Random(seed + i).randbytes(size)
                    ok = channel.recv_bytes(timeout=TIMEOUT) == expected
                else:
                    got = channel.recv(timeout=TIMEOUT)
                    ok = (got["i"] == i and got["s"] == "x" * (i % 50)
                          and np.array_equal(got["a"], np.full(size // 8, i, np.int64)))
                if not ok:
                    wrong.append(i)
            return wrong

        senders = [Background(send_mixed, compiled, 1), Background(send_mixed, pure, 2)]
        from_compiled = Background(receive_mixed, pure, 1)
        assert receive_mixed(compiled, 2) == []
        assert from_compiled.result() == []
        for sender in senders:
            sender.result()
    finally:
        compiled.close()
        pure.close()


# ==== the wire ====================================================================================

def test_send_writes_the_documented_object_frame(impl, np):
    """Header (3, 0, 0, n, length), the size table, the pickle, then the buffers in pickling
    order; buffers under 4096 bytes stay in the pickle."""
    obj = {"a": np.arange(1000, dtype=np.float64),
           "small": np.arange(10, dtype=np.uint8),
           "b": pickle.PickleBuffer(bytearray(b"z" * 5000)),
           "f": np.asfortranarray(np.arange(2000, dtype=np.int32).reshape(40, 50))}
    expected = object_frame(obj) + frame(b"end")
    with channel_and_raw_socket(impl) as (channel, raw):
        reader = Background(recv_exactly, raw, len(expected))
        channel.send(obj)
        channel.send_bytes(b"end")
        wire = reader.result()
    assert wire == expected
    kind, flags, reserved, count, length = FRAME_HEADER.unpack_from(wire)
    assert (kind, flags, reserved, count) == (KIND_OBJECT, 0, 0, 3)
    assert part_sizes(wire)[1:] == (8000, 5000, 8000)
    assert length == 8 * 4 + sum(part_sizes(wire))


def test_an_object_frame_written_by_another_peer_is_received(impl, np):
    """Frames built from the specification alone (as a C peer would write them), including
    the worked example of docs/protocol.md, arrive whole, each followed by a bytes frame."""
    obj = {"x": np.arange(50_000, dtype=np.int16), "y": [np.ones((64, 64)), "text"]}
    docs_example = bytes.fromhex(
        "03000000 01000000 1700000000000000 0400000000000000 0300000000000000 8005972e 686921")
    with channel_and_raw_socket(impl) as (channel, raw):
        writing = Background(raw.sendall,
                             object_frame(obj) + frame(b"one") + docs_example + frame(b"two"))
        assert_same(channel.recv(timeout=TIMEOUT), obj)
        assert channel.recv_bytes(timeout=TIMEOUT) == b"one"
        example = channel.recv(timeout=TIMEOUT)
        assert type(example) is bytearray and example == b"hi!"
        assert channel.recv_bytes(timeout=TIMEOUT) == b"two"
        writing.result()


def test_out_of_band_buffers_of_any_size_are_accepted(impl):
    """The 4096-byte threshold is the sender's choice: empty and tiny buffers are valid."""
    data = [pickle.PickleBuffer(bytearray(b"ab")), pickle.PickleBuffer(bytearray()),
            pickle.PickleBuffer(bytearray(b"c" * 70_000))]
    buffers = []
    pickled = pickle.dumps(data, protocol=5,
                           buffer_callback=lambda b: buffers.append(bytes(b.raw())) or False)
    sizes = [len(pickled)] + [len(b) for b in buffers]
    wire = (object_head(3, 8 * 4 + sum(sizes), sizes) + pickled + b"".join(buffers))
    with channel_and_raw_socket(impl) as (channel, raw):
        writing = Background(raw.sendall, wire)
        assert channel.recv(timeout=TIMEOUT) == [bytearray(b"ab"), bytearray(),
                                                 bytearray(b"c" * 70_000)]
        writing.result()


# ==== recv_bytes / recv_bytes_into and object messages ============================================

def test_recv_bytes_refuses_an_object_message_and_leaves_it_for_recv(pair, np):
    a, b = pair
    sent = np.arange(100_000)
    sending = Background(lambda: (a.send(sent), a.send_bytes(b"after")))
    for _ in range(2):
        with pytest.raises(OSError) as info:
            b.recv_bytes(timeout=TIMEOUT)
        assert str(info.value) == ("the next message was sent with send() and carries "
                                   "out-of-band buffers: receive it with recv()")
        assert not b.closed and b.readable
    with pytest.raises(OSError, match="carries out-of-band buffers"):
        b.recv_bytes_into(bytearray(2 * MiB), timeout=TIMEOUT)
    with pytest.raises(OSError, match="carries out-of-band buffers"):
        b.recv_bytes_into(np.zeros(100_000), timeout=TIMEOUT)
    assert np.array_equal(b.recv(timeout=TIMEOUT), sent)
    assert b.recv_bytes(timeout=TIMEOUT) == b"after"
    sending.result()


def test_recv_bytes_refuses_a_half_received_object_message(pair, np):
    a, b = pair
    sent = np.arange(200_000, dtype=np.float64)
    wire = object_frame(sent)
    first = Background(a._send_raw, wire[:100_000])
    assert b.poll(TIMEOUT)
    with pytest.raises(TimeoutError):
        b.recv(timeout=EXPIRES)
    with pytest.raises(OSError, match="carries out-of-band buffers"):
        b.recv_bytes(timeout=EXPIRES)
    rest = Background(lambda: (first.result(), a._send_raw(wire[100_000:])))
    assert np.array_equal(b.recv(timeout=TIMEOUT), sent)
    rest.result()


@pytest.mark.parametrize("dtype", ["uint8", "float64", "complex128"])
@pytest.mark.parametrize("count", [10, 40_000])
def test_recv_bytes_into_fills_a_numpy_array(pair, np, dtype, count):
    """Raw bytes messages into a numpy destination; large ones are read straight into it."""
    a, b = pair
    sent = make_array(np, dtype, count)
    dest = np.zeros(count + 4, dtype=dtype)
    sending = Background(a.send_bytes, sent)
    assert b.recv_bytes_into(dest, 2 * dest.itemsize, timeout=TIMEOUT) == sent.nbytes
    sending.result()
    assert np.array_equal(dest[2:2 + count], sent)
    assert not dest[:2].any() and not dest[2 + count:].any()


def test_recv_bytes_into_fills_a_2_d_numpy_array(pair, np):
    a, b = pair
    sent = np.arange(300 * 400, dtype=np.int32).reshape(300, 400)
    dest = np.zeros_like(sent)
    sending = Background(a.send_bytes, sent)
    assert b.recv_bytes_into(dest, timeout=TIMEOUT) == sent.nbytes
    sending.result()
    assert np.array_equal(dest, sent)


def test_recv_bytes_into_refuses_a_non_contiguous_numpy_array(pair, np):
    """Refused when its buffer is requested (numpy says ValueError to the compiled channel's
    request, the twin's memoryview check says BufferError); the message stays."""
    a, b = pair
    a.send_bytes(b"x" * 8)
    with pytest.raises((BufferError, ValueError), match="contiguous"):
        b.recv_bytes_into(np.zeros(100)[::2], timeout=TIMEOUT)
    assert b.recv_bytes(timeout=TIMEOUT) == b"x" * 8


# ==== bad input ===================================================================================

def _bad(count, length, sizes=()):
    return object_head(count, length, sizes)


HEADER_MESSAGE = ("malformed frame header {} (is the peer a loopfast channel of the same protocol "
                  "version?)")
COUNT_MESSAGE = "malformed object frame: {} out-of-band buffers (at most 8191) in {} bytes"
SIZES_MESSAGE = ("malformed object frame: the sizes of its {} parts do not add up to its length of "
                 "{} bytes")
LIMIT_MESSAGE = ("the peer announced a {}-byte message, over this channel's max_message_size of "
                 "{} bytes")

# name: (bytes the peer sends: a header and at most a size table, the receiver's
# max_message_size, the ProtocolError message). Announced sizes are large where possible: a
# receiver that allocated before checking would show it (see the tracemalloc bound below).
BAD_OBJECT_FRAMES = {
    "count-0": (FRAME_HEADER.pack(3, 0, 0, 0, 512 * MiB), 4 * GiB,
                HEADER_MESSAGE.format(FRAME_HEADER.pack(3, 0, 0, 0, 512 * MiB).hex())),
    "count-8192": (_bad(8192, 512 * MiB), 4 * GiB, COUNT_MESSAGE.format(8192, 512 * MiB)),
    "count-2**32-1": (_bad(2**32 - 1, 2**40), None, COUNT_MESSAGE.format(2**32 - 1, 2**40)),
    "length-shorter-than-table": (_bad(2, 23), 4 * GiB, COUNT_MESSAGE.format(2, 23)),
    "flags": (FRAME_HEADER.pack(3, 1, 0, 1, 100), 4 * GiB,
              HEADER_MESSAGE.format(FRAME_HEADER.pack(3, 1, 0, 1, 100).hex())),
    "sizes-sum-too-small": (_bad(1, 16 + 100 + 512 * MiB + 1, [100, 512 * MiB]), 4 * GiB,
                            SIZES_MESSAGE.format(2, 16 + 100 + 512 * MiB + 1)),
    "sizes-sum-too-big": (_bad(2, 24 + 100 + 512 * MiB - 1, [100, 256 * MiB, 256 * MiB]),
                          4 * GiB, SIZES_MESSAGE.format(3, 24 + 100 + 512 * MiB - 1)),
    "one-size-over-length": (_bad(1, 16 + 512 * MiB, [2**40, 0]), 4 * GiB,
                             SIZES_MESSAGE.format(2, 16 + 512 * MiB)),
    "sizes-wrap-around-2**64": (_bad(1, 116, [2**63, 2**63 + 100]), 4 * GiB,
                                SIZES_MESSAGE.format(2, 116)),
    "one-size-wraps-around-2**64": (_bad(1, 116, [2**64 - 1, 101]), 4 * GiB,
                                    SIZES_MESSAGE.format(2, 116)),
    "many-gib-without-a-limit": (_bad(2, 24 + 3 * 64 * GiB - 1, [64 * GiB] * 3), None,
                                 SIZES_MESSAGE.format(3, 24 + 3 * 64 * GiB - 1)),
    "over-max-message-size": (_bad(1, 1_000_001, [1_000_001 - 16 - 10, 10]), 1_000_000,
                              LIMIT_MESSAGE.format(1_000_001, 1_000_000)),
    "over-the-default-limit": (_bad(1, 5 * GiB, [10, 5 * GiB - 26]), 4 * GiB,
                               LIMIT_MESSAGE.format(5 * GiB, 4 * GiB)),
    "too-large-for-this-machine": (_bad(1, 2**63, [2**63 - 26, 10]), None,
                                   f"the peer announced a {2**63}-byte message, too large for "
                                   "this machine"),
}


@pytest.mark.parametrize("case", sorted(BAD_OBJECT_FRAMES))
def test_a_bad_object_frame_is_a_protocol_error_before_any_allocation(make_pair, case):
    """Only the header and size table are sent: the error cannot come from waiting for the
    body, and the receiver allocates (nearly) nothing before raising it."""
    wire, limit, message = BAD_OBJECT_FRAMES[case]
    a, b = make_pair(None, {"max_message_size": limit})
    a._send_raw(wire)
    assert b.poll(TIMEOUT)
    tracemalloc.start()
    try:
        with pytest.raises(loopfast.ProtocolError) as info:
            b.recv(timeout=TIMEOUT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value) == message
    assert b.closed
    assert peak < 1 * MiB


@pytest.mark.parametrize("case", ["count-8192", "over-max-message-size", "count-0"])
def test_recv_bytes_reports_a_bad_object_header_too(make_pair, case):
    wire, limit, message = BAD_OBJECT_FRAMES[case]
    a, b = make_pair(None, {"max_message_size": limit})
    a._send_raw(wire)
    with pytest.raises(loopfast.ProtocolError) as info:
        b.recv_bytes(timeout=TIMEOUT)
    assert str(info.value) == message
    assert b.closed


def test_an_object_of_exactly_max_message_size_is_received(make_pair, np):
    sent = np.arange(10_000, dtype=np.uint8)
    limit = len(object_frame(sent)) - FRAME_HEADER.size
    a, b = make_pair(None, {"max_message_size": limit})
    a.send(sent)
    assert np.array_equal(b.recv(timeout=TIMEOUT), sent)


# ==== interrupted object messages =================================================================

def interrupted_object(np):
    """An object whose frame has a small out-of-band buffer (copied through the receive buffer),
    a large one (read straight into its bytearray) and another small one, in that order."""
    return {"small": np.arange(2048, dtype=np.int32),
            "large": np.arange(30_000, dtype=np.float64),
            "last": np.arange(5000, dtype=np.uint8)}


def cut_points(wire):
    """Where to cut the frame of interrupted_object(): one point inside each of its parts."""
    head = head_size(wire)
    pickle_size, small, large, last = part_sizes(wire)
    return {
        "in-header": 9,
        "in-size-table": 20,
        "after-size-table": head,
        "in-pickle": head + pickle_size // 2,
        "in-small-buffer": head + pickle_size + small // 2,
        "in-large-buffer": head + pickle_size + small + large // 3,
        "before-last-buffer": len(wire) - last,
        "one-byte-short": len(wire) - 1,
    }


CUTS = ["in-header", "in-size-table", "after-size-table", "in-pickle", "in-small-buffer",
        "in-large-buffer", "before-last-buffer", "one-byte-short"]


@pytest.mark.parametrize("cut", CUTS)
def test_a_timeout_in_the_middle_of_an_object_leaves_it_whole_for_the_next_recv(pair, np, cut):
    a, b = pair
    sent = interrupted_object(np)
    wire = object_frame(sent)
    at = cut_points(wire)[cut]
    first = Background(a._send_raw, wire[:at])
    assert b.poll(TIMEOUT)
    with pytest.raises(TimeoutError):
        b.recv(timeout=EXPIRES)
    assert b.poll(0)  # what arrived is kept
    rest = Background(lambda: (first.result(), a._send_raw(wire[at:] + frame(b"next"))))
    assert_same(b.recv(timeout=TIMEOUT), sent)
    assert b.recv_bytes(timeout=TIMEOUT) == b"next"
    rest.result()


def test_several_timeouts_in_one_object_message(pair, np):
    """The receive resumes where the last one stopped, again and again."""
    a, b = pair
    sent = interrupted_object(np)
    wire = object_frame(sent)
    points = sorted(cut_points(wire).values())
    previous = 0
    for at in points:
        sending = Background(a._send_raw, wire[previous:at])
        for _ in range(1000):  # until all of this piece is sent (the receive makes room for it)
            with pytest.raises(TimeoutError):
                b.recv(timeout=EXPIRES)
            if sending.done():
                break
        sending.result()
        previous = at
    a._send_raw(wire[previous:])
    assert_same(b.recv(timeout=TIMEOUT), sent)


@pytest.mark.skipif(sys.platform == "win32", reason="needs os.kill(SIGINT)")
@pytest.mark.timeout(120, method="thread")  # a core that ignored SIGINT would ignore SIGALRM too
def test_ctrl_c_in_the_middle_of_an_object_leaves_it_whole_for_the_next_recv(pair, np):
    a, b = pair
    sent = interrupted_object(np)
    wire = object_frame(sent)
    at = cut_points(wire)["in-large-buffer"]
    first = Background(a._send_raw, wire[:at])
    with pytest.raises(TimeoutError):
        b.recv(timeout=EXPIRES)  # the message is under way
    first.result()
    assert_interrupted_promptly(*call_with_ctrl_c(lambda: b.recv(timeout=60.0), delay=0.3))
    rest = Background(a._send_raw, wire[at:])
    assert_same(b.recv(timeout=TIMEOUT), sent)
    rest.result()


@pytest.mark.parametrize("cut", CUTS)
def test_the_peer_closing_in_the_middle_of_an_object_is_a_protocol_error(pair, np, cut):
    a, b = pair
    wire = object_frame(interrupted_object(np))
    at = cut_points(wire)[cut]
    sending = Background(lambda: (a._send_raw(wire[:at]), a.close()))
    with pytest.raises(loopfast.ProtocolError,
                       match="^the peer closed the connection in the middle of a message$"):
        b.recv(timeout=TIMEOUT)
    sending.result()
    assert b.closed


def test_an_object_send_that_times_out_part_way_sends_the_rest_first(pair, np):
    """The unsent rest of the object message goes out before the next message; the receiver
    gets both whole."""
    a, b = pair
    big = {"big": np.frombuffer(random.Random(3).randbytes(socket_buffer_bound()), np.uint8),
           "tail": np.arange(10_000)}
    total = len(object_frame(big))
    with pytest.raises(TimeoutError) as info:
        a.send(big, timeout=0.5)
    assert re.fullmatch(rf"timed out after sending \d+ of {total} bytes of a message; "
                        "the rest goes out before the next message", str(info.value))
    receiver = Background(lambda: [b.recv(timeout=TIMEOUT) for _ in range(2)])
    a.send("next", timeout=TIMEOUT)
    got, after = receiver.result()
    assert_same(got, big)
    assert after == "next"


def test_an_object_message_waits_for_the_rest_of_an_interrupted_one(pair, np):
    a, b = pair
    data = random.Random(4).randbytes(socket_buffer_bound())
    with pytest.raises(TimeoutError, match="the rest goes out before the next message"):
        a.send_bytes(data, timeout=0.5)
    receiver = Background(lambda: (b.recv_bytes(timeout=TIMEOUT), b.recv(timeout=TIMEOUT)))
    sent = np.arange(50_000)
    a.send(sent, timeout=TIMEOUT)
    first, second = receiver.result()
    assert first == data
    assert np.array_equal(second, sent)


# ==== memory ======================================================================================

def test_receiving_a_large_object_allocates_each_buffer_once(link, np):
    size = 32 * MiB
    sent = {"a": np.frombuffer(random.Random(5).randbytes(size), np.uint8).reshape(-1, 1024)}
    sender, receiver = link
    tracemalloc.start()
    try:
        sending = Background(sender.send, sent, timeout=TIMEOUT)
        got = receiver.recv(timeout=TIMEOUT)
        sending.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(got["a"], sent["a"])
    assert peak < size + 2 * MiB


def _receive_and_report(channel, results):
    got = channel.recv(timeout=TIMEOUT)
    results.send((got.shape, got.dtype.str, int(got.sum(dtype="uint64"))), timeout=TIMEOUT)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_sending_a_large_array_copies_none_of_it(make_pair, np):
    """The receiver is another process; the sender's traced memory stays far below the array."""
    a, b = make_pair()
    results_here, results_there = make_pair()
    sent = np.frombuffer(random.Random(6).randbytes(32 * MiB), np.uint8)
    process = multiprocessing.get_context("fork").Process(
        target=_receive_and_report, args=(b, results_there), daemon=True)
    process.start()
    try:
        tracemalloc.start()
        try:
            a.send(sent, timeout=TIMEOUT)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert results_here.recv(timeout=TIMEOUT) == (sent.shape, sent.dtype.str,
                                                      int(sent.sum(dtype="uint64")))
    finally:
        process.join(JOIN_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join(10)
    assert process.exitcode == 0
    assert peak < 1 * MiB


# ==== across processes ============================================================================

def _echo_objects(channel, expected_module):
    """In the child: send back every object received, with whether its arrays are writable,
    until None arrives."""
    import numpy

    assert type(channel).__module__ == expected_module, type(channel)
    while True:
        obj = channel.recv(timeout=TIMEOUT)
        if obj is None:
            break
        arrays = obj if isinstance(obj, list) else [obj]
        writable = all(a.flags.writeable for a in arrays if isinstance(a, numpy.ndarray))
        channel.send((writable, obj), timeout=TIMEOUT)
    channel.close()


def process_objects(np):
    """A representative subset: mixed arrays, a 64 MiB array, PickleBuffers, plain objects."""
    return [
        [np.arange(10), np.asfortranarray(np.arange(20_000.0).reshape(100, 200)),
         np.arange(60_000, dtype=np.int64)[::3], np.zeros((), np.complex128)],
        np.frombuffer(random.Random(7).randbytes(64 * MiB), np.uint8).copy(),
        make_array(np, "structured", 5000),
        {"pb": pickle.PickleBuffer(bytearray(b"p" * 70_000)), "b": b"q" * 10_000},
        {"plain": [1, "two", None]},
        many_arrays(np, count=50, seed=3),
    ]


@contextlib.contextmanager
def child_with(method, target, *args, pure_child):
    """Start target(*args) in a child process; a spawned child uses the pure twin exactly when
    `pure_child` (LOOPFAST_NO_EXTENSIONS); the child is joined, bounded, on leaving."""
    saved = os.environ.get("LOOPFAST_NO_EXTENSIONS")
    if pure_child:
        os.environ["LOOPFAST_NO_EXTENSIONS"] = "1"
    else:
        os.environ.pop("LOOPFAST_NO_EXTENSIONS", None)
    try:
        # Not a daemon: a daemon cannot start processes of its own. It is joined (and killed if
        # it overstays) on leaving the block.
        process = multiprocessing.get_context(method).Process(target=target, args=args)
        process.start()
    finally:
        if saved is None:
            os.environ.pop("LOOPFAST_NO_EXTENSIONS", None)
        else:
            os.environ["LOOPFAST_NO_EXTENSIONS"] = saved
    try:
        yield process
    finally:
        process.join(JOIN_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join(10)


START_METHODS = [m for m in ("fork", "spawn") if m in multiprocessing.get_all_start_methods()]


@pytest.mark.parametrize("method", START_METHODS)
def test_objects_go_to_a_child_process_and_back(impl, np, method):
    """The child's end is the parent's class under fork and is rebuilt by loopfast's reduction
    under spawn, where LOOPFAST_NO_EXTENSIONS selects the same implementation."""
    parent_end, child_end = connected_pair(impl, impl)
    try:
        with child_with(method, _echo_objects, child_end, impl.__module__,
                        pure_child=impl is PURE) as process:
            child_end.close()
            _round_trip_through_echo(parent_end, process_objects(np))
        assert process.exitcode == 0
    finally:
        parent_end.close()
        child_end.close()


def _round_trip_through_echo(parent_end, objects):
    """Send each object to the _echo_objects child and check what comes back (writable, equal);
    then tell the child to stop."""
    for sent in objects:
        sending = Background(parent_end.send, sent, timeout=TIMEOUT)
        writable, got = parent_end.recv(timeout=TIMEOUT)
        sending.result()
        assert writable
        assert_same(got, sent)
    parent_end.send(None)


@pytest.mark.skipif("spawn" not in multiprocessing.get_all_start_methods(), reason="needs spawn")
@pytest.mark.parametrize("child_impl", sorted(IMPLEMENTATIONS))
def test_objects_between_implementations_in_two_processes(np, child_impl):
    parent_cls = PURE if child_impl == "compiled" else COMPILED
    parent_end, child_end = connected_pair(parent_cls, parent_cls)
    try:
        with child_with("spawn", _echo_objects, child_end,
                        IMPLEMENTATIONS[child_impl].__module__,
                        pure_child=child_impl == "pure") as process:
            child_end.close()
            _round_trip_through_echo(parent_end, process_objects(np)[:2])
        assert process.exitcode == 0
    finally:
        parent_end.close()
        child_end.close()


def _send_part_of_an_object_and_die(channel, wire):
    channel._send_raw(wire)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
@pytest.mark.parametrize("cut", ["in-size-table", "in-small-buffer", "in-large-buffer"])
def test_a_child_killed_in_the_middle_of_an_object_is_a_protocol_error(make_pair, np, cut):
    a, b = make_pair()
    wire = object_frame(interrupted_object(np))
    part = wire[:cut_points(wire)[cut]]
    with child_with("fork", _send_part_of_an_object_and_die, a, part,
                    pure_child=False) as process:
        a.close()
        with pytest.raises(loopfast.ProtocolError, match="in the middle of a message"):
            b.recv(timeout=TIMEOUT)
    assert b.closed
    assert process.exitcode == -signal.SIGKILL


def _send_forever(channel, obj):
    channel.send(obj)  # blocks: the parent does not read; the parent kills this process


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_sender_killed_while_writing_a_large_object_is_a_protocol_error(make_pair, np):
    """The object is larger than the socket buffers: the child is still writing it when it is
    killed, and the receiver gets an error, never part of the object."""
    a, b = make_pair()
    big = {"head": np.arange(10_000), "big": np.zeros(socket_buffer_bound(), np.uint8)}
    with child_with("fork", _send_forever, a, big, pure_child=False) as process:
        a.close()
        assert b.poll(TIMEOUT)  # the child has started writing
        process.kill()
        with pytest.raises(loopfast.ProtocolError, match="in the middle of a message"):
            b.recv(timeout=TIMEOUT)
    assert b.closed


# ==== serializers =================================================================================

class JsonSerializer:
    """A serializer= for tests: JSON text, UTF-8 encoded (tuples arrive as lists)."""

    @staticmethod
    def dumps(obj):
        return json.dumps(obj).encode()

    @staticmethod
    def loads(data):
        return json.loads(bytes(data))


def test_a_custom_serializers_output_travels_as_a_kind_2_frame(impl):
    message = {"numbers": [1, 2.5], "text": "h\u00e9"}
    expected = frame(JsonSerializer.dumps(message), KIND_PICKLE)
    with channel_and_raw_socket(impl, serializer=JsonSerializer()) as (channel, raw):
        reader = Background(recv_exactly, raw, len(expected))
        channel.send(message)
        assert reader.result() == expected
        raw.sendall(frame(JsonSerializer.dumps([1, 2, 3]), KIND_PICKLE))
        assert channel.recv(timeout=TIMEOUT) == [1, 2, 3]


def test_both_ends_must_use_the_same_serializer(make_pair, np):
    """A default end cannot unpickle JSON; an object message from a default end is unpickled
    by an end with a serializer (kind 3 is always pickle)."""
    plain, json_end = make_pair(None, {"serializer": JsonSerializer()})
    json_end.send({"a": 1})
    with pytest.raises(pickle.UnpicklingError):
        plain.recv(timeout=TIMEOUT)
    sent = np.arange(1000)  # 8000 bytes: out of band
    plain.send(sent)
    assert np.array_equal(json_end.recv(timeout=TIMEOUT), sent)


def test_a_serializer_that_fails_sends_nothing(make_pair):
    a, b = make_pair({"serializer": JsonSerializer()}, {"serializer": JsonSerializer()})
    with pytest.raises(TypeError):
        a.send({"not json": {1, 2}})
    a.send(["next"])
    assert b.recv(timeout=TIMEOUT) == ["next"]


def _pipe_with_objects():
    """The default: pickle 5, arrays out of band."""
    import numpy

    a, b = loopfast.Pipe()
    with a, b:
        sent = {"big": numpy.arange(200_000), "small": numpy.arange(3),
                "fortran": numpy.asfortranarray(numpy.ones((50, 40)))}
        sending = Background(a.send, sent, timeout=TIMEOUT)
        got = b.recv(timeout=TIMEOUT)
        sending.result()
        assert_same(got, sent)


def _pipe_with_json():
    a, b = loopfast.Pipe(serializer=JsonSerializer())
    with a, b:
        assert isinstance(a.serializer, JsonSerializer)
        a.send({"t": (1, 2), "s": "x" * 1000})
        assert b.recv(timeout=TIMEOUT) == {"t": [1, 2], "s": "x" * 1000}  # JSON: lists
        b.send([3])
        assert a.recv(timeout=TIMEOUT) == [3]


def _pipe_with_pickle_module():
    import numpy

    a, b = loopfast.Pipe(serializer=pickle)
    with a, b:
        sent = {"array": numpy.arange(1000), "bytes": b"b" * 5000}
        a.send(sent)
        payload = b.recv_bytes(timeout=TIMEOUT)  # kind 2: all in band
        assert payload == pickle.dumps(sent)
        got = pickle.loads(payload)
        assert numpy.array_equal(got["array"], sent["array"]) and got["bytes"] == sent["bytes"]
        a.send((1, 2))
        assert b.recv(timeout=TIMEOUT) == (1, 2)


def _listener_and_client_with_json():
    with loopfast.Listener(authkey=b"secret", serializer=JsonSerializer()) as listener:
        connecting = Background(loopfast.Client, listener.address, authkey=b"secret",
                                serializer=JsonSerializer())
        with listener.accept() as server, connecting.result() as client:
            assert isinstance(server.serializer, JsonSerializer)
            client.send({"q": (1,)})
            assert server.recv(timeout=TIMEOUT) == {"q": [1]}
            server.send("answer")
            assert client.recv(timeout=TIMEOUT) == "answer"
        connector = Background(loopfast.Client, listener.address, authkey=b"secret",
                               serializer=JsonSerializer(), timeout=TIMEOUT)
        with listener.accept() as server, connector.result() as client:
            client.send((4, 5))
            assert server.recv(timeout=TIMEOUT) == [4, 5]


def _json_echo(channel):
    assert isinstance(channel.serializer, JsonSerializer)
    channel.send(channel.recv(timeout=TIMEOUT), timeout=TIMEOUT)
    channel.close()


def _handing_a_json_channel_to_a_spawned_child():
    a, b = loopfast.Pipe(serializer=JsonSerializer())
    process = multiprocessing.get_context("spawn").Process(target=_json_echo, args=(b,),
                                                           daemon=True)
    process.start()
    b.close()
    try:
        a.send({"t": (1, 2)})
        assert a.recv(timeout=TIMEOUT) == {"t": [1, 2]}  # through JSON twice
    finally:
        process.join(JOIN_TIMEOUT)
        if process.is_alive():
            process.kill()
    assert process.exitcode == 0
    a.close()


def _in_implementation(expected, scenario):
    assert loopfast.implementation == expected, loopfast.implementation
    scenario()


PUBLIC_API_SCENARIOS = {
    "pipe-objects": _pipe_with_objects,
    "pipe-json": _pipe_with_json,
    "pipe-pickle-module": _pipe_with_pickle_module,
    "listener-client-json": _listener_and_client_with_json,
    "into-a-spawned-child": _handing_a_json_channel_to_a_spawned_child,
}


@pytest.mark.skipif("spawn" not in multiprocessing.get_all_start_methods(), reason="needs spawn")
@pytest.mark.parametrize("scenario", sorted(PUBLIC_API_SCENARIOS))
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_objects_and_serializers_through_the_public_api(scenario, implementation):
    """Pipe, Listener/Client (with and without a timeout) and a hand-over to a child, with the
    default and
    custom serializers, each in a fresh (spawned) process whose loopfast uses the implementation
    under test, selected as users select it (LOOPFAST_NO_EXTENSIONS)."""
    with child_with("spawn", _in_implementation, IMPLEMENTATION_NAMES[implementation],
                    PUBLIC_API_SCENARIOS[scenario], pure_child=implementation == "pure") as process:
        pass
    assert process.exitcode == 0


# ==== numpy is a test dependency only =============================================================

BLOCK_NUMPY = """
import sys

class _NoNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ImportError("numpy is made unimportable for this test")
        return None

sys.meta_path.insert(0, _NoNumpy())
try:
    import numpy
except ImportError:
    pass
else:
    raise SystemExit("numpy could still be imported")
"""

WITHOUT_NUMPY = BLOCK_NUMPY + """
import loopfast, pickle
a, b = loopfast.Pipe(); a.send({'x': bytearray(10000)}); print(b.recv())
a.send(pickle.PickleBuffer(bytearray(b"y" * 10000))); print(bytes(b.recv()) == b"y" * 10000)
print(loopfast.implementation, "numpy" in sys.modules)
"""


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_loopfast_sends_objects_without_numpy(implementation):
    env = dict(os.environ)
    env.pop("LOOPFAST_NO_EXTENSIONS", None)
    if implementation == "pure":
        env["LOOPFAST_NO_EXTENSIONS"] = "1"
    result = subprocess.run([sys.executable, "-c", WITHOUT_NUMPY], env=env, capture_output=True,
                            text=True, timeout=JOIN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        repr({"x": bytearray(10000)}),
        "True",
        f"{IMPLEMENTATION_NAMES[implementation]} False",
    ]


# ==== more than 2 GiB =============================================================================

@pytest.mark.slow
@pytest.mark.skipif(available_memory() < 10 * GiB, reason="needs 10 GiB of available memory")
def test_an_array_over_2_gib_round_trips(link, np):
    """2.2 GiB in one out-of-band buffer: no 32-bit size or chunk limit anywhere."""
    size = 2200 * MiB
    tile = np.frombuffer(random.Random(8).randbytes(1 * MiB), np.uint8)
    sent = np.tile(tile, size // tile.size)
    sent[-1] = 77
    got = round_trip(link, {"big": sent, "after": "tail"})
    assert got["after"] == "tail"
    received = got["big"]
    assert received.shape == sent.shape and received.dtype == sent.dtype
    assert received.flags.writeable
    for start in range(0, size, 256 * MiB):
        assert np.array_equal(received[start:start + 256 * MiB], sent[start:start + 256 * MiB])
