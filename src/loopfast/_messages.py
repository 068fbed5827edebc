"""The error messages both channel implementations raise, written once: the tests compare the
two implementations' exceptions, texts included (tests/core/test_twin.py). Templates are
filled with str.format()."""

# ---- arguments ----
NEITHER_DIRECTION = "at least one of `readable` and `writable` must be True"
BAD_MAX_MESSAGE_SIZE = "max_message_size must be >= 0 or None"
BAD_MAX_MESSAGES = "max_messages must be >= 1 or None"
BAD_SPIN = "spin must be a number of microseconds >= 0, or None"
NAN_TIMEOUT = "timeout must be a number, not NaN"

# ---- waiting ----
TIMED_OUT_WAITING = "timed out waiting for a message"
TIMED_OUT_MID_MESSAGE = "timed out in the middle of a message; the next receive resumes it"
TIMED_OUT_SEND = "timed out sending a message"
TIMED_OUT_SENDING = ("timed out after sending {sent} of {total} bytes of a message; the rest goes "
                     "out before the next message")
TIMED_OUT_EARLIER = ("timed out sending the rest of an earlier message ({sent} of the {total} "
                     "bytes left went out); this message was not sent")
TIMED_OUT_LOCK = "timed out waiting for another thread's {what} on this channel to finish"
CLOSED_WHILE_WAITING = "handle is closed (by another thread, while this one waited)"

# ---- the stream ----
PEER_CLOSED = "the peer closed the connection"
PEER_CLOSED_MID_MESSAGE = "the peer closed the connection in the middle of a message"
LOST_MID_MESSAGE = "connection lost in the middle of a message"
OBJECT_NEEDS_RECV = ("the next message was sent with send() and carries out-of-band buffers: "
                     "receive it with recv()")
BAD_MESSAGE_LENGTH = "bad message length"  # multiprocessing's words
# multiprocessing's words first (programs may match them), then what happened
READING_STOPPED = ("connection is write-only since recv_bytes(maxlength={maxlength}) met a "
                   "{length}-byte message (OSError: bad message length): receiving stopped there, "
                   "as multiprocessing's connections do, and that message stays unread")
WRITE_ONLY = "connection is write-only"
HANDOVER_MID_SEND = "cannot hand over a channel in the middle of sending a message"
HANDOVER_MID_RECEIVE = "cannot hand over a channel in the middle of receiving a large message"

# ---- bad frame heads (_parse_head in either implementation) ----
MALFORMED_HEADER = ("malformed frame header {header} (is the peer a loopfast channel of the same "
                    "protocol version?)")
TOO_MANY_BUFFERS = ("malformed object frame: {count} out-of-band buffers (at most {most}) in "
                    "{length} bytes")
OVER_LIMIT = ("the peer announced a {length}-byte message, over this channel's max_message_size "
              "of {limit} bytes")
OVER_MACHINE = "the peer announced a {length}-byte message, too large for this machine"
PARTS_DO_NOT_ADD_UP = ("malformed object frame: the sizes of its {parts} parts do not add up to "
                       "its length of {length} bytes")
