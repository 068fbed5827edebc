"""Wire-format constants shared by the channel implementation and the handshake.

docs/protocol.md is the specification; the numbers here must match it.
"""

import struct

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
