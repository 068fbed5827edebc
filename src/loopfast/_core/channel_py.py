"""The pure-Python twin of the compiled channel (channel.pyx): same API, semantics, exceptions and
wire format, written for clarity.

It is used where the extension is not available (other interpreters, ``LOOPFAST_NO_EXTENSIONS=1``,
a platform without a wheel), and it is the readable specification and test oracle of the compiled
channel: tests/core/test_twin.py runs the same behaviours on both and pairs one with the other.

The design is the compiled one, expressed with the standard library:

- the socket is nonblocking, with TCP_NODELAY; every wait is a ``select.poll()`` (``select.select``
  where poll is missing, e.g. on Windows). Python retries a poll interrupted by a signal after
  running the handler (PEP 475), so Ctrl-C raises KeyboardInterrupt out of a blocked receive;
- the kernel's socket queue is the only place where messages not yet received wait: a receive
  consumes only the bytes of the messages it returns, so an end shared by several processes
  (under their own lock) and watched by any selector behaves as a multiprocessing connection.
  What is queued is learnt with a peek (``recv_into(..., MSG_PEEK)``) into a window, a copy of
  the head of the queue; a frame that is all there is copied out of it into its result, then
  consumed with a *discard* (``MSG_TRUNC`` on Linux, which does not copy). A frame not all queued
  yet gets its result allocated first (a MemoryError leaves it in the socket), then its head is
  consumed and its payload read straight into its final object (see `_new_payload` for how the
  result is ``bytes`` without a copy), or into the caller's buffer for ``recv_bytes_into``. A
  channel that is not shared keeps its window between calls (no syscall to find the next queued
  message); one shared with another process (after fork(), or handed over) looks again at every
  receive. Rarely, a peek shows only part of a frame's head: that part is consumed and the rest
  read as it arrives ("head mode"). That head and a payload interrupted mid-way (below) are the
  only bytes of the stream ever held here between calls;
- a small frame is sent as one ``send()`` of header + payload; a large one as one
  ``sendmsg([header, payload])`` gather write that never copies the payload;
- ``send(obj)`` pickles at protocol 5 with a ``buffer_callback``: buffers of 4 KiB and more
  (numpy arrays, ``pickle.PickleBuffer``) stay out of band and go out, each from its own memory,
  in one ``sendmsg([header + size table, pickle, buffer, ...])`` (an object message, kind 3,
  docs/protocol.md "Objects"); ``recv()`` allocates each buffer once as a writable bytearray,
  fills it (from the window, or straight from the socket) and hands them all to
  ``pickle.loads(..., buffers=...)``;
- a receive interrupted in the middle of a payload read from the socket (timeout, Ctrl-C) keeps
  what arrived, and a send interrupted after part of a frame went out keeps the unsent rest, so
  the byte stream always stays whole.

tests/core/test_twin.py runs the same behaviours, errors and messages against both implementations.
"""

import operator
import os
import socket
import sys
import threading
import time
import warnings
import weakref

from .. import _messages
from .._errors import ProtocolError
from .._wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    FD_MAX,
    RECV_BUFFER_SIZE,
)
from .receiving_py import ReceivePath
from .sending_py import SendPath
from .support_py import (
    _CLOSED_WHILE_WAITING,
    _POLLIN,
    _UINT64_MAX,
    HANDOVER_NAP,
    _poll_fd,
)

__all__ = ["Channel"]

# Every channel of this process, for the fork handlers below: weak references that remove
# themselves when their channel goes. A snapshot is set.copy(), one C call that another thread
# cannot interleave with, with or without the GIL (a WeakSet is iterated by Python code, which
# another thread's new channel interrupts: "Set changed size during iteration").
_channels = set()
_forget_channel = _channels.discard


def _live_channels():
    return [channel for channel in (ref() for ref in _channels.copy()) if channel is not None]


def _after_fork_in_child():
    """Only the forking thread survives fork(): in the child no thread is blocked on any channel.
    Forget the parent's blocked threads, or the child's close() would shut down the socket it
    shares with the parent (see close()) instead of closing its own descriptor. And every
    channel's socket is now shared with the parent."""
    for channel in _live_channels():
        channel._blocked = 0
        channel._shared = True
        deferred, channel._deferred_close = channel._deferred_close, None
        if deferred is not None:
            deferred.close()


def _after_fork_in_parent():
    """The child may receive from every channel's socket too: what this process knows of their
    queues can go stale."""
    for channel in _live_channels():
        channel._shared = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child,
                        after_in_parent=_after_fork_in_parent)


class Channel(ReceivePath, SendPath):
    """One end of a framed, bidirectional loopback connection.

    ``Channel(fd, readable=True, writable=True, *, max_message_size=...)`` takes ownership of a
    connected TCP socket's file descriptor whose handshake is done; applications get channels from
    ``Pipe()``, ``Client()`` or ``Listener.accept()``.
    """

    # Slots: like the compiled class, no per-instance __dict__ (no stray attributes). Grouped by
    # purpose, not sorted.
    __slots__ = (  # noqa: RUF023
        "_sock",             # the socket.socket owning the fd; None once closed
        "_fd",               # its file descriptor (for fileno() and repr)
        "_readable", "_writable",
        "_max_message_size",      # int; 2**64 - 1 when there is no limit
        "_max_message_size_obj",  # as given (int or None), for the property and messages
        "_serializer",       # dumps/loads for send()/recv(); None: pickle protocol 5
        "_warn_unclosed",    # ResourceWarning when collected open (False: a queue's pipe)
        "_peer_uid",         # the uid of the peer's socket, checked at the handshake
        "_trusted",          # the peer proved the authkey or is this user: see _reserve
        "_spin",             # the spin setting, kept for API parity (this twin never spins)
        # The kernel's queue holds every message not yet delivered. The window: bytes
        # [_rstart, _rend) of _rbuf are a copy (a peek) of the head of that queue, nothing in it
        # consumed.
        "_rbuf", "_rview", "_rstart", "_rend",
        "_shared",           # another process may receive from the socket: the window is
                             # forgotten at the start of every receive
        "_queue_empty",      # the last look found nothing queued: wait before peeking
        "_peek_saw_all",     # the last peek returned less than it asked: all of the queue
        # Head mode (rare): the first _head_have bytes of a frame's head (header, size table)
        # were consumed into _rbuf because only part of it had arrived; the rest is read as it
        # arrives.
        "_head_have",
        "_head",             # the head _next_head() checked: (kind, count, length, head size)
        "_reading_stopped",  # why receiving stopped (recv_bytes' maxlength), or None
        "_last_recv_was_empty",   # a direct read came back short: wait before the next one
        "_sent_since_recv",  # sent since the last receive (the compiled channel then spins)
        "_deferred_handshake",  # a Handshake whose rest runs at first use, or None
        # The message being received into its final objects, allocated before its head was
        # consumed (a payload of kind 1 or 2: [_new_payload]; an object message: [pickle,
        # buffer, ...] bytearrays), the index of the part being filled, the bytes of it already
        # received, and the frame kind. While the message is incomplete (a timeout interrupted
        # it) it stays here, so the next receive resumes it.
        "_pending", "_pending_part", "_pending_filled", "_pending_kind",
        "_pending_sizes",    # final sizes of the parts while they grow as bytes arrive, or None
        "_pending_received",  # bytes of the message's payload received so far
        "_send_rest",        # the unsent tail of a frame whose send was interrupted (bytes or a
                             # memoryview of them), or None
        "_batch_depth", "_batch",  # open batch() blocks; the frames they hold back (bytearray)
        "_send_lock", "_recv_lock",  # one sender / one receiver at a time: frames never interleave
        # close() from another thread while one waits in poll(): see close() and _unblocked().
        "_state_lock", "_blocked", "_deferred_close",
        "__weakref__",
    )

    def __init__(self, fd, readable=True, writable=True, *,
                 max_message_size=DEFAULT_MAX_MESSAGE_SIZE, serializer=None, spin=None):
        # The state of a channel that owns nothing, first: __del__ and close() rely on it if a
        # check below fails (the compiled class does this in __cinit__).
        self._sock = None
        self._serializer = None
        self._warn_unclosed = True
        self._peer_uid = None
        self._trusted = False
        self._fd = -1
        self._readable = self._writable = False
        self._deferred_close = None
        readable = bool(readable)
        writable = bool(writable)
        if not readable and not writable:
            raise ValueError(_messages.NEITHER_DIRECTION)
        if serializer is not None and not (callable(getattr(serializer, "dumps", None))
                                           and callable(getattr(serializer, "loads", None))):
            raise TypeError("serializer must have dumps(obj) -> bytes-like and loads(data) -> "
                            f"obj, got {serializer!r}")
        self._serializer = serializer
        self.spin = spin
        if max_message_size is None:
            limit = _UINT64_MAX
        else:
            if max_message_size < 0:
                raise ValueError(_messages.BAD_MAX_MESSAGE_SIZE)
            limit = operator.index(max_message_size)
            if limit > _UINT64_MAX:
                raise OverflowError("Python int too large to convert to C unsigned long")
        fd_number = operator.index(fd)
        if fd_number > FD_MAX:
            raise OverflowError("file descriptor too large")
        if fd_number < 0:
            raise ValueError("invalid file descriptor")
        self._max_message_size = limit
        self._max_message_size_obj = max_message_size
        self._rbuf = bytearray(RECV_BUFFER_SIZE)
        self._rview = memoryview(self._rbuf)  # slices of it are what recv_into fills
        self._rstart = self._rend = 0
        self._shared = False
        self._queue_empty = True
        self._peek_saw_all = True
        self._head_have = 0
        self._head = None
        self._reading_stopped = None
        self._last_recv_was_empty = True
        self._sent_since_recv = False
        self._deferred_handshake = None
        self._pending = self._pending_sizes = None
        self._pending_part = self._pending_filled = 0
        self._pending_kind = 0
        self._send_rest = None
        self._batch_depth = 0
        self._batch = bytearray()
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._state_lock = threading.RLock()  # reentrant: close() may run in a signal handler
        self._blocked = 0
        # Wrapping the fd: socket.socket(fileno=fd) takes it over (it raises for a closed fd or
        # one that is not a socket, and then does not own it).
        sock = socket.socket(fileno=fd_number)
        try:
            sock.setblocking(False)
        except BaseException:
            sock.detach()  # a failed constructor leaves the fd to the caller, as the compiled one
            raise
        # TCP_NODELAY: a message is sent when send_bytes() returns, never held back by Nagle.
        # It fails (harmlessly) only on a socket that is not TCP, e.g. a socketpair().
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        # Socket buffer sizes are left to the kernel (see channel.pyx for the measurements).
        self._sock = sock
        self._fd = fd_number
        self._readable = readable
        self._writable = writable
        _channels.add(weakref.ref(self, _forget_channel))

    def __del__(self, _warn=warnings.warn, _is_finalizing=sys.is_finalizing):
        if getattr(self, "_sock", None) is not None:
            # Not while the interpreter shuts down: warnings can no longer be shown then (a
            # spawned child that exits with a channel open would print a stray error).
            # Not for a pipe of multiprocessing's queues and pools either: their code leaves many
            # open for the collector, as multiprocessing's own connections allow.
            if self._warn_unclosed and not _is_finalizing():
                _warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()

    def __reduce__(self):
        # A channel crosses to another process through multiprocessing's reduction (see
        # _reduction.py), which duplicates the socket; plain pickling cannot.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    @property
    def peer_uid(self):
        """The uid of the user whose socket is at the other end, as checked when the connection
        was made (loopfast refuses another user's peer unless allowed: allow_users=), or None
        where that was not found out (allow_users='any' on a platform that cannot tell)."""
        return self._peer_uid

    @property
    def peer_pid(self):
        """The pid of a process that holds the other end, where the platform tells and this
        process may see it (Linux: the same user, or root), else None: also while a client's
        connection waits in the listener's backlog (no process holds it before accept()).
        Looked up on each access (it scans /proc: milliseconds)."""
        if self.closed:
            return None
        from .._peer import peer_pid
        return peer_pid(self.fileno())

    @property
    def spin(self):
        """Busy-polling budget in microseconds before a wait sleeps, or None to follow the
        process-wide default. Kept for the same API as the compiled channel: this pure-Python
        implementation never spins (a Python loop would hold the GIL while it polls)."""
        return self._spin

    @spin.setter
    def spin(self, microseconds):
        if microseconds is not None and not microseconds >= 0:  # also refuses NaN
            raise ValueError(_messages.BAD_SPIN)
        self._spin = None if microseconds is None else float(min(microseconds, 1e9))

    @property
    def serializer(self):
        """The object whose dumps()/loads() send() and recv() use; None: pickle protocol 5 with
        out-of-band buffers."""
        return self._serializer

    @property
    def closed(self):
        """True once the channel is closed."""
        return self._sock is None

    @property
    def readable(self):
        """True if the channel can receive."""
        return self._readable

    @property
    def writable(self):
        """True if the channel can send."""
        return self._writable

    @property
    def max_message_size(self):
        """Largest payload accepted from the peer, in bytes (None: no limit)."""
        return self._max_message_size_obj

    def fileno(self):
        """The socket's file descriptor."""
        if self._sock is None:
            raise OSError("handle is closed")
        return self._fd

    def close(self):
        """Close the channel. Messages not yet received stay in the socket for any other process
        that shares it; with no other copy of the socket, they are discarded.

        A thread blocked in a receive or send on this channel wakes up and raises OSError.
        """
        with self._state_lock:
            sock = self._sock
            if sock is None:
                return
            self._sock = None
            # What a receive or send left half-done is let go of here, unless one is under way
            # (in another thread, or in this one: a signal handler, a protocol error): that one
            # lets go of it when it ends (_receive_ended, _send_ended).
            if self._recv_lock.acquire(False):
                self._receive_ended()
                self._recv_lock.release()
            if self._send_lock.acquire(False):
                self._send_ended()
                self._send_lock.release()
            if self._blocked:
                # Another thread waits in poll() on this fd. Closing it would not wake that
                # thread (and the number could be reused under it): shut the socket down, which
                # wakes it, and let the last such thread close it (_unblocked).
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._deferred_close = sock
                return
        try:
            sock.close()  # socket.close() marks it closed first: its finalizer never closes again
        except OSError:
            pass  # as close(2)'s result in the compiled channel: the fd is gone either way

    def _receive_ended(self):
        """End of a receive (the receive lock is held): a channel closed meanwhile lets go of a
        half-received message and its window."""
        if self._sock is None:
            self._pending = self._pending_sizes = None
            self._deferred_handshake = None
            self._rstart = self._rend = self._head_have = 0

    def _send_ended(self):
        """End of a send (the send lock is held): a channel closed meanwhile lets go of the
        unsent rest of a frame."""
        if self._sock is None:
            self._send_rest = None

    def _unblocked(self):
        """Call after a wait: raises OSError if the channel was closed meanwhile, closing the
        socket if this was the last waiting thread."""
        with self._state_lock:
            self._blocked -= 1
            if self._sock is not None:
                return
            deferred = None
            if self._blocked == 0:
                deferred, self._deferred_close = self._deferred_close, None
        if deferred is not None:
            deferred.close()
        raise OSError(_CLOSED_WHILE_WAITING)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self._sock is None else f"fd={self._fd}"
        mode = ("r" if self._readable else "") + ("w" if self._writable else "")
        return f"<loopfast.Channel {state} mode={mode!r}>"

    def _check_readable(self):
        if self._sock is None:
            raise OSError("handle is closed")
        if not self._readable:
            raise OSError(self._reading_stopped or _messages.WRITE_ONLY)

    def _check_writable(self):
        if self._sock is None:
            raise OSError("handle is closed")
        if not self._writable:
            raise OSError("connection is read-only")

    def _protocol_error(self, message):
        """The stream can no longer be trusted: close, and return the ProtocolError to raise."""
        self.close()
        return ProtocolError(message)

    def _wait(self, events, deadline):
        """Wait until the socket is ready for `events` (_POLLIN or _POLLOUT). Returns False when
        ready, True when the deadline passed first."""
        while True:
            with self._state_lock:
                if self._sock is None:
                    raise OSError("handle is closed")
                self._blocked += 1
            if deadline < 0:
                timeout_ms = -1
            else:
                remaining = deadline - time.monotonic_ns()
                # Round up: never return before the deadline.
                timeout_ms = 0 if remaining <= 0 else min((remaining + 999_999) // 1_000_000,
                                                          0x7FFFFFFF)
            try:
                ready = _poll_fd(self._fd, events, timeout_ms)
            finally:
                self._unblocked()
            if ready:
                return False
            if timeout_ms == 0 or time.monotonic_ns() >= deadline:
                return True

    def _finish_handshake(self, deadline):
        """Run the rest of a deferred handshake (the peer's hello, see connection.Client), waiting
        for its bytes up to `deadline`. A failure closes the channel and raises as the handshake
        does (ProtocolError, AuthenticationError)."""
        handshake = self._deferred_handshake
        while True:
            try:
                done = handshake.advance()
            except BaseException:
                self._deferred_handshake = None
                self.close()
                raise
            if done:
                self._deferred_handshake = None
                return
            if self._wait(_POLLIN, deadline):
                raise TimeoutError(_messages.TIMED_OUT_WAITING)

    def _advance_handshake_nowait(self):
        """Before a send: check the peer's hello of a deferred handshake if it has arrived, without
        waiting (a failure closes the channel and raises); if it has not, the send goes ahead.
        Skipped while a receive holds the receive lock: that receive finishes the handshake."""
        if self._deferred_handshake is None or not self._recv_lock.acquire(False):
            return
        try:
            handshake = self._deferred_handshake
            if handshake is None:
                return
            try:
                done = handshake.advance()
            except BaseException:
                self._deferred_handshake = None
                self.close()
                raise
            if done:
                self._deferred_handshake = None
        finally:
            self._recv_lock.release()

    def _spin_time(self):
        """Seconds this channel has spent busy-polling: always 0 (the twin never spins)."""
        return 0.0

    def _awaits_reply(self):
        """True if this channel sent since its last receive (the compiled channel's waits for
        data busy-poll then; the twin only keeps the flag, for loopfast.wait)."""
        return self._sent_since_recv

    # ---- handing a channel to another process (see _reduction.py) ---------------------------

    def _defer_handshake(self, handshake):
        """Leave the rest of the handshake (`handshake.advance()` runs it without waiting) to
        the channel's first use: every receive and poll() finishes it first, and a send checks
        whether it can finish without waiting (see connection.Client)."""
        self._deferred_handshake = handshake

    def _prepare_handover(self):
        """Before this channel's socket is duplicated into another process: refuse a channel
        that a timeout left in the middle of a message, finish a deferred handshake, and treat
        the socket as shared from now on (what this channel knows of the queue can go stale).

        A receive in progress in another thread (a Pool's result handler waits in one while the
        pool starts workers) is not waited for: this twin holds nothing delivered in the socket
        between its steps. Only a deferred handshake waits for that receive to finish it."""
        if self._send_rest is not None:
            raise OSError(_messages.HANDOVER_MID_SEND)
        self._shared = True
        while True:
            if self._recv_lock.acquire(False):
                try:
                    if self._pending is not None or self._head_have > 0:
                        raise OSError(_messages.HANDOVER_MID_RECEIVE)
                    if self._deferred_handshake is not None:
                        self._finish_handshake(-1)
                finally:
                    self._recv_lock.release()
                return
            if self._deferred_handshake is None:
                return
            time.sleep(HANDOVER_NAP)

    def _mark_shared(self):
        """Another process may receive from this socket too (the copy rebuilt from a handover)."""
        self._shared = True
