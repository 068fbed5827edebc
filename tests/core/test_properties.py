"""Property-based tests (hypothesis) of the frame decoder, for both implementations.

The receiving end is a loopfast Channel (compiled or pure-Python twin) wrapped, without any
handshake, around one end of a real 127.0.0.1 TCP connection; the sending end is a plain socket
that writes frames built here from docs/protocol.md, cut into random chunks. The properties:

1. any sequence of valid frames, however it is split, decodes to exactly the messages sent, in
   order, and a close at a frame boundary is EOFError;
2. a corrupted frame header (or object-frame size table) is ProtocolError, after exactly the
   messages before it: never a crash, a hang, or a wrong message;
3. a stream cut inside a frame, then closed, is ProtocolError after the whole messages before it.

Examples are derandomized and no example database is used, so every run checks the same cases.
Every receive has a timeout, so a decoder that waits for bytes that never come fails the test
(with TimeoutError) instead of hanging it.
"""

import pickle
import random
import socket
import struct
import threading

import pytest

hypothesis = pytest.importorskip("hypothesis")
from conftest import IMPLEMENTATIONS  # noqa: E402  (the twin, and the compiled core if built)
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from loopfast import ProtocolError  # noqa: E402

# The wire format, written out from docs/protocol.md rather than imported from loopfast.
FRAME_HEADER = struct.Struct("<BBHIQ")
HEADER_SIZE = FRAME_HEADER.size
KIND_BYTES, KIND_PICKLE, KIND_OBJECT = 1, 2, 3
MAX_OOB_BUFFERS = 8191

# Upper bound that only stops a broken decoder from hanging a test.
TIMEOUT = 10.0

KiB = 1024
# Sizes at which the implementations change strategy: 8 KiB (one contiguous send), 16 KiB,
# 64 KiB (a payload read straight into its final object), 256 KiB (the receive buffer).
THRESHOLDS = [8 * KiB, 16 * KiB, 64 * KiB, 256 * KiB]

# A small limit for the corruption tests: every length corrupted to above it is an error.
SMALL_MAX = 4000

_POOL = random.Random(20261126).randbytes(512 * KiB)


def payload(size, seed):
    """`size` pseudo-random bytes, the same for the same (size, seed)."""
    start = (seed * 7919) % (len(_POOL) - size + 1)
    return _POOL[start:start + size]


def describe(msgs, chunks):
    """Statistics for --hypothesis-show-statistics: what the examples actually covered."""
    largest = max(len(m.wire) for m in msgs)
    event("largest frame " + next(f"<= {t // KiB} KiB" for t in [1 * KiB, *THRESHOLDS, 2**63]
                                  if largest <= t + HEADER_SIZE + 64))
    event(f"object frames: {any(m.kind == KIND_OBJECT for m in msgs)}")
    event(f"1-byte chunks: {any(len(c) == 1 for c in chunks)}")
    event(f"chunks: {'1' if len(chunks) <= 1 else '2-8' if len(chunks) <= 8 else '9+'}")


def _settings(max_examples):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=False)


# ---- building frames (docs/protocol.md, "Frames" and "Objects") ----------------------------------

class Message:
    """One frame on the wire and what the receiver must return for it."""

    def __init__(self, kind, wire, expected):
        self.kind = kind
        self.wire = wire          # the whole frame: header (+ table) + payload
        self.expected = expected  # recv_bytes() result for kinds 1/2, recv() result for kind 3

    def receive(self, channel):
        if self.kind == KIND_OBJECT:
            return channel.recv(timeout=TIMEOUT)
        return channel.recv_bytes(timeout=TIMEOUT)


def bytes_frame(kind, data):
    return Message(kind, FRAME_HEADER.pack(kind, 0, 0, 0, len(data)) + data, data)


def object_frame(seq, buffer_sizes, seed):
    """A kind 3 frame whose object is ("obj", seq, [PickleBuffer(bytearray), ...]), every buffer
    out of band (whatever its size: the protocol allows any split)."""
    buffers = [bytearray(payload(size, seed + i)) for i, size in enumerate(buffer_sizes)]
    oob = []
    data = pickle.dumps(("obj", seq, [pickle.PickleBuffer(b) for b in buffers]), protocol=5,
                        buffer_callback=oob.append)
    raws = [bytes(b.raw()) for b in oob]
    assert len(raws) == len(buffers)
    table = struct.pack(f"<{len(raws) + 1}Q", len(data), *map(len, raws))
    body = table + data + b"".join(raws)
    wire = FRAME_HEADER.pack(KIND_OBJECT, 0, 0, len(raws), len(body)) + body
    return Message(KIND_OBJECT, wire, ("obj", seq, buffers))


def near_threshold(largest):
    return st.builds(lambda t, d: max(0, min(largest, t + d)),
                     st.sampled_from([t for t in THRESHOLDS if t <= largest]),
                     st.integers(-24, 24))


def payload_sizes(largest):
    """Mostly small, often near a threshold, sometimes anything up to `largest`."""
    choices = [st.integers(0, 40), st.integers(0, 2 * KiB), st.integers(0, largest)]
    if largest >= 8 * KiB:
        choices.insert(2, near_threshold(largest))
    return st.one_of(*choices)


@st.composite
def messages(draw, *, max_messages, largest, objects=True, object_buffer_max=20 * KiB):
    count = draw(st.integers(1, max_messages))
    out = []
    for seq in range(count):
        seed = draw(st.integers(0, 10_000))
        kinds = [KIND_BYTES, KIND_PICKLE] + ([KIND_OBJECT] if objects else [])
        kind = draw(st.sampled_from(kinds))
        if kind == KIND_OBJECT:
            sizes = draw(st.lists(st.integers(0, object_buffer_max), min_size=1, max_size=3))
            out.append(object_frame(seq, sizes, seed))
        else:
            out.append(bytes_frame(kind, payload(draw(payload_sizes(largest)), seed)))
    return out


@st.composite
def splits(draw, data):
    """`data` cut into chunks, either at random (a few cuts, tiny ones down to 1 byte among
    them; the rest of the stream goes in one last chunk) or every frame header byte by byte."""
    if draw(st.integers(0, 3)) == 0:
        return header_bytewise(data)
    sizes = draw(st.lists(st.one_of(st.just(1), st.integers(1, 17), st.integers(1, 64),
                                    st.integers(1, max(1, len(data)))), max_size=24))
    chunks, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        chunks.append(data[pos:pos + size])
        pos += size
    if pos < len(data):
        chunks.append(data[pos:])
    return chunks


def header_bytewise(data):
    """`data` (frames, maybe a cut or corrupted one) with each header (and object size table)
    in 1-byte chunks and each payload in one chunk. Corrupted lengths are followed only as far
    as the data goes."""
    chunks, pos = [], 0
    while pos < len(data):
        head = data[pos:pos + HEADER_SIZE]
        chunks.extend(head[i:i + 1] for i in range(len(head)))
        pos += len(head)
        if len(head) < HEADER_SIZE:
            break
        kind, _, _, count, length = FRAME_HEADER.unpack(head)
        table = 8 * (count + 1) if kind == KIND_OBJECT and count <= 64 else 0
        table = min(table, length)
        chunks.extend(data[pos + i:pos + i + 1] for i in range(min(table, len(data) - pos)))
        pos += table
        rest = data[pos:pos + max(0, length - table)]
        if rest:
            chunks.append(rest)
        pos += len(rest)
    return chunks


# ---- a raw sender and a receiving channel over 127.0.0.1 -----------------------------------------

class RawLink:
    """A Channel of class `impl` (no handshake) on one end of a 127.0.0.1 TCP connection, and a
    plain socket on the other end for writing raw bytes from a background thread."""

    def __init__(self, impl, **options):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen(1)
            listening.settimeout(TIMEOUT)
            self.sender = socket.create_connection(listening.getsockname(), timeout=TIMEOUT)
            try:
                accepted, _ = listening.accept()
            except BaseException:
                self.sender.close()
                raise
        self.sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.channel = impl(accepted.fileno(), **options)
        except BaseException:
            accepted.close()
            self.sender.close()
            raise
        accepted.detach()
        self._thread = None

    def write(self, chunks, *, close):
        """Write the chunks one send at a time in a background thread, then close if asked."""
        def run():
            try:
                for chunk in chunks:
                    self.sender.sendall(chunk)
                if close:
                    self.sender.close()
            except OSError:
                # The receiver may close first, after a protocol error. Elsewhere the messages
                # the test then misses fail it.
                pass

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def close(self):
        self.channel.close()
        self.sender.close()
        if self._thread is not None:
            self._thread.join(TIMEOUT)
            assert not self._thread.is_alive(), "the writer thread did not finish"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# The Channel class under test, as a plain parameter (not a fixture: hypothesis runs many
# examples per test call, and a class needs no per-example reset).
NAMES = sorted(IMPLEMENTATIONS)
each_impl = pytest.mark.parametrize("impl", [IMPLEMENTATIONS[n] for n in NAMES], ids=NAMES)


# ---- 1. valid frames in random splits ------------------------------------------------------------

@st.composite
def valid_streams(draw):
    msgs = draw(messages(max_messages=8, largest=256 * KiB + 64))
    stream = b"".join(m.wire for m in msgs)
    return msgs, draw(splits(stream))


@each_impl
@_settings(max_examples=150)
@given(case=valid_streams())
def test_random_frames_in_random_splits_decode_to_the_messages_sent(impl, case):
    msgs, chunks = case
    describe(msgs, chunks)
    with RawLink(impl) as link:
        link.write(chunks, close=True)
        for i, message in enumerate(msgs):
            got = message.receive(link.channel)
            assert got == message.expected, f"message {i} of {len(msgs)} (kind {message.kind})"
            if message.kind == KIND_OBJECT:  # out-of-band buffers arrive as writable bytearrays
                assert all(type(b) is bytearray for b in got[2])
            else:
                assert type(got) is bytes
        with pytest.raises(EOFError):
            link.channel.recv_bytes(timeout=TIMEOUT)


# ---- 2. corruption -------------------------------------------------------------------------------

def _set_byte(wire, offset, value):
    return wire[:offset] + bytes([value]) + wire[offset + 1:]


CORRUPTIONS = ["kind", "kind_bit", "flags", "reserved", "count", "length", "length_bit", "table"]


@st.composite
def corruptions(draw, message, what):
    """`message.wire` with its header (or, `what` = "table", its object size table) made
    invalid."""
    wire = message.wire
    kind = message.kind
    header = list(FRAME_HEADER.unpack_from(wire))
    if what == "kind":
        bad = draw(st.sampled_from([0, *range(4, 256)]))
        return what, _set_byte(wire, 0, bad)
    if what == "kind_bit":
        # A one-bit flip of 1, 2 or 3 is never a valid (kind, count) pair: 1 <-> 3 and 2 <-> 3
        # change whether count must be 0, every other result is not a kind.
        return what, _set_byte(wire, 0, kind ^ (1 << draw(st.integers(0, 7))))
    if what == "flags":
        return what, _set_byte(wire, 1, draw(st.integers(1, 255)))
    if what == "reserved":
        header[2] = draw(st.integers(1, 0xFFFF))
    elif what == "count":
        if kind == KIND_OBJECT:
            header[3] = draw(st.one_of(st.just(0), st.integers(MAX_OOB_BUFFERS + 1, 2**32 - 1)))
        else:
            header[3] = draw(st.integers(1, 2**32 - 1))
    elif what == "length":
        header[4] = draw(st.integers(SMALL_MAX + 1, 2**64 - 1))
    elif what == "length_bit":
        # Lengths here are < 4096 = 2**12, so setting any bit from 12 up exceeds SMALL_MAX.
        header[4] ^= 1 << draw(st.integers(12, 63))
    elif what == "table":
        # One entry of the size table changed: the parts no longer add up to the length.
        count = header[3]
        index = draw(st.integers(0, count))
        offset = HEADER_SIZE + 8 * index
        (size,) = struct.unpack_from("<Q", wire, offset)
        new = draw(st.integers(0, 2**64 - 1).filter(lambda s: s != size))
        return what, wire[:offset] + struct.pack("<Q", new) + wire[offset + 8:]
    return what, FRAME_HEADER.pack(*header) + wire[HEADER_SIZE:]


@st.composite
def corrupt_streams(draw):
    msgs = draw(messages(max_messages=6, largest=1000, object_buffer_max=300))
    what = draw(st.sampled_from(CORRUPTIONS))
    if what == "table":  # only object frames have one: corrupt one of them, or add one
        objects = [i for i, m in enumerate(msgs) if m.kind == KIND_OBJECT]
        if not objects:
            msgs.append(object_frame(len(msgs), draw(st.lists(st.integers(0, 300), min_size=1,
                                                              max_size=3)), 0))
            objects = [len(msgs) - 1]
        bad_index = draw(st.sampled_from(objects))
    else:
        bad_index = draw(st.integers(0, len(msgs) - 1))
    what, bad_wire = draw(corruptions(msgs[bad_index], what))
    stream = (b"".join(m.wire for m in msgs[:bad_index]) + bad_wire
              + b"".join(m.wire for m in msgs[bad_index + 1:]))
    close = draw(st.booleans())
    return msgs, bad_index, what, draw(splits(stream)), close


@each_impl
@_settings(max_examples=300)
@given(case=corrupt_streams())
def test_a_corrupted_header_is_a_protocol_error_after_the_messages_before_it(impl, case):
    msgs, bad_index, what, chunks, close = case
    describe(msgs, chunks)
    event(f"corrupted: {what}")
    # The sender closes after writing, or not: the error must not wait for the end of stream.
    with RawLink(impl, max_message_size=SMALL_MAX) as link:
        link.write(chunks, close=close)
        for message in msgs[:bad_index]:
            assert message.receive(link.channel) == message.expected
        bad = msgs[bad_index]
        with pytest.raises(ProtocolError):
            got = bad.receive(link.channel)
            pytest.fail(f"corrupted {what} of message {bad_index}: delivered {got!r:.200}")
        assert link.channel.closed


# ---- 3. truncation -------------------------------------------------------------------------------

@st.composite
def truncated_streams(draw):
    msgs = draw(messages(max_messages=6, largest=96 * KiB, object_buffer_max=10 * KiB))
    cut_index = draw(st.integers(0, len(msgs) - 1))
    wire = msgs[cut_index].wire
    # Inside the frame: at least 1 byte of it sent, at least 1 missing (often in the header).
    keep = draw(st.one_of(st.integers(1, HEADER_SIZE), st.integers(1, len(wire) - 1)))
    keep = min(keep, len(wire) - 1)
    stream = b"".join(m.wire for m in msgs[:cut_index]) + wire[:keep]
    return msgs, cut_index, keep, draw(splits(stream))


@each_impl
@_settings(max_examples=200)
@given(case=truncated_streams())
def test_a_stream_cut_inside_a_frame_is_a_protocol_error_after_the_whole_messages(impl, case):
    msgs, cut_index, keep, chunks = case
    describe(msgs, chunks)
    event(f"cut inside the header: {keep < HEADER_SIZE}")
    with RawLink(impl) as link:
        link.write(chunks, close=True)
        for message in msgs[:cut_index]:
            assert message.receive(link.channel) == message.expected
        cut = msgs[cut_index]
        with pytest.raises(ProtocolError):
            got = cut.receive(link.channel)
            pytest.fail(f"message {cut_index} cut after {keep} of {len(cut.wire)} bytes: "
                        f"delivered {got!r:.200}")
        assert link.channel.closed
