"""Write the seed inputs of the frame-decoder fuzz harness to tools/fuzz/corpus/frames/.

Each seed is a byte stream a peer could send after the handshake (docs/protocol.md, "Frames" and
"Objects"): valid streams of each kind, batches, sizes at the 8 KiB / 64 KiB thresholds of the
decoder, object messages with size tables, and streams that are cut short or malformed.
Run: python tools/fuzz/make_corpus.py (rewrites the seed-* files; found-* files are kept).
"""

import os
import pickle
import random
import socket
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus", "frames")
HEADER = struct.Struct("<BBHIQ")
MAX_MESSAGE_SIZE = 1 << 20  # frames_check.MAX_MESSAGE_SIZE


def frame(kind, payload, count=0, length=None, flags=0, reserved=0):
    return HEADER.pack(kind, flags, reserved, count, len(payload) if length is None else length) \
        + payload


def obj(pickle_bytes, buffers, sizes=None):
    """An object message (kind 3); `sizes` overrides the size table."""
    table = sizes if sizes is not None else [len(pickle_bytes)] + [len(b) for b in buffers]
    body = struct.pack(f"<{len(table)}Q", *table) + pickle_bytes + b"".join(buffers)
    return frame(3, body, count=len(table) - 1)


def from_real_sender():
    """A stream written by a real (pure-Python) channel: send_bytes, send_bytes_many, send()."""
    sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
    from loopfast._core.channel_py import Channel
    a, b = socket.socketpair()
    out = bytearray()
    with Channel(a.detach()) as sender:
        sender.send_bytes(b"first")
        sender.send_bytes_many([b"x" * n for n in (0, 1, 100, 9000)])
        sender.send(pickle.PickleBuffer(bytearray(range(256)) * 20))  # out of band: kind 3
        sender.send([1, 2.5, "three", b"four", None])
        with sender.batch():
            for n in range(20):
                sender.send_bytes(bytes([n]) * n)
    while True:
        chunk = b.recv(1 << 16)
        if not chunk:
            break
        out += chunk
    b.close()
    return bytes(out)


def seeds():
    rng = random.Random(1)
    hi = frame(1, b"hi")
    yield "empty", b""
    yield "bytes-hi", hi
    yield "pickle-kind2", frame(2, pickle.dumps([1, "a"], protocol=5))
    yield "empty-messages", frame(1, b"") + frame(2, b"") + frame(1, b"")
    for n in (8191, 8192, 8193, 65535, 65536, 65537):
        yield f"bytes-{n}", frame(1, bytes([n % 251]) * n) + hi
    yield "big-100000", frame(2, rng.randbytes(100000)) + hi
    yield "batch-small", b"".join(frame(1 + (i % 2), rng.randbytes(rng.randint(0, 300)))
                                  for i in range(200))
    yield "batch-mixed", b"".join(frame(1, rng.randbytes(n)) for n in (5, 70000, 3, 8200, 0, 1))
    yield "real-sender", from_real_sender()
    # object messages
    yield "object-doc-example", obj(b"\x80\x05\x97.", [b"hi!"])
    yield "object-two-buffers", obj(b"\x80\x05\x97\x97\x86.", [b"a" * 5000, b"b" * 3]) + hi
    yield "object-readonly", obj(b"\x80\x05\x97\x98.", [b"ro"])
    yield "object-empty-buffer", obj(b"\x80\x05\x97.", [b""])
    yield "object-large-buffer", obj(b"\x80\x05\x97.", [rng.randbytes(70000)]) + hi
    yield "object-unused-buffers", obj(b"N.", [b"1", b"22", b"333"])
    yield "object-8191-buffers", obj(b"N.", [b""] * 8191)
    yield "object-global-refused", obj(b"cbuiltins\nbytearray\n\x97\x85R.", [b"x"])
    yield "object-then-bytes", obj(b"\x80\x05\x97.", [b"z" * 10]) + frame(1, b"after")
    # cut short
    yield "cut-header", hi + frame(1, b"abc")[:9]
    yield "cut-payload", hi + frame(1, b"abcdef")[:-2]
    yield "cut-large-payload", frame(1, b"q" * 70000)[:40000]
    yield "cut-object-table", obj(b"N.", [b"a", b"b"])[:28]
    yield "cut-object-body", obj(b"N.", [b"a" * 100])[:-10]
    # malformed headers and tables
    yield "kind-0", hi + frame(0, b"x")
    yield "kind-4", hi + frame(4, b"x")
    yield "flags-set", frame(1, b"x", flags=1)
    yield "reserved-set", frame(2, b"x", reserved=0x100)
    yield "count-on-bytes", frame(1, b"x" * 16, count=1)
    yield "object-count-0", frame(3, b"x" * 8, count=0)
    yield "object-count-8192", frame(3, b"\0" * 16, count=8192, length=8 * 8193)
    yield "object-length-under-table", frame(3, b"\0" * 8, count=1)
    yield "object-sizes-mismatch", obj(b"N.", [b"ab"], sizes=[2, 3])
    # sizes that add up to the length only modulo 2**64
    yield "object-sizes-wrap", obj(b"N.", [b"a", b"b"], sizes=[2, 2**64 - 1, 3])
    yield "over-max-by-1", frame(1, b"", length=MAX_MESSAGE_SIZE + 1)
    yield "at-max-cut", frame(1, b"", length=MAX_MESSAGE_SIZE)
    yield "length-2-63", frame(2, b"", length=2**63)
    yield "length-2-64-minus-1", frame(1, b"", length=2**64 - 1)
    yield "object-over-max", frame(3, b"\0" * 16, count=1, length=2**62)
    yield "garbage-after-frames", hi * 3 + b"LOOPFAST\x01\x00\x00\x00"


def main():
    os.makedirs(CORPUS, exist_ok=True)
    for name in os.listdir(CORPUS):
        if name.startswith("seed-"):
            os.remove(os.path.join(CORPUS, name))
    total = 0
    for name, data in seeds():
        with open(os.path.join(CORPUS, f"seed-{name}"), "wb") as f:
            f.write(data)
        total += len(data)
    print(f"wrote seeds to {CORPUS}: {total} bytes")


if __name__ == "__main__":
    main()
