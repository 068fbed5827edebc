"""The protocol's numbers, in one place: the wire format (handshake, frames, the three frame
kinds) and the sizes both channel implementations are tuned with.

docs/protocol.md is the specification; the numbers here must match it. The compiled core
(_core/channel.pyx) repeats them as C enum values, for speed; a test (tests/core/test_backend.py)
checks that every one there equals the one here. The pure-Python twin (_core/channel_py.py)
imports them from here.
"""

import errno
import struct
import sys

# ---- handshake (docs/protocol.md, "Handshake") ----
MAGIC = b"LOOPFAST"
VERSION = 1
# magic, version, flags, reserved, nonce: 48 bytes, little-endian
HELLO = struct.Struct("<8sHHI32s")
HELLO_FLAG_AUTH = 0x0001  # the sender has an authkey and requires the proof exchange
NONCE_SIZE = 32
PROOF_SIZE = 32  # HMAC-SHA256 digest
PROOF_LABEL_LISTENER = b"loopfast-1 listener proof"
PROOF_LABEL_CONNECTOR = b"loopfast-1 connector proof"

# ---- frames (docs/protocol.md, "Frames") ----
# kind, flags, reserved, count, payload length: 16 bytes, little-endian
FRAME_HEADER = struct.Struct("<BBHIQ")
HEADER_SIZE = FRAME_HEADER.size  # 16
PART_SIZE = struct.Struct("<Q")  # one entry of an object message's size table
KIND_BYTES = 1   # payload is raw bytes (send_bytes)
KIND_PICKLE = 2  # payload is a pickle (send), all in band
KIND_OBJECT = 3  # a pickle-5 with out-of-band buffers (send): size table, pickle, buffers
# Most out-of-band buffers one object message may carry: with the header, its size table (8 bytes
# per part, 16 + 8 * 8192 = 65,552 bytes) always fits in a receiver's window. A pickle with more
# goes in band (kind 2). Not a wire limit a peer may exceed: a receiver refuses more.
MAX_OOB_BUFFERS = 8191
# Senders keep buffers smaller than this in the in-band pickle: out of band they would cost an
# allocation and a table entry each, for a copy that is cheap anyway (a sender's choice).
OOB_MIN_SIZE = 4096

# Largest payload a channel accepts unless told otherwise: large enough for any realistic single
# message (a 2.5 GiB array passes), small enough that a corrupt or hostile length field cannot
# make us try to allocate an absurd amount. None means no limit.
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024**3

# How long the listening side waits for a connecting peer to finish the handshake, so that one
# silent client cannot hold up accept() for everyone else (seconds).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

# ---- sizes the channels are tuned with (a sender's or receiver's choice, not wire limits) ----
# The window: a copy of the head of the socket's queue, taken with a peek (MSG_PEEK). It holds
# the largest frame head (an object message's header and size table, 16 + 8 * 8192 = 65,552
# bytes) with room to spare.
RECV_BUFFER_SIZE = 128 * 1024
# How much one peek looks at. A channel keeps what it saw between calls while no other process
# receives from its socket, so a big look serves many small messages; when another one does,
# every receive must look again, so it looks at little: a frame header and a small payload.
PEEK_SIZE = 64 * 1024
PEEK_SIZE_SHARED = 4096 + HEADER_SIZE
# An incomplete message is read into its parts with scatter reads of up to this many parts.
PENDING_IOV = 64
# From a peer not trusted (no authkey proved, another user), a message's parts are allocated as
# its bytes arrive: at most this much, or as much as has arrived if that is more, ahead of them.
RESERVE_FLOOR = 64 * 1024
# recv_bytes_many() looks at the queue at most this many more times per call.
MANY_LOOKS = 4
# A frame up to this size is assembled with its header in one contiguous buffer and sent with
# send(); above it, header and payload go out with one gather write (sendmsg) and no copy.
# Measured (stream between two processes, msg/s, copy+send vs sendmsg): 256 B 567k vs 543k,
# 1 KiB 506k vs 496k, 4 KiB 401k vs 388k, 8 KiB 334k vs 331k, 16000 B 251k vs 270k.
SMALL_SEND_SIZE = 8 * 1024
# Inside batch(), the buffered frames are written once they reach this size.
BATCH_FLUSH_SIZE = 64 * 1024
# A handover that must wait for a receive in another thread to end looks again this often (ns).
HANDOVER_NAP_NS = 200 * 1000

# The largest descriptor number: a C int on POSIX, a SOCKET (pointer-sized) on Windows.
FD_MAX = ((2**64 - 1 if sys.maxsize > 2**32 else 2**32 - 1) if sys.platform == "win32"
          else 2**31 - 1)

# ---- listeners (connection.Listener and aio.Listener alike) ----
# Default backlog of both listeners: a burst of connects (a pool starting its workers, a service's
# clients starting at once) fits, where multiprocessing's backlog of 1 made 29-47% of a burst
# of connects wait for a SYN retry (1 s) here; asyncio.start_server's default is 100 too.
DEFAULT_BACKLOG = 100
ACCEPT_BURST = 64  # connections accept() takes from the backlog per wake-up, at most
ACCEPT_PAUSE = 0.1  # seconds accepting waits after EMFILE (unless a descriptor is freed first)
# accept() errors that mean "out of descriptors or memory": accepting pauses (ACCEPT_PAUSE)
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
