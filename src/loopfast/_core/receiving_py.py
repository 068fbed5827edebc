"""The pure-Python twin's receive path: the window over the socket's queue, frame heads, taking
exactly the frames returned, and the payloads read straight into their final objects (the design
is in channel_py.py)."""

import io
import socket
import sys

from .. import _messages
from .._errors import BufferTooShort
from .._wire import (
    FRAME_HEADER,
    HEADER_SIZE,
    KIND_BYTES,
    KIND_OBJECT,
    KIND_PICKLE,
    MANY_LOOKS,
    MAX_OOB_BUFFERS,
    PEEK_SIZE,
    PEEK_SIZE_SHARED,
    PENDING_IOV,
    RECV_BUFFER_SIZE,
    RESERVE_FLOOR,
)
from .._wire import (
    PART_SIZE as _SIZE,
)
from .support_py import (
    _CLOSED_WHILE_WAITING,
    _DISCARD_FLAGS,
    _HAVE_RECVMSG,
    _POLLIN,
    _byte_view,
    _deadline,
    _loads,
    _new_payload,
    _part_size,
    _release_all,
    _rest_of_part,
    _ssize,
    _take,
)

# What _parse_head() found.
HEAD_MORE = 0  # not all of the head is there yet
HEAD_OK = 1    # a valid head, all there
HEAD_BAD = 2   # a malformed head

class ReceivePath:
    """The receive half of the twin's Channel (channel_py.py), which holds the state."""

    __slots__ = ()

    # The kernel holds every message not yet delivered. A receive consumes from the socket only
    # the bytes of what it returns, so that an end shared by several processes (under their own
    # lock) and watched by any selector behaves as a multiprocessing connection does. What the
    # channel knows of the queue it learns with a peek (MSG_PEEK) into the window
    # _rbuf[_rstart:_rend]; a frame's bytes are consumed (_discard) only once its payload has its
    # final home.

    def _begin_receive(self, deadline):
        """Start of every receive call (the receive lock is held): finish a deferred handshake,
        and forget the window if another process may have consumed from the socket since."""
        if self._deferred_handshake is not None:
            self._finish_handshake(deadline)
        if self._shared:
            self._rstart = self._rend = 0

    def _peek(self, size):
        """Copy up to `size` queued bytes to the start of the window, consuming nothing. Returns
        how many (> 0), 0 at the end of the stream, -1 when nothing is queued."""
        sock = self._sock
        if sock is None:
            raise OSError("handle is closed")
        size = min(size, RECV_BUFFER_SIZE)
        try:
            n = sock.recv_into(self._rview, size, socket.MSG_PEEK)
        except BlockingIOError:
            n = -1
        except OSError:
            self._rstart = self._rend = 0
            if self._sock is None:
                raise OSError(_CLOSED_WHILE_WAITING) from None
            raise
        if n < 0:
            self._rstart = self._rend = 0
            self._queue_empty = True
            return -1
        self._rstart = 0
        self._rend = n
        self._peek_saw_all = n < size
        return n

    def _know(self, need, deadline):
        """Make the first `need` queued bytes known (in the window), waiting for the first byte.
        True when they are, False when fewer are queued (the rest of a frame is still on its
        way). EOFError when the peer closed the connection with nothing queued."""
        if self._rend - self._rstart >= need:
            return True
        size = max(need, PEEK_SIZE_SHARED if self._shared else PEEK_SIZE)
        # The last look found the queue empty: wait first, saving a peek that would fail.
        if (self._rend == self._rstart and self._queue_empty
                and self._wait(_POLLIN, deadline)):
            raise TimeoutError(_messages.TIMED_OUT_WAITING)
        while True:
            n = self._peek(size)
            if n > 0:
                self._queue_empty = False
                return n >= need
            if n == 0:
                raise EOFError(_messages.PEER_CLOSED)
            if self._wait(_POLLIN, deadline):
                raise TimeoutError(_messages.TIMED_OUT_WAITING)

    def _discard(self, at, n):
        """Consume `n` bytes known (peeked) to be queued, whose copy is _rbuf[at:at + n]: on
        Linux without copying them (MSG_TRUNC), elsewhere by receiving them where they already
        are. Never waits: the bytes are queued."""
        while n > 0:
            sock = self._sock
            if sock is None:
                raise OSError("handle is closed")
            got = -1
            try:
                with self._rview[at:at + n] as part:
                    got = sock.recv_into(part, n, _DISCARD_FLAGS)
            except BlockingIOError:
                pass
            except OSError as exc:
                if self._sock is None:
                    raise OSError(_CLOSED_WHILE_WAITING) from None
                raise self._protocol_error(
                    _messages.LOST_MID_MESSAGE + f" ({exc.strerror or exc})") from exc
            if got > 0:
                n -= got
                at += got
                continue
            if got < 0:
                raise self._protocol_error(
                    "bytes this channel had seen queued were taken by someone else (another "
                    "process receiving without a lock?)")
            raise self._protocol_error(_messages.LOST_MID_MESSAGE)

    def _after_consume(self):
        """After consuming from the window: the queue is empty if the last peek saw all of it."""
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
            self._queue_empty = self._peek_saw_all

    def _recv_some(self, views, deadline):
        """Receive between 1 and all the bytes of `views` (writable byte views, none empty: the
        rest of a frame's parts, their final home) with one read: a scatter read where the
        platform has one, else into the first view. The connection ending here is always in the
        middle of a message."""
        asked = sum(len(view) for view in views) if _HAVE_RECVMSG else len(views[0])
        while True:
            sock = self._sock
            if sock is None:
                raise OSError("handle is closed")
            # The last read came back short: the socket is drained, wait before reading.
            if self._last_recv_was_empty and self._wait(_POLLIN, deadline):
                raise TimeoutError(_messages.TIMED_OUT_MID_MESSAGE)
            n = -1
            try:
                if len(views) == 1 or not _HAVE_RECVMSG:
                    n = sock.recv_into(views[0])
                else:
                    n = sock.recvmsg_into(views)[0]
            except BlockingIOError:
                pass
            except OSError as exc:
                if self._sock is None:
                    raise OSError(_CLOSED_WHILE_WAITING) from None
                raise self._protocol_error(
                    _messages.LOST_MID_MESSAGE + f" ({exc.strerror or exc})") from exc
            if n > 0:
                self._last_recv_was_empty = n < asked
                return n
            if n == 0:
                raise self._protocol_error(
                    _messages.PEER_CLOSED_MID_MESSAGE)
            self._last_recv_was_empty = True

    def _parse_head(self, at, avail):
        """The one place a frame head is parsed: the `avail` bytes at _rbuf[at:] from the start
        of a frame. Returns (status, kind, count, length, head_size, error): HEAD_OK, a valid
        head (its header and, for an object message, its size table) all there; HEAD_MORE, not
        all of it there yet (head_size, once the header is there, says how much is needed; the
        header's fields are known and valid from then on); HEAD_BAD, a malformed head, `error`
        saying what is wrong. No side effects."""
        if avail < HEADER_SIZE:
            return HEAD_MORE, 0, 0, 0, HEADER_SIZE, None
        kind, flags, reserved, count, length = FRAME_HEADER.unpack_from(self._rbuf, at)
        # `count` is the number of out-of-band buffers: not 0 exactly for an object message.
        if (kind not in (KIND_BYTES, KIND_PICKLE, KIND_OBJECT) or flags or reserved
                or (count != 0) != (kind == KIND_OBJECT)):
            header = bytes(self._rview[at:at + HEADER_SIZE])
            return HEAD_BAD, kind, count, length, HEADER_SIZE, _messages.MALFORMED_HEADER.format(
                header=header.hex())
        if kind == KIND_OBJECT and (count > MAX_OOB_BUFFERS or length < 8 * (count + 1)):
            return HEAD_BAD, kind, count, length, HEADER_SIZE, _messages.TOO_MANY_BUFFERS.format(
                count=count, most=MAX_OOB_BUFFERS, length=length)
        if length > self._max_message_size:
            return HEAD_BAD, kind, count, length, HEADER_SIZE, _messages.OVER_LIMIT.format(
                length=length, limit=self._max_message_size_obj)
        if length > sys.maxsize:
            return HEAD_BAD, kind, count, length, HEADER_SIZE, _messages.OVER_MACHINE.format(
                length=length)
        if kind != KIND_OBJECT:
            return HEAD_OK, kind, 0, length, HEADER_SIZE, None
        head_size = HEADER_SIZE + 8 * (count + 1)
        if avail < head_size:
            return HEAD_MORE, kind, count, length, head_size, None
        # The size table must add up to the frame's length (before anything is allocated).
        # Python integers do not wrap around: sizes whose u64 sum would overflow do not add up.
        if 8 * (count + 1) + sum(self._table_sizes(at, count)) != length:
            return HEAD_BAD, kind, count, length, head_size, _messages.PARTS_DO_NOT_ADD_UP.format(
                parts=count + 1, length=length)
        return HEAD_OK, kind, count, length, head_size, None

    def _next_head(self, deadline, objects):
        """Wait for the next frame's head (its header and, for an object message, its size
        table), check it (a bad one closes the channel: ProtocolError, before anything is
        allocated; an object message when not `objects`: OSError from the header alone, the
        message left in place), keep it in _head (kind, count, length, head size) and return
        False when it is in the window at _rstart, not consumed (the usual case), or True when
        it was consumed into _rbuf[0:_head_have] because it arrived in pieces (a consumed head
        stays there until its payload has been allocated)."""
        while True:
            if self._head_have > 0:
                self._read_head(HEADER_SIZE, deadline)
                head = self._checked_head(0, self._head_have, objects)
                if head[0] == HEAD_MORE:
                    self._read_head(head[4], deadline)
                    head = self._checked_head(0, self._head_have, objects)
                self._head = head[1:5]
                return True
            if self._know(HEADER_SIZE, deadline):
                head = self._checked_head(self._rstart, self._rend - self._rstart, objects)
                if head[0] == HEAD_OK or self._know(head[4], deadline):  # a peek moves _rstart
                    if head[0] == HEAD_MORE:
                        head = self._checked_head(self._rstart, self._rend - self._rstart,
                                                  objects)
                    self._head = head[1:5]
                    return False
            # Only part of the head is queued: take it, and read the rest as it arrives.
            have = self._rend - self._rstart
            if self._rstart:
                self._rview[:have] = self._rview[self._rstart:self._rend]
            self._rstart = self._rend = 0
            self._discard(0, have)
            self._head_have = have
            self._last_recv_was_empty = True

    def _checked_head(self, at, avail, objects):
        """_parse_head(), with a bad head raised (ProtocolError, the channel closes) and an
        object message refused when not `objects` (OSError, from its header alone: then only
        the header is parsed, a frame of another kind having no more)."""
        head = self._parse_head(at, avail if objects else min(avail, HEADER_SIZE))
        if head[0] == HEAD_BAD:
            raise self._protocol_error(head[5])
        if head[1] == KIND_OBJECT and not objects:
            self._refuse_object()
        return head

    def _read_head(self, size, deadline):
        """Head mode: receive the head into _rbuf, exactly up to `size` bytes."""
        while self._head_have < size:
            with self._rview[self._head_have:size] as view:
                self._head_have += self._recv_some([view], deadline)

    def _object_parts(self, at):
        """Allocate the parts of the object message whose (checked) head is at _rbuf[at:], at
        their final sizes: the in-band pickle and each out-of-band buffer, as writable
        bytearrays."""
        count = FRAME_HEADER.unpack_from(self._rbuf, at)[3]
        return [bytearray(size) for size in self._table_sizes(at, count)]

    def _table_sizes(self, at, count):
        """The sizes in the size table of the object message whose head is at _rbuf[at:], one
        at a time: a tuple of them all would hold ~40 bytes per part at once (8191 parts, a
        64 KiB table: ~300 KiB, ~430 KiB free-threaded). Reads _rbuf afresh each time, holding
        no view of it (which would keep it from resizing if the caller fails part-way)."""
        rbuf = self._rbuf
        start = at + HEADER_SIZE
        return (_SIZE.unpack_from(rbuf, start + 8 * i)[0] for i in range(count + 1))

    def _part_sizes(self, at):
        """The sizes of the parts of the frame whose (checked) head is at _rbuf[at:], as a table
        of 64-bit little-endian sizes (8 bytes a part: the object message's own size table)."""
        kind, _, _, count, length = FRAME_HEADER.unpack_from(self._rbuf, at)
        if kind != KIND_OBJECT:
            return _SIZE.pack(length)
        return bytes(self._rview[at + HEADER_SIZE:at + HEADER_SIZE + 8 * (count + 1)])

    def _take_frame(self, deadline, consumed):
        """Receive the frame whose head _next_head() returned: its payload as bytes (kinds 1 and
        2) or the list [pickle, buffer, ...] (an object message). A frame that is all in the
        window is copied out and then consumed; a longer one is read straight from the socket
        into its parts (self._pending while it is incomplete). From a trusted peer each
        part is allocated once at its final size *before* anything more is consumed, so that a
        MemoryError leaves the message where it was (in the socket, or its head in head mode);
        from any other, the parts are allocated as the bytes arrive (_reserve), and a
        MemoryError leaves the message pending, resumed by the next receive."""
        at = 0 if consumed else self._rstart
        kind, _, length, head_size = self._head
        if not consumed and HEADER_SIZE + length <= self._rend - self._rstart:
            if kind == KIND_OBJECT:
                out = self._object_parts(at)
                pos = at + head_size
                for part in out:
                    part[:] = self._rview[pos:pos + len(part)]
                    pos += len(part)
            else:
                out = bytes(self._rview[at + HEADER_SIZE:at + HEADER_SIZE + length])
            self._discard(at, HEADER_SIZE + length)
            self._rstart += HEADER_SIZE + length
            self._after_consume()
            return out
        sizes = None
        if not self._trusted:
            sizes = self._part_sizes(at)
            parts = [None] * (len(sizes) // 8)
        elif kind == KIND_OBJECT:
            parts = self._object_parts(at)
        else:
            # (An empty payload is always all in the window, unless its header came in pieces.)
            parts = [_new_payload(length) if length else b""]
        self._consume_head(consumed)
        self._start_pending(parts, kind, sizes)
        parts = self._finish_pending(deadline)
        return parts if kind == KIND_OBJECT else parts[0]

    def _consume_head(self, consumed):
        """The payload has a home: consume the head (if still queued) and forget the window,
        which the payload's direct reads make stale."""
        if consumed:
            self._head_have = 0
        else:
            self._discard(self._rstart, self._head[3])
        self._rstart = self._rend = 0
        self._last_recv_was_empty = False  # the payload is probably queued already

    def _start_pending(self, parts, kind, sizes=None):
        """Make `parts` the message being received: buffers allocated at their final sizes
        (`sizes` None), or allocated by _reserve as the bytes arrive (None until then; `sizes` the
        table of their final sizes, _part_sizes)."""
        self._pending = parts
        self._pending_sizes = sizes
        self._pending_part = 0
        self._pending_filled = 0
        self._pending_received = 0
        self._pending_kind = kind

    def _pending_size(self, i):
        """The final size of part `i` of the message being received."""
        if self._pending_sizes is not None:
            return _SIZE.unpack_from(self._pending_sizes, 8 * i)[0]
        return _part_size(self._pending[i])

    def _reserve(self):
        """Allocate (or grow) the parts of the message being received, from the one being filled
        on, so that at most max(RESERVE_FLOOR, bytes received so far) is allocated ahead of the
        bytes received: memory stays proportional to what the peer has sent, whatever its
        header announced. Parts are bytearrays here, grown in place (a failed growth raises
        MemoryError and keeps what arrived); _finish_pending makes a payload bytes at the end."""
        parts = self._pending
        budget = max(RESERVE_FLOOR, self._pending_received)
        ahead, i = 0, self._pending_part
        while i < len(parts) and ahead < budget:
            filled = self._pending_filled if i == self._pending_part else 0
            if parts[i] is None:
                parts[i] = bytearray()
            part, final = parts[i], self._pending_size(i)
            if len(part) < final and filled == len(part):  # just allocated, or full
                part.extend(bytes(min(final, filled + budget - ahead) - filled))
            ahead += len(part) - filled
            if len(part) < final:
                break
            i += 1

    def _finish_pending(self, deadline):
        """Fill the parts of the message being received (self._pending) straight from the
        socket, many parts per scatter read, and return them: a payload of kind 1 or 2 as [its
        bytes], an object message as [pickle, buffer, ...]. An exception (timeout, Ctrl-C) leaves
        the progress recorded, so the next receive resumes the message."""
        parts = self._pending
        sizes = self._pending_sizes
        while True:
            if sizes is not None:
                self._reserve()
            views = []
            try:
                i = self._pending_part
                while i < len(parts) and len(views) < PENDING_IOV:
                    if parts[i] is None:
                        break  # not allocated yet: _reserve allocates it once more has arrived
                    view = _rest_of_part(parts[i], self._pending_filled
                                         if i == self._pending_part else 0)
                    if len(view):
                        views.append(view)
                    else:
                        view.release()
                        if not views:  # an empty part, or one just filled
                            self._pending_part += 1
                            self._pending_filled = 0
                    i += 1
                    if sizes is not None and len(parts[i - 1]) < self._pending_size(i - 1):
                        break  # the parts after it come after its missing bytes
                if not views:
                    break
                n = self._recv_some(views, deadline)
            finally:
                _release_all(views)
            self._pending_received += n
            # Record the progress: whole parts filled, then bytes of the next one.
            while n > 0:
                left = self._pending_size(self._pending_part) - self._pending_filled
                if n >= left:
                    n -= left
                    self._pending_part += 1
                    self._pending_filled = 0
                else:
                    self._pending_filled += n
                    n = 0
        kind, self._pending, self._pending_sizes = self._pending_kind, None, None
        if sizes is not None and kind != KIND_OBJECT:
            return [bytes(parts[0])]  # grown as a bytearray: one copy, for a peer not trusted
        # The payload of _new_payload becomes bytes without a copy (its views are released).
        return [part.getvalue() if isinstance(part, io.BytesIO) else part for part in parts]

    @staticmethod
    def _refuse_object():
        # Not consumed: the message stays next in line, for recv().
        raise OSError(_messages.OBJECT_NEEDS_RECV)

    def _bad_message_length(self, maxlength, length):
        # As multiprocessing does: reading is over on this channel (the message is left unread).
        if self._writable:
            self._readable = False
            self._reading_stopped = _messages.READING_STOPPED.format(maxlength=maxlength,
                                                                     length=length)
        else:
            self.close()
        raise OSError(_messages.BAD_MESSAGE_LENGTH)

    def recv_bytes(self, maxlength=None, *, timeout=None):
        """Receive one message sent with send_bytes() (or send()) and return its payload as bytes.

        Blocks until a whole message has arrived, or until `timeout` seconds have passed
        (TimeoutError; the stream stays intact). Raises EOFError if the peer closed the
        connection between messages, ProtocolError if it vanished in the middle of one, and
        OSError (and the channel stops reading) if the message is longer than `maxlength`.
        An object message with out-of-band buffers raises OSError and is left for recv().
        A MemoryError leaves the message in the socket, for the next receive.
        """
        self._check_readable()  # first, as multiprocessing does
        if maxlength is not None:
            if maxlength < 0:
                raise ValueError("negative maxlength")
            maxlength = _ssize(maxlength)
        deadline = _deadline(timeout)
        with _take(self._recv_lock, deadline, "receive", self._receive_ended):
            self._begin_receive(deadline)
            out = self._recv_bytes_frame(deadline, maxlength)
            self._sent_since_recv = False
            return out

    def _recv_bytes_frame(self, deadline, maxlength):
        """The next message's payload as bytes (the receive lock is held). An object message is
        refused, and left in place: its out-of-band buffers have no place in a bytes result."""
        if self._pending is not None:
            if self._pending_kind == KIND_OBJECT:
                self._refuse_object()
            if maxlength is not None and self._pending_size(0) > maxlength:
                self._bad_message_length(maxlength, self._pending_size(0))
            return self._finish_pending(deadline)[0]
        consumed = self._next_head(deadline, False)
        if maxlength is not None and self._head[2] > maxlength:
            self._bad_message_length(maxlength, self._head[2])
        return self._take_frame(deadline, consumed)

    def recv_bytes_many(self, max_messages=None, *, timeout=None):
        """Wait for the next message (up to `timeout`), then return it with every further whole
        message already queued, up to `max_messages`, as a list of bytes. Only whole messages
        are taken (the rest stay queued), with two syscalls for the lot: a look at what is queued
        and one receive of exactly those messages. At least one message is returned, or an
        exception raised; a MemoryError part-way returns the messages taken so far.
        """
        self._check_readable()
        limit = None
        if max_messages is not None:
            limit = _ssize(max_messages)
            if limit < 1:
                raise ValueError(_messages.BAD_MAX_MESSAGES)
        deadline = _deadline(timeout)
        with _take(self._recv_lock, deadline, "receive", self._receive_ended):
            self._begin_receive(deadline)
            out = [self._recv_bytes_frame(deadline, None)]
            self._sent_since_recv = False
            short_of_memory = False
            looks = 0
            while limit is None or len(out) < limit:
                # Every whole plain frame in the window, up to the limit.
                pos = self._rstart
                while limit is None or len(out) < limit:
                    status, kind, _, length, _, _ = self._parse_head(pos, self._rend - pos)
                    if status != HEAD_OK or kind == KIND_OBJECT:
                        break  # an object message, a bad header, or more to come: next call
                    if length > self._rend - pos - HEADER_SIZE:
                        break  # not all queued yet
                    try:
                        out.append(bytes(self._rview[pos + HEADER_SIZE:pos + HEADER_SIZE
                                                     + length]))
                    except MemoryError:
                        short_of_memory = True
                        break
                    pos += HEADER_SIZE + length
                took = pos - self._rstart
                if took > 0:
                    self._discard(self._rstart, took)  # one receive for all the frames taken
                    self._rstart = pos
                    self._after_consume()
                if (short_of_memory or (limit is not None and len(out) >= limit)
                        or looks >= MANY_LOOKS or (looks > 0 and took == 0)):
                    break
                # One more nonblocking look at the queue; stop when it shows nothing new. End of
                # stream and errors are left for the next receive to report: the messages taken
                # are consumed, they must be returned.
                looks += 1
                try:
                    if self._peek(PEEK_SIZE) <= 0:
                        break
                except OSError:
                    break
            return out

    def recv(self, *, timeout=None):
        """Receive one object sent with send() (unpickled: only talk to peers you trust).

        A MemoryError leaves the message in the socket, for the next receive."""
        self._check_readable()
        deadline = _deadline(timeout)
        with _take(self._recv_lock, deadline, "receive", self._receive_ended):
            self._begin_receive(deadline)
            if self._pending is not None:
                kind = self._pending_kind
                payload = self._finish_pending(deadline)
                if kind != KIND_OBJECT:
                    payload = payload[0]
            else:
                consumed = self._next_head(deadline, True)
                kind = self._rbuf[0 if consumed else self._rstart]
                payload = self._take_frame(deadline, consumed)
            self._sent_since_recv = False
        if kind == KIND_OBJECT:
            # The out-of-band buffers are writable bytearrays: a numpy array unpickled on one
            # of them is writable (unless the sender's was read-only: pickle keeps that flag).
            return _loads(payload[0], buffers=payload[1:])
        if self._serializer is not None:
            return self._serializer.loads(payload)
        return _loads(payload)

    def recv_bytes_into(self, buf, offset=0, *, timeout=None):
        """Receive one message into the writable buffer `buf`, starting `offset` bytes in, and
        return its size in bytes. A large payload is read from the socket straight into `buf`.

        If the message does not fit, it is received whole and raises BufferTooShort with the
        message as args[0] (as multiprocessing does); the next receive gets the next message.
        An object message with out-of-band buffers raises OSError and is left for recv().
        A MemoryError leaves the message in the socket.
        """
        offset = _ssize(offset)
        self._check_readable()
        dst = _byte_view(buf, writable=True)
        try:
            if offset < 0:
                raise ValueError("negative offset")
            if offset > len(dst):
                raise ValueError("offset too large")
            deadline = _deadline(timeout)
            with _take(self._recv_lock, deadline, "receive", self._receive_ended):
                self._begin_receive(deadline)
                return self._recv_into(dst, offset, deadline)
        finally:
            dst.release()

    def _recv_into(self, dst, offset, deadline):
        space = len(dst) - offset
        if self._pending is not None:
            payload = self._recv_bytes_frame(deadline, None)
            self._sent_since_recv = False
            if len(payload) > space:
                raise BufferTooShort(payload)
            dst[offset:offset + len(payload)] = payload
            return len(payload)
        consumed = self._next_head(deadline, False)
        kind, _, length, _ = self._head
        if length > space:
            payload = self._take_frame(deadline, consumed)
            self._sent_since_recv = False
            raise BufferTooShort(payload)
        if not consumed and HEADER_SIZE + length <= self._rend - self._rstart:
            start = self._rstart + HEADER_SIZE
            dst[offset:offset + length] = self._rview[start:start + length]
            self._discard(self._rstart, HEADER_SIZE + length)
            self._rstart = start + length
            self._after_consume()
            self._sent_since_recv = False
            return length
        # Not all queued yet: straight from the socket into the caller's buffer.
        self._consume_head(consumed)
        filled = 0
        try:
            while filled < length:
                # A slice view, released at once: one left alive (say, in a traceback) would keep
                # the caller's buffer exported.
                with dst[offset + filled:offset + length] as view:
                    filled += self._recv_some([view], deadline)
        except BaseException:
            if self._sock is not None:
                # Interrupted (timeout, Ctrl-C): keep what arrived so that the next receive
                # resumes this message. Only this rare path copies.
                payload = _new_payload(length)
                with payload.getbuffer() as view:
                    view[:filled] = dst[offset:offset + filled]
                self._start_pending([payload], kind)
                self._pending_filled = self._pending_received = filled
            raise
        self._sent_since_recv = False
        return length

    def poll(self, timeout=0.0):
        """Return whether there is data to read, waiting up to `timeout` seconds (None: no limit).

        Never consumes a message: it looks at the socket as any selector would.
        """
        self._check_readable()
        deadline = _deadline(timeout)
        if self._deferred_handshake is not None:
            with _take(self._recv_lock, deadline, "receive", self._receive_ended):
                try:
                    if self._deferred_handshake is not None:
                        self._finish_handshake(deadline)
                except TimeoutError:
                    return False
        # A message in progress, and (unless another process may have received since) the bytes
        # the window saw, are there to read.
        if (self._pending is not None or self._head_have > 0
                or (not self._shared and self._rend > self._rstart)):
            return True
        return not self._wait(_POLLIN, deadline)

    def _has_message(self):
        """True if a whole message (or a malformed header) is known to be queued (no syscall)."""
        avail = self._rend - self._rstart
        if (self._sock is None or self._shared or avail < HEADER_SIZE
                or self._pending is not None or self._head_have > 0):
            return False
        status, _, _, length, _, _ = self._parse_head(self._rstart, avail)
        # A malformed head is ready: the receive will raise the ProtocolError.
        return status == HEAD_BAD or (status == HEAD_OK and length <= avail - HEADER_SIZE)

    def _recv_raw(self, max_size, *, timeout=None):
        """Return between 1 and `max_size` received bytes, waiting for the first one. Never
        takes more than `max_size` from the socket: what follows the handshake stays queued."""
        max_size = _ssize(max_size)
        if self._sock is None:
            raise OSError("handle is closed")
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        deadline = _deadline(timeout)
        self._rstart = self._rend = 0
        if max_size == 0:
            return b""
        while True:
            sock = self._sock
            if sock is None:
                raise OSError("handle is closed")
            data = None
            try:
                data = sock.recv(max_size)
            except BlockingIOError:
                pass
            except OSError:
                if self._sock is None:
                    raise OSError(_CLOSED_WHILE_WAITING) from None
                raise
            if data:
                return data
            if data is not None:
                raise EOFError(_messages.PEER_CLOSED)
            if self._wait(_POLLIN, deadline):
                raise TimeoutError(_messages.TIMED_OUT_WAITING)
