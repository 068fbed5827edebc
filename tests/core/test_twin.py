"""The pure-Python twin (loopfast._core.channel_py) against the compiled channel
(loopfast._core.channel).

Part 1 runs the same behaviours on both implementations (the `impl` fixture) and checks that
their exceptions carry the same types and messages. Part 2 pairs a compiled end with a pure end,
in both directions and across a fork, and checks that every byte arrives as it was sent.

Pairs are built by hand, as connection.Pipe builds them: a listening socket on 127.0.0.1, a
connection to it, and loopfast._handshake.handshake_pair on the two channels. Every wait is
bounded; no outcome depends on how long anything takes.
"""

import array
import multiprocessing
import os
import random
import re
import select
import signal
import socket
import sys
import threading
import tracemalloc
from multiprocessing.reduction import ForkingPickler

import pytest
from conftest import (
    IMPLEMENTATIONS,
    Background,
    assert_interrupted_promptly,
    call_with_ctrl_c,
    connected_pair,
    socket_buffer_bound,
)

from loopfast._core import channel_py as _channel_py
from loopfast._errors import BufferTooShort, ProtocolError
from loopfast._wire import FRAME_HEADER, KIND_BYTES, KIND_PICKLE

# The twins side by side: where the extension is not built, there is nothing to compare.
_channel = pytest.importorskip("loopfast._core.channel",
                               reason="the compiled extension is not built")
pytestmark = pytest.mark.compiled

COMPILED = _channel.Channel
PURE = _channel_py.Channel

# Upper bounds that only stop a broken test from hanging.
TIMEOUT = 30.0
JOIN_TIMEOUT = 60.0
# A timeout meant to expire: short, because the data it waits for is never sent.
EXPIRES = 0.1

KiB = 1024
MiB = 1024 * KiB


# ---- helpers -------------------------------------------------------------------------------------

_POOL = random.Random(20261126).randbytes(4 * MiB)


def payload(size, seed=0):
    """`size` pseudo-random bytes, the same for the same (size, seed)."""
    if size > len(_POOL):
        return (_POOL * (size // len(_POOL) + 1))[:size]
    start = (seed * 7919) % (len(_POOL) - size + 1)
    return _POOL[start:start + size]


def frame(data, kind=KIND_BYTES):
    """A complete frame as docs/protocol.md spells it."""
    return FRAME_HEADER.pack(kind, 0, 0, 0, len(data)) + bytes(data)


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def pair(make_pair):
    return make_pair()


# ==== Part 1: the same behaviours on both implementations ========================================

# ---- messages -----------------------------------------------------------------------------------

# Around the thresholds both implementations share: 8 KiB (a frame sent as one contiguous send),
# 64 KiB (a payload read straight into its final object), 256 KiB (the receive buffer).
SIZES = [0, 1, 16, 8 * KiB, 8 * KiB + 1, 64 * KiB, 64 * KiB + 1, 256 * KiB - 16, 256 * KiB + 1,
         3 * MiB + 5]


@pytest.mark.parametrize("size", SIZES)
def test_recv_bytes_returns_the_bytes_sent(pair, size):
    a, b = pair
    data = payload(size)
    sender = Background(lambda: [a.send_bytes(data), a.send_bytes(b"end")])
    got = b.recv_bytes(timeout=TIMEOUT)
    assert type(got) is bytes
    assert got == data
    assert b.recv_bytes(timeout=TIMEOUT) == b"end"
    sender.result()


@pytest.mark.parametrize("size", [0, 100, 64 * KiB + 1, 1 * MiB])
def test_recv_bytes_into_writes_at_the_offset_and_nowhere_else(pair, size):
    a, b = pair
    data = payload(size, seed=1)
    buf = bytearray(b"\xee" * (size + 64))
    sender = Background(a.send_bytes, data)
    assert b.recv_bytes_into(buf, 32, timeout=TIMEOUT) == size
    sender.result()
    assert buf[32:32 + size] == data
    assert buf[:32] == b"\xee" * 32
    assert buf[32 + size:] == b"\xee" * 32


def test_offsets_and_sizes_are_in_bytes_for_typed_buffers(pair):
    a, b = pair
    items = array.array("i", [1, 2, 3, 4])
    a.send_bytes(items, items.itemsize, 2 * items.itemsize)
    assert b.recv_bytes(timeout=TIMEOUT) == array.array("i", [2, 3]).tobytes()
    out = array.array("i", [0, 0, 0, 0])
    a.send_bytes(array.array("i", [7]))
    assert b.recv_bytes_into(out, 2 * out.itemsize, timeout=TIMEOUT) == out.itemsize
    assert out.tolist() == [0, 0, 7, 0]


def test_a_non_contiguous_buffer_is_sent_in_c_order(pair):
    a, b = pair
    a.send_bytes(memoryview(b"abcdef")[::2])
    assert b.recv_bytes(timeout=TIMEOUT) == b"ace"


def test_objects_round_trip(pair):
    a, b = pair
    value = {"list": [1, 2.5, None], "bytes": b"\x00" * 100_000, "text": "h\u00e9"}
    sender = Background(a.send, value)
    assert b.recv(timeout=TIMEOUT) == value
    sender.result()


def test_recv_and_recv_bytes_accept_either_kind_of_frame(pair):
    """Kinds differ only in what the sender meant (docs/protocol.md)."""
    a, b = pair
    a.send_bytes(b"\x80\x04K\x07.")  # a pickle of 7, sent as raw bytes
    assert b.recv(timeout=TIMEOUT) == 7
    a.send(7)
    assert b.recv_bytes(timeout=TIMEOUT) == bytes(ForkingPickler.dumps(7, 5))


def test_the_wire_bytes_are_the_documented_frames(impl):
    """What a channel writes is header "<BBHIQ" (kind, 0, 0, 0, length) then the payload."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        raw = socket.create_connection(listening.getsockname(), timeout=TIMEOUT)
        accepted, _ = listening.accept()
    with raw, impl(accepted.detach()) as channel:
        big = payload(100 * KiB, seed=2)
        expected = (bytes.fromhex("01000000 00000000 0200000000000000") + b"hi"
                    + frame(b"") + frame(big)
                    + frame(ForkingPickler.dumps([1, 2], 5), KIND_PICKLE))
        raw.settimeout(TIMEOUT)
        reader = Background(_recv_exactly, raw, len(expected))
        channel.send_bytes(b"hi")
        channel.send_bytes(b"")
        channel.send_bytes(big)
        channel.send([1, 2])
        assert reader.result() == expected


def _recv_exactly(sock, size):
    received = bytearray()
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        assert chunk, "the channel's socket closed early"
        received += chunk
    return bytes(received)


# ---- recv_bytes_into: BufferTooShort ------------------------------------------------------------

@pytest.mark.parametrize("size", [10, 200 * KiB])
def test_a_message_too_long_for_the_buffer_raises_buffer_too_short_with_all_of_it(pair, size):
    a, b = pair
    data = payload(size, seed=3)
    sender = Background(lambda: [a.send_bytes(data), a.send_bytes(b"next")])
    with pytest.raises(BufferTooShort) as info:
        b.recv_bytes_into(bytearray(size - 1), timeout=TIMEOUT)
    assert isinstance(info.value, multiprocessing.BufferTooShort)
    assert info.value.args[0] == data
    assert b.recv_bytes(timeout=TIMEOUT) == b"next"
    sender.result()


# ---- maxlength ----------------------------------------------------------------------------------

def test_a_message_longer_than_maxlength_stops_a_duplex_channel_reading(pair):
    a, b = pair
    a.send_bytes(b"x" * 11)
    with pytest.raises(OSError, match="^bad message length$"):
        b.recv_bytes(10, timeout=TIMEOUT)
    assert not b.readable and not b.closed
    b.send_bytes(b"still writable")
    assert a.recv_bytes(timeout=TIMEOUT) == b"still writable"


@pytest.mark.parametrize("receive", ["recv_bytes", "recv", "recv_bytes_into", "poll"])
def test_after_maxlength_stopped_reading_every_receive_says_why(pair, receive):
    # Not just "connection is write-only" on a two-way channel: what stopped it, and that the
    # message is still there, unread.
    a, b = pair
    a.send_bytes(b"x" * 100)
    with pytest.raises(OSError, match="^bad message length$"):
        b.recv_bytes(10, timeout=TIMEOUT)
    calls = {"recv_bytes": lambda: b.recv_bytes(timeout=TIMEOUT),
             "recv": lambda: b.recv(timeout=TIMEOUT),
             "recv_bytes_into": lambda: b.recv_bytes_into(bytearray(200), timeout=TIMEOUT),
             "poll": lambda: b.poll(0)}
    with pytest.raises(OSError) as info:
        calls[receive]()
    message = str(info.value)
    assert message.startswith("connection is write-only since recv_bytes(maxlength=10) met a "
                              "100-byte message (OSError: bad message length)")
    assert message.endswith("and that message stays unread")


def test_a_message_longer_than_maxlength_closes_a_read_only_channel(make_pair):
    reader, writer = make_pair({"writable": False}, {"readable": False})
    writer.send_bytes(b"x" * 11)
    with pytest.raises(OSError, match="^bad message length$"):
        reader.recv_bytes(10, timeout=TIMEOUT)
    assert reader.closed


def test_a_message_of_exactly_maxlength_is_received(pair):
    a, b = pair
    a.send_bytes(b"x" * 10)
    assert b.recv_bytes(10, timeout=TIMEOUT) == b"x" * 10


# ---- timeouts leave the stream intact -----------------------------------------------------------

def test_a_receive_times_out_when_nothing_arrives(pair):
    a, b = pair
    with pytest.raises(TimeoutError, match="^timed out waiting for a message$"):
        b.recv_bytes(timeout=EXPIRES)
    a.send_bytes(b"after")
    assert b.recv_bytes(timeout=TIMEOUT) == b"after"


def test_a_timeout_in_the_middle_of_a_small_frame_keeps_the_stream_intact(pair):
    a, b = pair
    data = frame(b"small message") + frame(b"next")
    a._send_raw(data[:20])
    with pytest.raises(TimeoutError):
        b.recv_bytes(timeout=EXPIRES)
    a._send_raw(data[20:])
    assert b.recv_bytes(timeout=TIMEOUT) == b"small message"
    assert b.recv_bytes(timeout=TIMEOUT) == b"next"


def _receive(channel, how, size):
    if how == "recv_bytes_into":
        buf = bytearray(size)
        n = channel.recv_bytes_into(buf, timeout=TIMEOUT)
        return bytes(buf[:n])
    return channel.recv_bytes(timeout=TIMEOUT)


@pytest.mark.parametrize("first", ["recv_bytes", "recv_bytes_into"])
@pytest.mark.parametrize("then", ["recv_bytes", "recv_bytes_into"])
def test_a_timeout_in_the_middle_of_a_large_message_keeps_the_stream_intact(pair, first, then):
    """The part that arrived is kept; the next receive, by either method, resumes it."""
    a, b = pair
    data = payload(1 * MiB, seed=4)
    wire = frame(data) + frame(b"next")
    a._send_raw(wire[:20 * KiB])
    assert b.poll(TIMEOUT)  # the header has arrived: the receive below starts the message
    with pytest.raises(TimeoutError,
                       match="^timed out in the middle of a message; the next receive resumes it$"):
        _timed_out_receive(b, first)
    assert b.poll()  # a message is under way
    assert not b._has_message()
    with pytest.raises(OSError, match="middle of receiving a large message"):
        ForkingPickler.dumps(b)  # it cannot be handed over to another process
    sender = Background(a._send_raw, wire[20 * KiB:])
    assert _receive(b, then, 2 * MiB) == data
    assert b.recv_bytes(timeout=TIMEOUT) == b"next"
    sender.result()


def _timed_out_receive(channel, how):
    if how == "recv_bytes_into":
        return channel.recv_bytes_into(bytearray(2 * MiB), timeout=EXPIRES)
    return channel.recv_bytes(timeout=EXPIRES)


def test_a_resumed_large_message_that_does_not_fit_raises_buffer_too_short(pair):
    a, b = pair
    data = payload(1 * MiB, seed=5)
    wire = frame(data)
    a._send_raw(wire[:20 * KiB])
    assert b.poll(TIMEOUT)
    with pytest.raises(TimeoutError, match="in the middle of a message"):
        b.recv_bytes(timeout=EXPIRES)
    sender = Background(a._send_raw, wire[20 * KiB:])
    with pytest.raises(BufferTooShort) as info:
        b.recv_bytes_into(bytearray(10), timeout=TIMEOUT)
    assert info.value.args[0] == data
    sender.result()


def _fill_the_socket_buffers(a):
    """Send one message too big for the socket buffers to a peer that does not read, so that
    the send times out part-way; return the message."""
    big = payload(socket_buffer_bound(), seed=6)
    with pytest.raises(TimeoutError) as info:
        a.send_bytes(big, timeout=0.5)
    total = len(big) + FRAME_HEADER.size
    assert re.fullmatch(rf"timed out after sending \d+ of {total} bytes of a message; "
                        "the rest goes out before the next message", str(info.value))
    return big


def test_a_send_that_times_out_part_way_sends_the_rest_before_the_next_message(pair):
    a, b = pair
    big = _fill_the_socket_buffers(a)
    with pytest.raises(OSError, match="middle of sending a message"):
        ForkingPickler.dumps(a)  # it cannot be handed over to another process
    receiver = Background(lambda: [b.recv_bytes(timeout=TIMEOUT) for _ in range(2)])
    a.send_bytes(b"next", timeout=TIMEOUT)
    first, second = receiver.result()
    assert first == big
    assert second == b"next"


def _sent_nothing(error):
    """Whether the TimeoutError of a send says that nothing went out, not even a byte of the
    rest of an earlier message (each implementation's wording)."""
    return (str(error) == "timed out sending a message"  # compiled
            or str(error).startswith("timed out sending the rest of an earlier message (0 of"))


def _time_out_while_flushing(a):
    """After _fill_the_socket_buffers: send until a send times out before any byte of the
    earlier message's rest went out; return that TimeoutError."""
    for _ in range(1000):
        try:
            a.send_bytes(b"not sent", timeout=0)
        except TimeoutError as exc:
            if _sent_nothing(exc):
                return exc
    pytest.fail("no send timed out before sending anything")


def test_a_send_timing_out_while_flushing_an_earlier_rest_keeps_that_rest(pair):
    a, b = pair
    big = _fill_the_socket_buffers(a)
    _time_out_while_flushing(a)
    receiver = Background(lambda: [b.recv_bytes(timeout=TIMEOUT) for _ in range(2)])
    a.send_bytes(b"next", timeout=TIMEOUT)
    first, second = receiver.result()
    assert first == big
    assert second == b"next"


def test_a_send_timing_out_while_flushing_says_this_message_was_not_sent(pair, impl):
    a, _ = pair
    _fill_the_socket_buffers(a)
    error = _time_out_while_flushing(a)
    assert "this message was not sent" in str(error)


def test_flush_writes_the_rest_of_a_timed_out_send_without_a_new_message(pair):
    a, b = pair
    big = _fill_the_socket_buffers(a)
    assert 0 < a.unsent_bytes < len(big) + FRAME_HEADER.size
    receiver = Background(b.recv_bytes, timeout=TIMEOUT)
    a.flush(timeout=TIMEOUT)
    assert a.unsent_bytes == 0
    assert receiver.result() == big
    assert not b.poll(0.05)  # nothing but that message


def test_a_flush_that_times_out_keeps_the_rest_queued(pair):
    a, b = pair
    big = _fill_the_socket_buffers(a)
    left = a.unsent_bytes
    with pytest.raises(TimeoutError, match=r"^timed out flushing; \d+ bytes are still queued$") \
            as info:
        a.flush(timeout=0)
    assert int(str(info.value).split()[3]) == a.unsent_bytes
    assert 0 < a.unsent_bytes <= left  # a few more bytes may have fit into the socket
    receiver = Background(lambda: [b.recv_bytes(timeout=TIMEOUT) for _ in range(2)])
    a.send_bytes(b"next", timeout=TIMEOUT)
    assert receiver.result() == [big, b"next"]


def test_flush_sends_what_an_open_batch_gathered(pair):
    a, b = pair
    with a.batch():
        a.send_bytes(b"one")
        a.send_bytes(b"two")
        assert a.unsent_bytes == 2 * (FRAME_HEADER.size + 3)
        assert not b.poll(0.05)
        a.flush(timeout=TIMEOUT)
        assert a.unsent_bytes == 0
        assert [b.recv_bytes(timeout=TIMEOUT) for _ in range(2)] == [b"one", b"two"]
        a.send_bytes(b"three")
    assert b.recv_bytes(timeout=TIMEOUT) == b"three"


def test_flush_with_nothing_queued_returns_at_once(pair):
    a, _ = pair
    assert a.unsent_bytes == 0
    a.flush(timeout=0)
    assert a.unsent_bytes == 0


def test_flush_on_a_read_only_end_is_refused(make_pair):
    reader, _ = make_pair({"writable": False})
    with pytest.raises(OSError, match="^connection is read-only$"):
        reader.flush()
    reader.close()
    with pytest.raises(OSError, match="^handle is closed$"):
        reader.flush()


# ---- end of stream and protocol errors ----------------------------------------------------------

def test_the_peer_closing_between_messages_is_eof(pair):
    a, b = pair
    a.send_bytes(b"last")
    a.close()
    assert b.recv_bytes(timeout=TIMEOUT) == b"last"
    for _ in range(2):
        with pytest.raises(EOFError, match="^the peer closed the connection$"):
            b.recv_bytes(timeout=TIMEOUT)
    assert not b.closed


@pytest.mark.parametrize("cut", [1, 15, 16, 20, 70 * KiB],
                         ids=["header-1", "header-15", "header-only", "small-payload",
                              "large-payload"])
def test_the_peer_closing_in_the_middle_of_a_frame_is_a_protocol_error(pair, cut):
    a, b = pair
    size = 200 * KiB if cut > 16 * KiB else 100  # 200 KiB: read straight into its object
    a._send_raw(frame(payload(size))[:cut])
    a.close()
    with pytest.raises(ProtocolError,
                       match="^the peer closed the connection in the middle of a message$"):
        b.recv_bytes(timeout=TIMEOUT)
    assert b.closed


@pytest.mark.parametrize("fields", [(0, 0, 0, 0), (3, 0, 0, 0), (1, 1, 0, 0), (2, 0, 1, 0),
                                    (1, 0, 0, 1)],
                         ids=["kind-0", "kind-3", "flags", "reserved", "count"])
def test_a_malformed_header_is_a_protocol_error_and_closes_the_channel(pair, fields):
    a, b = pair
    header = FRAME_HEADER.pack(*fields, 4)
    a._send_raw(header + b"data")
    with pytest.raises(ProtocolError) as info:
        b.recv_bytes(timeout=TIMEOUT)
    assert str(info.value) == (f"malformed frame header {header.hex()} "
                               "(is the peer a loopfast channel of the same protocol version?)")
    assert b.closed


def test_a_frame_over_max_message_size_is_refused_from_its_header(make_pair):
    """Only the header is sent: the error cannot come from waiting for the payload."""
    a, b = make_pair(None, {"max_message_size": 1000})
    a._send_raw(FRAME_HEADER.pack(KIND_BYTES, 0, 0, 0, 1001))
    with pytest.raises(ProtocolError, match="^the peer announced a 1001-byte message, over this "
                                            "channel's max_message_size of 1000 bytes$"):
        b.recv_bytes(timeout=TIMEOUT)
    assert b.closed


def test_a_frame_of_exactly_max_message_size_is_received(make_pair):
    a, b = make_pair(None, {"max_message_size": 1000})
    a.send_bytes(b"x" * 1000)
    assert b.recv_bytes(timeout=TIMEOUT) == b"x" * 1000


def test_without_a_limit_an_impossible_length_is_still_refused(make_pair):
    a, b = make_pair(None, {"max_message_size": None})
    assert b.max_message_size is None
    a._send_raw(FRAME_HEADER.pack(KIND_BYTES, 0, 0, 0, 2**64 - 1))
    with pytest.raises(ProtocolError, match="too large for this machine"):
        b.recv_bytes(timeout=TIMEOUT)


# ---- poll and _has_message ----------------------------------------------------------------------

def test_poll_does_not_block_by_default_and_never_consumes(pair):
    a, b = pair
    assert b.poll() is False
    assert b.poll(-1) is False
    assert b.poll(EXPIRES) is False
    a.send_bytes(b"m")
    assert b.poll(TIMEOUT) is True
    assert b.poll() is True
    assert b.recv_bytes(timeout=TIMEOUT) == b"m"
    assert b.poll() is False


def test_poll_none_waits_for_a_message(pair):
    a, b = pair
    poller = Background(b.poll, None)
    a.send_bytes(b"wake")
    assert poller.result() is True
    assert b.recv_bytes(timeout=TIMEOUT) == b"wake"


def test_poll_is_true_at_end_of_stream(pair):
    a, b = pair
    a.close()
    assert b.poll(TIMEOUT) is True


def _queued(channel):
    """What the kernel holds queued for `channel` (a peek through a duplicate of its socket,
    which consumes nothing); b"" when nothing is queued."""
    if not select.select([channel], [], [], 0)[0]:
        return b""
    with socket.fromfd(channel.fileno(), socket.AF_INET, socket.SOCK_STREAM) as dup:
        return dup.recv(1 * MiB, socket.MSG_PEEK)


def test_a_receive_takes_from_the_socket_only_the_message_it_returns(pair):
    a, b = pair
    a._send_raw(frame(b"one") + frame(b"two") + frame(b"three"))
    assert b.poll(TIMEOUT)
    assert b.recv_bytes(timeout=TIMEOUT) == b"one"
    # The other two wait in the socket, where every selector sees them ...
    assert _queued(b).endswith(frame(b"two") + frame(b"three"))
    # ... and the channel, never handed over, still knows that a whole frame is there.
    assert b._has_message()
    assert b.recv_bytes(timeout=0) == b"two"
    assert _queued(b).endswith(frame(b"three"))
    assert b.recv_bytes(timeout=0) == b"three"
    assert not b._has_message()
    assert _queued(b) == b""  # every message received: the socket holds nothing


def test_has_message_is_false_for_a_partial_frame(pair):
    a, b = pair
    a._send_raw(frame(b"first") + frame(b"whole")[:-1])
    assert b.poll(TIMEOUT)
    assert b.recv_bytes(timeout=TIMEOUT) == b"first"  # it has seen the partial frame after it
    assert not b._has_message()
    a._send_raw(b"e")
    assert b.recv_bytes(timeout=TIMEOUT) == b"whole"
    assert not b._has_message()


def test_has_message_reports_a_malformed_header_without_closing(pair):
    """wait() calls _has_message(); the ProtocolError belongs to the receive that follows."""
    a, b = pair
    a._send_raw(frame(b"first") + bytes(16))
    assert b.poll(TIMEOUT)
    assert b.recv_bytes(timeout=TIMEOUT) == b"first"  # it has seen the header after it
    assert b._has_message() is True
    assert not b.closed
    with pytest.raises(ProtocolError, match="^malformed frame header"):
        b.recv_bytes(timeout=TIMEOUT)


def test_a_channel_marked_shared_still_receives_every_queued_message_in_order(pair):
    """After a handover (here only prepared: no other process takes from the socket) the
    channel forgets what it saw queued at every receive, and finds it again in the socket."""
    a, b = pair
    a._send_raw(frame(b"one") + frame(b"two") + frame(b"three"))
    assert b.poll(TIMEOUT)
    assert b.recv_bytes(timeout=TIMEOUT) == b"one"
    b._prepare_handover()
    assert _queued(b).endswith(frame(b"two") + frame(b"three"))
    assert b.recv_bytes(timeout=TIMEOUT) == b"two"
    a.send_bytes(b"four")
    received = b.recv_bytes_many(timeout=TIMEOUT)
    while len(received) < 2:  # "four" may come after the look that found "three"
        received += b.recv_bytes_many(timeout=TIMEOUT)
    assert received == [b"three", b"four"]
    assert _queued(b) == b""


# ---- waits: Ctrl-C, close from another thread ---------------------------------------------------

@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32",
                    reason="needs os.kill(SIGINT)")
@pytest.mark.timeout(120, method="thread")  # a core that ignored SIGINT would ignore SIGALRM too
def test_ctrl_c_interrupts_a_blocking_receive(pair):
    a, b = pair
    assert_interrupted_promptly(*call_with_ctrl_c(lambda: b.recv_bytes(timeout=60.0)))
    a.send_bytes(b"still works")
    assert b.recv_bytes(timeout=TIMEOUT) == b"still works"


def test_close_from_another_thread_wakes_a_blocked_receive(pair):
    _, b = pair
    receiver = Background(b.recv_bytes, timeout=TIMEOUT)
    threading.Event().wait(0.2)  # let it block (if not yet, it gets "handle is closed" anyway)
    b.close()
    with pytest.raises(OSError, match="^handle is closed") as info:
        receiver.result()
    assert not isinstance(info.value, TimeoutError)


# ---- the socket and the object ------------------------------------------------------------------

def test_the_socket_is_nonblocking_with_tcp_nodelay(pair):
    a, _ = pair
    assert os.get_blocking(a.fileno()) is False
    with socket.socket(fileno=os.dup(a.fileno())) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_an_unclosed_channel_warns_and_closes_its_socket(pair, impl):
    a, _ = pair
    fd = os.dup(a.fileno())
    holder = [impl(fd)]
    with pytest.warns(ResourceWarning, match=rf"^unclosed <loopfast.Channel fd={fd} mode='rw'>$"):
        holder.clear()  # the last reference: the channel is finalized here
    with pytest.raises(OSError):
        os.fstat(fd)


def test_properties_and_repr(make_pair):
    reader, writer = make_pair({"writable": False, "max_message_size": 5000},
                               {"readable": False})
    assert (reader.readable, reader.writable, reader.max_message_size) == (True, False, 5000)
    assert (writer.readable, writer.writable) == (False, True)
    assert repr(reader) == f"<loopfast.Channel fd={reader.fileno()} mode='r'>"
    writer.close()
    assert writer.closed
    assert repr(writer) == "<loopfast.Channel closed mode='w'>"
    writer.close()  # closing twice is fine


def test_receiving_a_large_message_allocates_it_once(pair):
    a, b = pair
    size = 32 * MiB
    data = payload(size, seed=7)
    tracemalloc.start()
    try:
        sender = Background(a.send_bytes, data)
        got = b.recv_bytes(timeout=TIMEOUT)
        sender.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == data
    assert peak < size + 2 * MiB


def test_recv_bytes_into_and_send_bytes_never_copy_a_large_payload(pair):
    a, b = pair
    size = 32 * MiB
    data = payload(size, seed=8)
    buf = bytearray(size)
    tracemalloc.start()
    try:
        sender = Background(a.send_bytes, data)
        n = b.recv_bytes_into(buf, timeout=TIMEOUT)
        sender.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == size and buf == data
    assert peak < 1 * MiB


# ---- arguments both refuse ---------------------------------------------

@pytest.mark.parametrize("options", [{}, {"max_message_size": 1000.5}],
                         ids=["fd", "max_message_size"])
def test_a_float_is_refused_where_an_integer_is_needed(pair, impl, options):
    a, _ = pair
    fd = os.dup(a.fileno())
    try:
        with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
            impl(fd + 0.5 if not options else fd, **options).close()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # taken over and closed by a channel that accepted it


def test_a_file_descriptor_that_is_not_a_socket_is_refused(impl):
    read_fd, write_fd = os.pipe()
    try:
        with pytest.raises(OSError):
            impl(read_fd).close()
    finally:
        for fd in (read_fd, write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# ---- the same exceptions, with the same messages ------------------------------------------------

def _closed(make):
    a, _ = make()
    a.close()
    return a


def _after(make, raw):
    """The receiving end of a pair whose other end wrote `raw` and closed."""
    a, b = make()
    a._send_raw(raw)
    a.close()
    return b


ERROR_CASES = {
    "recv on a closed channel": lambda make: _closed(make).recv_bytes(),
    "send on a closed channel": lambda make: _closed(make).send_bytes(b"x"),
    "fileno of a closed channel": lambda make: _closed(make).fileno(),
    "poll on a closed channel": lambda make: _closed(make).poll(),
    "_recv_raw on a closed channel": lambda make: _closed(make)._recv_raw(1),
    "recv on a write-only end": lambda make: make(None, {"readable": False})[1].recv(),
    "send on a read-only end": lambda make: make({"writable": False})[0].send(1),
    "negative offset": lambda make: make()[0].send_bytes(b"abc", -1),
    "offset beyond the buffer": lambda make: make()[0].send_bytes(b"abc", 4),
    "negative size": lambda make: make()[0].send_bytes(b"abc", 0, -1),
    "size beyond the buffer": lambda make: make()[0].send_bytes(b"abc", 1, 3),
    "float offset": lambda make: make()[0].send_bytes(b"abc", 1.0),
    "not a buffer": lambda make: make()[0].send_bytes("abc"),
    "negative offset into": lambda make: make()[0].recv_bytes_into(bytearray(3), -1),
    "offset beyond the buffer into": lambda make: make()[0].recv_bytes_into(bytearray(3), 4),
    "read-only buffer into": lambda make: make()[0].recv_bytes_into(b"abc"),
    "negative maxlength": lambda make: make()[0].recv_bytes(-1),
    "negative maxlength on a closed channel": lambda make: _closed(make).recv_bytes(-1),
    "NaN timeout": lambda make: make()[0].recv_bytes(timeout=float("nan")),
    "string timeout": lambda make: make()[0].recv(timeout="1"),
    "unpicklable object": lambda make: make()[0].send(lambda: None),
    "nothing arrives": lambda make: make()[0].recv_bytes(timeout=EXPIRES),
    "end of stream": lambda make: _after(make, b"").recv_bytes(timeout=TIMEOUT),
    "end in mid-frame": lambda make: _after(make, frame(b"abc")[:-1]).recv_bytes(timeout=TIMEOUT),
    "end in a large payload": lambda make: _after(make, frame(payload(70 * KiB))[:-1])
    .recv_bytes(timeout=TIMEOUT),
    "malformed header": lambda make: _after(make, bytes(16)).recv_bytes(timeout=TIMEOUT),
    "over max_message_size": lambda make: _after(make, FRAME_HEADER.pack(1, 0, 0, 0, 2**40))
    .recv_bytes(timeout=TIMEOUT),
    "longer than maxlength": lambda make: _after(make, frame(b"abc"))
    .recv_bytes(2, timeout=TIMEOUT),
    "buffer too short": lambda make: _after(make, frame(b"abc"))
    .recv_bytes_into(bytearray(2), timeout=TIMEOUT),
    "timeout in a large message": lambda make: _cut_large(make),
    "handover in the middle of a large message": lambda make: _cut_large_then_hand_over(make),
    "handover in the middle of a send": lambda make: _cut_send_then_hand_over(make),
}


def _cut_large(make):
    a, b = make()
    a._send_raw(frame(payload(200 * KiB))[:20 * KiB])
    assert b.poll(TIMEOUT)
    return b.recv_bytes(timeout=EXPIRES)


def _cut_large_then_hand_over(make):
    a, b = make()
    a._send_raw(frame(payload(200 * KiB))[:20 * KiB])
    assert b.poll(TIMEOUT)
    with pytest.raises(TimeoutError):
        b.recv_bytes(timeout=EXPIRES)
    b._prepare_handover()


def _cut_send_then_hand_over(make):
    a, _ = make()
    _fill_the_socket_buffers(a)
    a._prepare_handover()


CONSTRUCTOR_CASES = {
    "negative fd": lambda cls: cls(-1),
    "neither readable nor writable": lambda cls: cls(0, False, False),
    "negative max_message_size": lambda cls: cls(0, max_message_size=-1),
    "huge fd": lambda cls: cls(2**70),
    "fd over a C int": lambda cls: cls(2**31),
}


def _outcome(action):
    try:
        action()
    except Exception as exc:
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_both_implementations_raise_the_same_exception(case):
    made = []

    def maker(cls):
        def make(first_options=None, second_options=None):
            pair = connected_pair(cls, cls, first_options, second_options)
            made.extend(pair)
            return pair
        return make

    try:
        compiled = _outcome(lambda: ERROR_CASES[case](maker(COMPILED)))
        pure = _outcome(lambda: ERROR_CASES[case](maker(PURE)))
    finally:
        for channel in made:
            channel.close()
    assert compiled is not None, "the case raised nothing"
    assert pure == compiled


@pytest.mark.parametrize("case", sorted(CONSTRUCTOR_CASES))
def test_both_constructors_refuse_the_same_arguments(case):
    compiled = _outcome(lambda: CONSTRUCTOR_CASES[case](COMPILED))
    pure = _outcome(lambda: CONSTRUCTOR_CASES[case](PURE))
    assert compiled is not None
    assert pure == compiled


# ==== Part 2: a compiled end paired with a pure end ==============================================

PAIRINGS = {"compiled-listener/pure-connector": (COMPILED, PURE),
            "pure-listener/compiled-connector": (PURE, COMPILED)}


@pytest.fixture(params=sorted(PAIRINGS))
def mixed_pair(request):
    first, second = connected_pair(*PAIRINGS[request.param])
    yield first, second
    first.close()
    second.close()


def mixed_sizes(count, seed):
    """Message sizes: mostly small, some at the 8 KiB and 64 KiB thresholds, a few large."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.70:
            sizes.append(rng.randrange(0, 300))
        elif roll < 0.85:
            sizes.append(rng.randrange(8 * KiB - 20, 8 * KiB + 20))
        elif roll < 0.97:
            sizes.append(rng.randrange(64 * KiB - 20, 64 * KiB + 20))
        else:
            sizes.append(rng.randrange(100 * KiB, 1 * MiB))
    return sizes


def _send_messages(channel, sizes, seed):
    for i, size in enumerate(sizes):
        if i % 7 == 3:
            channel.send(("object", i, payload(size, seed + i)), timeout=TIMEOUT)
        else:
            channel.send_bytes(payload(size, seed + i), timeout=TIMEOUT)


def _receive_messages(channel, sizes, seed):
    """Receive len(sizes) messages sent by _send_messages; return the indices that differ."""
    wrong = []
    buf = bytearray(2 * MiB)
    for i, size in enumerate(sizes):
        expected = payload(size, seed + i)
        if i % 7 == 3:
            ok = channel.recv(timeout=TIMEOUT) == ("object", i, expected)
        elif i % 2:
            n = channel.recv_bytes_into(buf, timeout=TIMEOUT)
            ok = buf[:n] == expected
        else:
            got = channel.recv_bytes(timeout=TIMEOUT)
            ok = type(got) is bytes and got == expected
        if not ok:
            wrong.append(i)
    return wrong


def test_a_compiled_end_and_a_pure_end_exchange_thousands_of_messages_both_ways(mixed_pair):
    first, second = mixed_pair
    forth, back = mixed_sizes(3000, seed=1), mixed_sizes(3000, seed=2)
    senders = [Background(_send_messages, first, forth, 100),
               Background(_send_messages, second, back, 200)]
    receiver = Background(_receive_messages, second, forth, 100)
    assert _receive_messages(first, back, 200) == []
    assert receiver.result() == []
    for sender in senders:
        sender.result()


def test_interop_stream_stays_intact_after_timeouts(mixed_pair):
    first, second = mixed_pair
    data = payload(1 * MiB, seed=9)
    wire = frame(data) + frame(b"next")
    first._send_raw(wire[:20 * KiB])
    assert second.poll(TIMEOUT)
    with pytest.raises(TimeoutError, match="in the middle of a message"):
        second.recv_bytes(timeout=EXPIRES)
    sender = Background(first._send_raw, wire[20 * KiB:])
    assert second.recv_bytes(timeout=TIMEOUT) == data
    assert second.recv_bytes(timeout=TIMEOUT) == b"next"
    sender.result()


def _echo(channel, count):
    """In the child: send back every message, reversed, then the count."""
    for _ in range(count):
        channel.send_bytes(channel.recv_bytes(timeout=TIMEOUT)[::-1], timeout=TIMEOUT)
    channel.send(count, timeout=TIMEOUT)
    channel.close()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs the fork start method")
@pytest.mark.parametrize("child_impl", ["compiled", "pure"])
def test_a_fork_child_with_one_implementation_talks_to_a_parent_with_the_other(child_impl):
    child_cls = IMPLEMENTATIONS[child_impl]
    parent_cls = PURE if child_cls is COMPILED else COMPILED
    parent_end, child_end = connected_pair(parent_cls, child_cls)
    sizes = mixed_sizes(500, seed=3)
    try:
        process = multiprocessing.get_context("fork").Process(
            target=_echo, args=(child_end, len(sizes)), daemon=True)
        process.start()
        child_end.close()  # the child has its own copy
        try:
            sender = Background(lambda: [parent_end.send_bytes(payload(size, i), timeout=TIMEOUT)
                                         for i, size in enumerate(sizes)])
            wrong = [i for i, size in enumerate(sizes)
                     if parent_end.recv_bytes(timeout=TIMEOUT) != payload(size, i)[::-1]]
            assert parent_end.recv(timeout=TIMEOUT) == len(sizes)
            sender.result()
        finally:
            process.join(JOIN_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join(10)
        assert wrong == []
        assert process.exitcode == 0
    finally:
        parent_end.close()
        child_end.close()
