"""The pure-Python twin's send path: contiguous sends of small frames, gather writes of large ones,
batches, and the unsent rest of an interrupted send kept whole (the design is in channel_py.py)."""

import struct

from .. import _messages
from .._pickling import dumps_out_of_band as _pickle
from .._wire import (
    BATCH_FLUSH_SIZE,
    FRAME_HEADER,
    KIND_BYTES,
    KIND_OBJECT,
    KIND_PICKLE,
    MAX_OOB_BUFFERS,
    SMALL_SEND_SIZE,
)
from .support_py import (
    _CLOSED_WHILE_WAITING,
    _HAVE_SENDMSG,
    _IOV_MAX,
    _POLLOUT,
    _SEND_FLAGS,
    _byte_view,
    _contiguous_view,
    _deadline,
    _dumps,
    _release_all,
    _remaining_views,
    _ssize,
    _take,
)


class _Batch:
    """What Channel.batch() returns."""

    def __init__(self, channel, timeout):
        self.channel = channel
        self.timeout = timeout

    def __enter__(self):
        with self.channel._send_lock:
            self.channel._batch_depth += 1
        return self.channel

    def __exit__(self, *exc_info):
        self.channel._end_batch(self.timeout)


class SendPath:
    """The send half of the twin's Channel (channel_py.py), which holds the state."""

    __slots__ = ()

    def _send_some(self, sock, parts, sent):
        """One send() (or sendmsg() gather write of at most IOV_MAX buffers) of `parts` from
        byte `sent` on; returns the number of bytes the kernel took (perhaps fewer)."""
        if len(parts) == 1 and sent == 0:
            return sock.send(parts[0], _SEND_FLAGS)
        views = _remaining_views(parts, sent, _IOV_MAX if _HAVE_SENDMSG else 1)
        try:
            if len(views) > 1:
                return sock.sendmsg(views, (), _SEND_FLAGS)
            return sock.send(views[0], _SEND_FLAGS)  # one part (or, without sendmsg, the next)
        finally:
            _release_all(views)

    def _send_all(self, parts, deadline, *, flushing=False):
        """Write all bytes of `parts` (byte buffers, sent as one stream). If the deadline passes
        (or a signal interrupts) after some of them went out, the rest is copied to _send_rest
        and goes out before the next frame, so the peer never sees half a frame followed by
        another. `flushing`: `parts` is an earlier frame's _send_rest."""
        total = sum(len(part) for part in parts)
        sent = 0
        full = False  # the last write was short: the socket buffer is full
        self._sent_since_recv = True
        try:
            while True:
                sock = self._sock
                if sock is None:
                    raise OSError("handle is closed")
                n = -1  # -1: wait for room first
                if full:
                    full = False  # wait rather than make a write that would fail
                else:
                    try:
                        n = self._send_some(sock, parts, sent)
                    except BlockingIOError:
                        pass
                    except OSError:
                        if self._sock is None:
                            raise OSError(_CLOSED_WHILE_WAITING) from None
                        raise
                if n >= 0:
                    sent += n
                    if sent == total:
                        return
                    full = True
                    continue
                if self._wait(_POLLOUT, deadline):
                    if flushing:
                        # The caller must be able to tell whether to send this message again.
                        raise TimeoutError(_messages.TIMED_OUT_EARLIER.format(sent=sent,
                                                                               total=total))
                    if sent == 0:
                        raise TimeoutError(_messages.TIMED_OUT_SEND)
                    raise TimeoutError(_messages.TIMED_OUT_SENDING.format(sent=sent, total=total))
        except BaseException:
            if sent > 0 and self._sock is not None:
                if flushing:  # the rest of the rest: a view of it, never copied again
                    self._send_rest = memoryview(parts[0])[sent:]
                else:
                    views = _remaining_views(parts, sent)
                    self._send_rest = b"".join(views)
                    _release_all(views)
            raise

    def _flush_rest(self, deadline):
        # _send_rest is cleared only once all of it went out: if this send is interrupted
        # before any byte of it went out, the rest must still go before the next frame.
        # (_send_all replaces it with a shorter rest if only some of it went out.)
        self._send_all([self._send_rest], deadline, flushing=True)
        self._send_rest = None

    def _send_frame(self, kind, payload, deadline):
        """Send one frame (the send lock is held); `payload` is a 1-D byte buffer."""
        size = len(payload)
        header = FRAME_HEADER.pack(kind, 0, 0, 0, size)
        if self._batch_depth > 0 and size <= SMALL_SEND_SIZE:
            # Inside batch(): held back in the batch buffer, written when full or at the end.
            if self._send_rest is not None:
                self._flush_rest(deadline)
            self._sent_since_recv = True
            self._batch += header
            self._batch += payload
            if len(self._batch) >= BATCH_FLUSH_SIZE:
                self._flush_batch(deadline)
            return
        self._flush_pending_sends(deadline)
        if size <= SMALL_SEND_SIZE:
            # One contiguous send(): for small frames a copy is cheaper than a gather write.
            self._send_all([header + payload], deadline)
        else:
            # One gather write; the payload is never copied.
            self._send_all([header, payload], deadline)

    def _flush_pending_sends(self, deadline):
        """Before a frame goes out directly: the rest of a timed-out frame, then the batch."""
        if self._send_rest is not None:
            self._flush_rest(deadline)
        if self._batch:
            self._flush_batch(deadline)

    def _flush_batch(self, deadline):
        """Write the batch (the send lock is held). If the deadline passes part-way the rest
        moves to _send_rest; if nothing went out, the batch stays as it was."""
        data = bytes(self._batch)
        try:
            self._send_all([data], deadline)
        except BaseException:
            if self._send_rest is not None:  # part of it went out: the rest is saved there
                self._batch.clear()
            raise
        self._batch.clear()

    def batch(self, *, timeout=None):
        """Context manager: sends inside the block are coalesced into one buffer, written when it
        reaches 64 KiB and when the block ends (also on an exception), many frames per send().
        Outside a batch every send goes out at once. `timeout` bounds the final write.

        While a batch is open, every small send on this channel joins it (from any thread);
        a large payload or an object with out-of-band buffers flushes the batch and goes out
        after it, so the order of messages never changes.
        """
        self._check_writable()
        return _Batch(self, timeout)

    def flush(self, *, timeout=None):
        """Write what earlier sends left queued: the rest of a message whose send timed out part
        of the way, and the frames gathered so far by an open batch(). TimeoutError if the
        deadline passes first; what is still unsent stays queued, in order."""
        self._check_writable()
        deadline = _deadline(timeout)
        with _take(self._send_lock, deadline, "send", self._send_ended):
            try:
                self._flush_pending_sends(deadline)
            except TimeoutError:
                raise TimeoutError(f"timed out flushing; {self.unsent_bytes} bytes are still "
                                   "queued") from None

    @property
    def unsent_bytes(self):
        """How many bytes that sends accepted are queued here, not yet written to the socket (the
        rest of a timed-out send, an open batch's frames). flush() writes them."""
        rest = self._send_rest
        return len(self._batch) + (len(rest) if rest is not None else 0)

    def _end_batch(self, timeout):
        # The block must end whatever happens (the lock wait is not bounded); the timeout bounds
        # the final write.
        with self._send_lock:
            self._batch_depth -= 1
            if self._batch_depth == 0 and self._sock is not None:
                self._flush_pending_sends(_deadline(timeout))

    def send_bytes_many(self, buffers, *, timeout=None):
        """Send every buffer of an iterable as its own message, with as few gather writes as
        possible: small payloads are copied, with their headers, into one block; large ones are
        written from their own memory. Nothing is sent if any item is not a buffer."""
        self._check_writable()
        deadline = _deadline(timeout)
        views = []
        try:
            for item in buffers:
                views.append(_byte_view(item, writable=False))
            if not views:
                return
            parts = []
            block = bytearray()  # headers and small payloads, back to back
            for view in views:
                block += FRAME_HEADER.pack(KIND_BYTES, 0, 0, 0, len(view))
                if len(view) <= SMALL_SEND_SIZE:
                    block += view
                else:
                    parts.append(bytes(block))
                    block.clear()
                    parts.append(view)
            if block:
                parts.append(bytes(block))
            self._advance_handshake_nowait()
            with _take(self._send_lock, deadline, "send", self._send_ended):
                self._flush_pending_sends(deadline)
                self._send_all(parts, deadline)
        finally:
            _release_all(views)

    def _send_buffer(self, kind, obj, offset, size, deadline):
        view = _byte_view(obj, writable=False)
        try:
            if offset < 0:
                raise ValueError("offset is negative")
            if len(view) < offset:
                raise ValueError("buffer length < offset")
            if size is None:
                size = len(view) - offset
            else:
                size = _ssize(size)
                if size < 0:
                    raise ValueError("size is negative")
                if offset + size > len(view):
                    raise ValueError("buffer length < offset + size")
            self._advance_handshake_nowait()
            with view[offset:offset + size] as payload, \
                    _take(self._send_lock, deadline, "send", self._send_ended):
                self._send_frame(kind, payload, deadline)
        finally:
            view.release()

    def send_bytes(self, buf, offset=0, size=None, *, timeout=None):
        """Send the bytes of a buffer-protocol object (bytes, bytearray, memoryview, array, numpy)
        as one message. `offset` and `size` are in bytes. The payload is never copied when it is
        large: header and payload go to the kernel in one gather write.
        """
        offset = _ssize(offset)
        self._check_writable()
        self._send_buffer(KIND_BYTES, buf, offset, size, _deadline(timeout))

    def send(self, obj, *, timeout=None):
        """Send a picklable object as one message.

        It is pickled with multiprocessing's ForkingPickler (so everything multiprocessing can
        send, this can send) at protocol 5: large buffers that support it (numpy arrays,
        pickle.PickleBuffer, anything that pickles its data as one) travel out of band, written
        from their own memory in the same gather write as the pickle, and are received straight
        into their final memory.
        An object that cannot be pickled raises here and nothing is sent. With a `serializer`,
        the message is its dumps(obj), in band.
        """
        self._check_writable()
        deadline = _deadline(timeout)
        if self._serializer is not None:
            self._send_buffer(KIND_PICKLE, self._serializer.dumps(obj), 0, None, deadline)
            return
        data, buffers = _pickle(obj)  # raises before anything is sent
        try:
            if not buffers:
                self._send_buffer(KIND_PICKLE, data, 0, None, deadline)
            elif len(buffers) > MAX_OOB_BUFFERS:
                # More buffers than one object message may carry: pickled again, all in band,
                # at protocol 5 still (a PickleBuffer cannot be pickled at a lower one).
                self._send_buffer(KIND_PICKLE, _dumps(obj, 5), 0, None, deadline)
            else:
                self._send_object(data, buffers, deadline)
        finally:
            # Let go of the objects' memory now, not when a traceback that holds this frame dies
            # (a bytearray cannot be resized while a view of it exists).
            _release_all(buffers)
            data.release()

    def _send_object(self, data, buffers, deadline):
        """One object message (docs/protocol.md, "Objects"): one gather write of [header and
        size table, in-band pickle, buffer 1, ..., buffer n], each buffer from its own memory
        (never copied, unless a timeout leaves part of it unsent: see _send_all)."""
        count = len(buffers)
        sizes = [len(data)] + [len(buffer) for buffer in buffers]
        length = 8 * (count + 1) + sum(sizes)
        head = (FRAME_HEADER.pack(KIND_OBJECT, 0, 0, count, length)
                + struct.pack(f"<{count + 1}Q", *sizes))
        self._advance_handshake_nowait()
        with _take(self._send_lock, deadline, "send", self._send_ended):
            self._flush_pending_sends(deadline)
            self._send_all([head, data, *buffers], deadline)

    def _send_raw(self, data, *, timeout=None):
        """Send bytes as they are, without a frame header."""
        if self._sock is None:
            raise OSError("handle is closed")
        view = _contiguous_view(data)
        try:
            if len(view):
                self._send_all([view], _deadline(timeout))
        finally:
            view.release()
