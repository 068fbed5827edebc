"""The check behind the frame-decoder fuzz harness and its corpus replay (no atheris needed).

`check(channel_cls, data, seed)` feeds `data`, the byte stream a peer sends after the handshake,
to a real channel of class `channel_cls` over a socket pair (written by another thread in chunks),
drains it with receive calls chosen by a PRNG seeded from the data (recv_bytes, recv_bytes with a
maxlength, recv, recv_bytes_into, recv_bytes_many), and compares every outcome with what a small
reference parser written from docs/protocol.md says the stream holds. Anything else (a wrong
message, a wrong exception, a timeout) raises `Finding`.

Unpickling: recv() of kind 1/2 frames goes through a serializer whose loads() only tags the bytes,
so no pickle runs for them. Kind 3 (object) frames are always unpickled by the channel; while the
channel or the reference unpickles, an audit hook refuses every `pickle.find_class` (no global,
hence no callable, can be loaded), so a fuzzed pickle can only build plain data (lists, bytes,
...), never run code.
"""

import pickle
import random
import socket
import struct
import sys
import threading
import zlib

HEADER = struct.Struct("<BBHIQ")  # kind, flags, reserved, count, length (docs/protocol.md)
HEADER_SIZE = HEADER.size
KIND_BYTES, KIND_PICKLE, KIND_OBJECT = 1, 2, 3
MAX_OOB_BUFFERS = 8191
MAX_MESSAGE_SIZE = 1 << 20  # small: a declared length over it is refused before allocation
CALL_TIMEOUT = 10.0  # every receive is bounded; all input is written, so a timeout is a hang
MAX_STEPS = 4096  # receive calls per input (each consumes a message or ends the stream)


class Finding(AssertionError):
    """The channel did something the protocol does not allow."""


# ---- the pickle guard ---------------------------------------------------------------------------

class PickleGlobalRefused(Exception):
    """Raised (by the audit hook) when a fuzzed pickle tries to load a global."""


_guard = threading.local()
_hook_installed = False


def _audit_hook(event, args):
    if event == "pickle.find_class" and getattr(_guard, "on", False):
        raise PickleGlobalRefused(f"{args[0]}.{args[1]}")


def _install_guard():
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit_hook)  # cannot be removed; inert unless _guard.on in this thread
        _hook_installed = True


class _Guarded:
    def __enter__(self):
        _guard.on = True

    def __exit__(self, *exc_info):
        _guard.on = False


class TagSerializer:
    """recv() of a kind 1/2 frame returns ("loads", payload): the frame layer is fuzzed, not
    pickle."""

    @staticmethod
    def dumps(obj):
        return bytes(obj)

    @staticmethod
    def loads(data):
        return ("loads", bytes(data))


# ---- reference parser (docs/protocol.md, "Frames" and "Objects") --------------------------------

def parse_stream(data, max_message_size=MAX_MESSAGE_SIZE):
    """What a correct receiver finds in `data`: (messages, end).

    A message is ("plain", kind, payload) for kinds 1 and 2, ("object", pickle, [buffer, ...]) for
    kind 3. `end` says how the stream ends after the last whole message:
    ("eof",) exactly between frames; ("error",) a protocol error every receive reports (a bad
    header, an over-limit length, a partial header, a bad or partial size table);
    ("plain_truncated", length) a valid kind 1/2 header whose payload is cut short;
    ("object_bad",) a valid kind 3 header (table or body bad or cut short): recv() reports a
    protocol error, recv_bytes()/recv_bytes_into()/recv_bytes_many() refuse it (OSError) first.
    """
    messages = []
    pos = 0
    size = len(data)
    while True:
        if pos == size:
            return messages, ("eof",)
        if size - pos < HEADER_SIZE:
            return messages, ("error",)
        kind, flags, reserved, count, length = HEADER.unpack_from(data, pos)
        if kind not in (KIND_BYTES, KIND_PICKLE, KIND_OBJECT) or flags or reserved:
            return messages, ("error",)
        if (count != 0) != (kind == KIND_OBJECT):
            return messages, ("error",)
        if kind == KIND_OBJECT and (count > MAX_OOB_BUFFERS or length < 8 * (count + 1)):
            return messages, ("error",)
        if length > max_message_size:
            return messages, ("error",)
        body = pos + HEADER_SIZE
        if kind != KIND_OBJECT:
            if size - body < length:
                return messages, ("plain_truncated", length)
            messages.append(("plain", kind, bytes(data[body:body + length])))
            pos = body + length
            continue
        table_size = 8 * (count + 1)
        if size - body < table_size:
            return messages, ("object_bad",)
        sizes = struct.unpack_from(f"<{count + 1}Q", data, body)
        if table_size + sum(sizes) != length:  # arbitrary precision: no wrap-around
            return messages, ("object_bad",)
        if size - body < length:
            return messages, ("object_bad",)
        part = body + table_size
        parts = []
        for part_size in sizes:
            parts.append(bytes(data[part:part + part_size]))
            part += part_size
        messages.append(("object", parts[0], parts[1:]))
        pos = body + length


def canonical(obj):
    """A comparable description of an unpickled object (memoryviews by content, shared and
    cyclic references by first-visit index, nesting cut at a fixed depth), linear in its size."""
    seen = {}

    def walk(x, depth):
        if depth > 100:
            return "<deep>"
        if isinstance(x, (list, tuple, dict, set, frozenset, memoryview, bytearray)):
            key = id(x)
            if key in seen:
                return ("ref", seen[key])
            seen[key] = len(seen)
        if isinstance(x, memoryview):
            try:
                return ("memoryview", x.readonly, x.format, x.shape, x.tobytes())
            except (ValueError, TypeError, NotImplementedError) as exc:
                return ("memoryview", type(exc).__name__)
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, [walk(item, depth + 1) for item in x])
        if isinstance(x, dict):
            return ("dict", [(walk(k, depth + 1), walk(v, depth + 1)) for k, v in x.items()])
        if isinstance(x, (set, frozenset)):
            return (type(x).__name__, sorted(repr(walk(item, depth + 1)) for item in x))
        if isinstance(x, float) and x != x:
            return ("float", "nan")
        return (type(x).__name__, repr(x))

    return walk(obj, 0)


def outcome_of_unpickle(pickle_bytes, buffers):
    """What recv() must return or raise for an object message (unpickled under the guard)."""
    with _Guarded():
        try:
            return ("ok", canonical(pickle.loads(pickle_bytes, buffers=buffers)))
        except Exception as exc:
            return ("raises", type(exc).__name__, str(exc))


# ---- the check ----------------------------------------------------------------------------------

def _load_errors():
    import loopfast
    return loopfast.ProtocolError, loopfast.BufferTooShort


def _writer(sock, data, chunks):
    try:
        view = memoryview(data)
        pos = 0
        for size in chunks:
            sock.sendall(view[pos:pos + size])
            pos += size
        sock.sendall(view[pos:])
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the channel stopped reading (protocol error) and closed its end


def _chunks(rng, size):
    """Random write sizes: mostly small (headers split across writes), sometimes large."""
    out = []
    total = 0
    mode = rng.randrange(4)
    if mode == 0:
        return out  # one write
    while total < size and len(out) < 64:
        if mode == 1:
            n = rng.randint(1, 17)
        elif mode == 2:
            n = rng.randint(1, 70000)
        else:
            n = rng.choice((1, 7, 8, 15, 16, 17, 4096, 8192, 65536, 65552))
        out.append(n)
        total += n
    return out


def check(channel_cls, data, seed=0, max_message_size=MAX_MESSAGE_SIZE):
    """Feed `data` to a `channel_cls` channel and compare everything it returns with
    parse_stream(data). Raises Finding on any difference."""
    _install_guard()
    ProtocolError, BufferTooShort = _load_errors()
    data = bytes(data)
    messages, end = parse_stream(data, max_message_size)
    rng = random.Random(zlib.crc32(data) ^ (seed * 0x9E3779B1))
    reader, writer = socket.socketpair()
    try:
        # A read-only channel closes itself on a message over maxlength; a duplex one stops
        # reading instead (as multiprocessing does): both paths are checked.
        channel = channel_cls(reader.detach(), writable=rng.random() < 0.5,
                              max_message_size=max_message_size, serializer=TagSerializer())
    finally:
        reader.close()
    thread = threading.Thread(target=_writer, args=(writer, data, _chunks(rng, len(data))),
                              daemon=True)
    thread.start()
    trace = []

    def fail(what):
        raise Finding(f"{what}; messages expected: {len(messages)}, end: {end}, "
                      f"calls so far: {trace}")

    try:
        index = 0  # next message the channel must deliver
        refused = False
        # Some calls get timeout=0: while the writer is still writing they may time out in the
        # middle of a message, which must change nothing (the next call resumes the message).
        quick_share = rng.choice((0.0, 0.0, 0.3, 0.8))
        quick_left = 64
        for _ in range(MAX_STEPS):
            op = "recv" if refused else rng.choice(
                ("recv_bytes", "recv_bytes", "recv_bytes_max", "recv", "recv",
                 "recv_bytes_into", "recv_bytes_many", "poll"))
            refused = False
            message = messages[index] if index < len(messages) else None
            timeout = CALL_TIMEOUT
            if quick_left > 0 and rng.random() < quick_share:
                timeout = 0
                quick_left -= 1
            trace.append(op if timeout else f"{op}@0")
            if op == "poll":
                _check_ready(channel, timeout, rng, fail)
                continue
            result = None
            error = None
            buf = offset = limit = maxlength = None
            try:
                if op == "recv_bytes":
                    result = channel.recv_bytes(timeout=timeout)
                elif op == "recv_bytes_max":
                    maxlength = rng.choice((0, 1, 15, 16, 17, 100, 8192, 65536, 1 << 20))
                    trace[-1] += f"(maxlength={maxlength})"
                    result = channel.recv_bytes(maxlength, timeout=timeout)
                elif op == "recv":
                    with _Guarded():
                        result = channel.recv(timeout=timeout)
                elif op == "recv_bytes_into":
                    buf = bytearray(rng.choice((0, 1, 16, 100, 8192, 65536, 65537, 1 << 20)))
                    offset = rng.randint(0, min(len(buf), 32))
                    trace[-1] += f"({len(buf)}, {offset})"
                    result = channel.recv_bytes_into(buf, offset, timeout=timeout)
                else:
                    limit = rng.choice((None, None, 1, 2, 3, 100))
                    trace[-1] += f"({limit})"
                    result = channel.recv_bytes_many(limit, timeout=timeout)
            except Exception as exc:
                error = exc
            if isinstance(error, TimeoutError):
                if timeout == 0:
                    continue  # nothing consumed: the next call gets the same message
                fail(f"{trace[-1]} timed out after {CALL_TIMEOUT} s with all input written")
            if isinstance(error, PickleGlobalRefused) and message is None:
                fail(f"{trace[-1]} unpickled something beyond the last message")

            # -- end of the stream: no message left --
            if message is None:
                if end == ("eof",):
                    if not isinstance(error, EOFError):
                        fail(f"{trace[-1]} at a clean end gave {result!r} / {error!r}, "
                             "not EOFError")
                    try:
                        channel.recv_bytes(timeout=CALL_TIMEOUT)
                    except EOFError:
                        return
                    except Exception as exc:
                        fail(f"a receive after EOFError raised {exc!r}, not EOFError")
                    fail("a receive after EOFError returned a message")
                bytes_op = op != "recv"
                if end == ("object_bad",) and bytes_op:
                    if type(error) is not OSError or "recv()" not in str(error):
                        fail(f"{trace[-1]} of an object message gave {result!r} / {error!r}, "
                             "not the OSError that refuses it")
                    refused = True
                    continue
                if (end[0] == "plain_truncated" and op == "recv_bytes_max"
                        and end[1] > maxlength):
                    _expect_bad_length(error, fail)
                    return
                if not isinstance(error, ProtocolError):
                    fail(f"{trace[-1]} at a bad or cut stream end ({end}) gave "
                         f"{result!r} / {error!r}, not ProtocolError")
                if not channel.closed:
                    fail("the channel is still open after a ProtocolError")
                return

            # -- an object message is next --
            if message[0] == "object":
                if op != "recv":
                    if type(error) is not OSError or "recv()" not in str(error):
                        fail(f"{trace[-1]} of an object message gave {result!r} / {error!r}, "
                             "not the OSError that refuses it")
                    refused = True
                    continue
                expected = outcome_of_unpickle(message[1], [bytearray(b) for b in message[2]])
                if error is not None:
                    actual = ("raises", type(error).__name__, str(error))
                else:
                    actual = ("ok", canonical(result))
                if actual != expected:
                    fail(f"recv() of object message {index} gave {actual!r}, "
                         f"expected {expected!r}")
                index += 1
                continue

            # -- a kind 1/2 message is next --
            payload = message[2]
            if error is not None and not isinstance(error, BufferTooShort):
                if op == "recv_bytes_max" and len(payload) > maxlength:
                    _expect_bad_length(error, fail)
                    return
                fail(f"{trace[-1]} of message {index} ({len(payload)} B) raised {error!r}")
            if op in ("recv_bytes", "recv_bytes_max"):
                if op == "recv_bytes_max" and len(payload) > maxlength:
                    fail(f"{trace[-1]} returned a {len(payload)}-byte message")
                if type(result) is not bytes or result != payload:
                    fail(f"{trace[-1]} returned {_short(result)}, expected {_short(payload)}")
                index += 1
            elif op == "recv":
                if result != ("loads", payload):
                    fail(f"recv() returned {_short(result)}, expected loads({_short(payload)})")
                index += 1
            elif op == "recv_bytes_into":
                space = len(buf) - offset
                if len(payload) > space:
                    if not isinstance(error, BufferTooShort) or error.args[0] != payload:
                        fail(f"{trace[-1]} of a {len(payload)}-byte message gave "
                             f"{result!r} / {error!r}, not BufferTooShort with the message")
                elif error is not None or result != len(payload) \
                        or buf[offset:offset + len(payload)] != payload:
                    fail(f"{trace[-1]} gave {result!r} / {error!r} for a "
                         f"{len(payload)}-byte message (content equal: "
                         f"{buf[offset:offset + len(payload)] == payload})")
                index += 1
            else:
                if error is not None or type(result) is not list or not result:
                    fail(f"{trace[-1]} gave {result!r} / {error!r}")
                if limit is not None and len(result) > limit:
                    fail(f"{trace[-1]} returned {len(result)} messages")
                for got in result:
                    message = messages[index] if index < len(messages) else None
                    if message is None or message[0] != "plain" or got != message[2]:
                        fail(f"{trace[-1]} returned {_short(got)} as message {index}, "
                             f"expected {message and _short(message[-1])}")
                    index += 1
        fail(f"still receiving after {MAX_STEPS} calls")
    finally:
        channel.close()
        thread.join(CALL_TIMEOUT)
        writer.close()
        if thread.is_alive():
            raise Finding("the writer thread is stuck after the channel was closed")


def _check_ready(channel, timeout, rng, fail):
    """poll() or loopfast.wait(): never consume anything; with all input written (or coming)
    and the channel open, a wait with a timeout must report it ready."""
    if rng.random() < 0.5:
        ready = channel.poll(timeout)
    else:
        from loopfast import wait
        ready = wait([channel], timeout=timeout) == [channel]
    if timeout and not ready:
        fail(f"not ready after {timeout} s with all input written")


def _expect_bad_length(error, fail):
    if type(error) is not OSError or "bad message length" not in str(error):
        fail(f"a message over maxlength gave {error!r}, not OSError('bad message length')")


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(value)} items/bytes)"
