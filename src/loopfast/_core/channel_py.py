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

import io
import math
import operator
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
import warnings
import weakref
from multiprocessing.reduction import ForkingPickler

from .._errors import BufferTooShort, ProtocolError
from .._wire import (
    BATCH_FLUSH_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    FD_MAX,
    FRAME_HEADER,
    HANDOVER_NAP_NS,
    HEADER_SIZE,
    KIND_BYTES,
    KIND_OBJECT,
    KIND_PICKLE,
    MANY_LOOKS,
    MAX_OOB_BUFFERS,
    OOB_MIN_SIZE,
    PEEK_SIZE,
    PEEK_SIZE_SHARED,
    PENDING_IOV,
    RECV_BUFFER_SIZE,
    RESERVE_FLOOR,
    SMALL_SEND_SIZE,
)
from .._wire import (
    PART_SIZE as _SIZE,
)

__all__ = ["Channel"]

HANDOVER_NAP = HANDOVER_NAP_NS / 1e9  # seconds
_UINT64_MAX = 2**64 - 1
# MSG_NOSIGNAL: a send to a peer that has gone raises BrokenPipeError instead of raising SIGPIPE
# (which would kill a process that restored the default SIGPIPE action). Missing on macOS and
# Windows, where Python's default of ignoring SIGPIPE (or having none) gives the same result.
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
# sendmsg (gather write) is missing on Windows: there the header and payload of a large frame go
# out with two send() calls, still without copying the payload.
_HAVE_SENDMSG = hasattr(socket.socket, "sendmsg")
# recvmsg (scatter read) is missing on Windows too: there the parts are read one at a time.
_HAVE_RECVMSG = hasattr(socket.socket, "recvmsg_into")
# A discard consumes bytes already known (peeked) to be queued. On Linux, recv() on a TCP socket
# with MSG_TRUNC drops them without copying; elsewhere they are received into the window, at the
# place where the peek put the very same bytes.
_DISCARD_FLAGS = (socket.MSG_TRUNC if sys.platform.startswith("linux")
                  and hasattr(socket, "MSG_TRUNC") else 0)


def _iov_max():
    """The most buffers one sendmsg() may take (IOV_MAX; 1024, Linux's value, if unknown)."""
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        value = -1
    return value if value > 0 else 1024


_IOV_MAX = _iov_max()

_POLLIN = getattr(select, "POLLIN", 1)
_POLLOUT = getattr(select, "POLLOUT", 4)

_dumps = ForkingPickler.dumps
_loads = ForkingPickler.loads

_CLOSED_WHILE_WAITING = "handle is closed (by another thread, while this one waited)"


# ---- argument conversion, as Cython converts arguments to C types --------------------------------

def _ssize(value):
    """`value` as a Py_ssize_t argument: an integer (never a float) that fits in a C ssize_t."""
    value = operator.index(value)
    if not -sys.maxsize - 1 <= value <= sys.maxsize:
        raise OverflowError("Python int too large to convert to C ssize_t")
    return value


def _as_double(value):
    """`value` as a C double, as Cython converts it (PyFloat_AsDouble): numbers only, never
    strings (float("1") would accept one). fsum of one value is that value, with
    PyFloat_AsDouble's checks and messages."""
    return math.fsum((value,))


def _deadline(timeout):
    """Absolute time.monotonic_ns() deadline for a timeout in seconds; -1 for no deadline."""
    if timeout is None:
        return -1
    seconds = _as_double(timeout)
    if math.isnan(seconds):
        raise ValueError("timeout must be a number, not NaN")
    if seconds <= 0:
        return time.monotonic_ns()
    if seconds > 1e9:  # ~32 years: as good as no limit, and keeps the arithmetic in 64 bits
        return -1
    return time.monotonic_ns() + int(seconds * 1e9)


class _Held:
    """A channel lock taken by _take(); released when the with block ends."""

    __slots__ = ("_lock",)

    def __init__(self, lock):
        self._lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._lock.release()


def _take(lock, deadline, what):
    """Take a channel lock (another thread's send or receive holds it while it runs), waiting no
    longer than the call's deadline; interruptible by Ctrl-C. Use as `with _take(...):`."""
    if not lock.acquire(False):
        if deadline < 0:
            lock.acquire()
        else:
            remaining = (deadline - time.monotonic_ns()) / 1e9
            if remaining <= 0 or not lock.acquire(timeout=remaining):
                raise TimeoutError(f"timed out waiting for another thread's {what} on this "
                                   "channel to finish")
    return _Held(lock)


# ---- buffers -------------------------------------------------------------------------------------

def _byte_view(obj, *, writable):
    """A 1-D memoryview of unsigned bytes over `obj`'s buffer (offsets and sizes are in bytes,
    whatever the item type: an array('i'), a 2-D numpy array...).

    For sending (writable=False) a non-contiguous buffer is copied once into C order, as
    multiprocessing does; for receiving into (writable=True) it is refused, as a read-only
    buffer is. The caller must release() the view (the buffer of a bytearray cannot be resized
    while a view of it exists).
    """
    try:
        view = memoryview(obj)
    except TypeError:
        # The message of the compiled channel (PyObject_GetBuffer), without "memoryview: ".
        raise TypeError(f"a bytes-like object is required, not '{type(obj).__name__}'") from None
    if writable:
        if view.readonly:
            view.release()
            raise BufferError("Object is not writable.")
        if not view.c_contiguous:
            view.release()
            raise BufferError("memoryview: underlying buffer is not C-contiguous")
    elif not view.c_contiguous:
        data = view.tobytes()  # C order
        view.release()
        view = memoryview(data)
    if view.ndim == 1 and view.format == "B":
        return view
    flat = view.cast("B")
    view.release()  # `flat` keeps the underlying buffer exported until it is released
    return flat


def _contiguous_view(obj):
    """A 1-D byte view of a C-contiguous buffer; no copy, no fallback (for _send_raw)."""
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not '{type(obj).__name__}'") from None
    if not view.c_contiguous:
        view.release()
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    if view.ndim == 1 and view.format == "B":
        return view
    flat = view.cast("B")
    view.release()
    return flat


def _new_payload(size):
    """A writable buffer of `size` bytes for a large payload, allocated once, which becomes the
    `bytes` that recv_bytes() returns *without a copy*.

    The copy question: a bytearray filled by recv_into would need bytes(bytearray) at the end, a
    second allocation and a full copy (peak memory twice the message). Instead the payload is
    the internal buffer of an io.BytesIO: getbuffer() is a writable view of it, and once every
    view is released, getvalue() returns that very bytes object when it is exactly filled
    (CPython's BytesIO shares its buffer; on other interpreters getvalue() may copy, which is
    still correct). Writing one byte at position size - 1 sizes the buffer exactly.
    """
    payload = io.BytesIO()
    payload.seek(size - 1)
    payload.write(b"\0")
    return payload


def _part_view(part):
    """A writable byte view of a part of a message being received: a bytearray, or the
    io.BytesIO of _new_payload (whose bytes must not be copied). Release it before getvalue()."""
    return part.getbuffer() if isinstance(part, io.BytesIO) else memoryview(part)


def _rest_of_part(part, filled):
    """A writable byte view of `part` (see _part_view) from byte `filled` on; release it."""
    with _part_view(part) as whole:
        return whole[filled:]  # the slice keeps the buffer exported until it is released


def _part_size(part):
    with _part_view(part) as view:
        return len(view)


def _remaining_views(parts, start, limit=None):
    """Views of `parts` (byte buffers) from byte `start` of their concatenation on; at most
    `limit` of them (None: all). Empty parts are left out."""
    views = []
    for part in parts:
        if limit is not None and len(views) == limit:
            break
        if start >= len(part):
            start -= len(part)
            continue
        views.append(memoryview(part)[start:])
        start = 0
    return views


def _release_all(views):
    for view in views:
        if isinstance(view, memoryview):
            view.release()


# ---- pickling at protocol 5 with out-of-band buffers ---------------------------------------------

class _BufferCollector:
    """buffer_callback for pickle protocol 5: keeps large buffers out of band."""

    def __init__(self):
        self.buffers = []

    def __call__(self, pickle_buffer):
        try:
            raw = pickle_buffer.raw()  # a flat byte view of the buffer's memory, no copy
        except BufferError:
            # A non-contiguous buffer: one C-order copy, sent out of band as flat bytes.
            # (CPython's pickler refuses a non-contiguous PickleBuffer before calling us.)
            raw = memoryview(pickle_buffer).tobytes()
        if len(raw) < OOB_MIN_SIZE:
            return True  # small: in band
        self.buffers.append(raw)
        return False


class _OutOfBandPickler(pickle.Pickler):
    """multiprocessing's ForkingPickler (the same reducers: channels, sockets, ... pickle as they
    do for multiprocessing) at protocol 5 with a buffer_callback, which ForkingPickler's
    constructor does not pass on before Python 3.12."""

    def __init__(self, file, buffer_callback):
        super().__init__(file, 5, buffer_callback=buffer_callback)
        self.dispatch_table = ForkingPickler._copyreg_dispatch_table.copy()
        self.dispatch_table.update(ForkingPickler._extra_reducers)


def _pickle(obj):
    """Pickle `obj` at protocol 5; return (in-band pickle, list of out-of-band buffers), each a
    flat byte buffer; the out-of-band ones are views of the objects' own memory."""
    out = io.BytesIO()
    collector = _BufferCollector()
    try:
        _OutOfBandPickler(out, collector).dump(obj)
    except BaseException:
        _release_all(collector.buffers)  # the objects' memory is theirs again at once
        raise
    return out.getbuffer(), collector.buffers


if hasattr(select, "poll"):
    def _poll_fd(fd, events, timeout_ms):
        """True if `fd` is ready for `events` (or has an error/hang-up) within timeout_ms
        (-1: no limit)."""
        poller = select.poll()  # one per wait: poll objects must not be shared between threads
        poller.register(fd, events)
        return bool(poller.poll(timeout_ms))
else:  # pragma: no cover - Windows
    def _poll_fd(fd, events, timeout_ms):
        readers = [fd] if events == _POLLIN else []
        writers = [fd] if events == _POLLOUT else []
        timeout = None if timeout_ms < 0 else timeout_ms / 1000
        ready = select.select(readers, writers, [fd], timeout)
        return any(ready)


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


# Every open channel of this process, for the fork handler below.
_channels = weakref.WeakSet()


def _after_fork_in_child():
    """Only the forking thread survives fork(): in the child no thread is blocked on any channel.
    Forget the parent's blocked threads, or the child's close() would shut down the socket it
    shares with the parent (see close()) instead of closing its own descriptor. And every
    channel's socket is now shared with the parent."""
    for channel in list(_channels):
        channel._blocked = 0
        channel._shared = True
        deferred, channel._deferred_close = channel._deferred_close, None
        if deferred is not None:
            deferred.close()


def _after_fork_in_parent():
    """The child may receive from every channel's socket too: what this process knows of their
    queues can go stale."""
    for channel in list(_channels):
        channel._shared = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child,
                        after_in_parent=_after_fork_in_parent)


class Channel:
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
            raise ValueError("at least one of `readable` and `writable` must be True")
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
                raise ValueError("max_message_size must be >= 0 or None")
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
        _channels.add(self)

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
            raise ValueError("spin must be a number of microseconds >= 0, or None")
        self._spin = None if microseconds is None else float(min(microseconds, 1e9))

    @property
    def serializer(self):
        """The object whose dumps()/loads() send() and recv() use; None: pickle protocol 5 with
        out-of-band buffers."""
        return self._serializer

    # ---- properties and small methods ------------------------------------------------------------

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
            self._pending = self._pending_sizes = None
            self._send_rest = None
            self._deferred_handshake = None
            self._rstart = self._rend = self._head_have = 0
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
            raise OSError("connection is write-only")

    def _check_writable(self):
        if self._sock is None:
            raise OSError("handle is closed")
        if not self._writable:
            raise OSError("connection is read-only")

    def _protocol_error(self, message):
        """The stream can no longer be trusted: close, and return the ProtocolError to raise."""
        self.close()
        return ProtocolError(message)

    # ---- waiting ---------------------------------------------------------------------------------

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

    # ---- receiving -------------------------------------------------------------------------------
    #
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
                raise TimeoutError("timed out waiting for a message")

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

    def _peek(self, size):
        """Copy up to `size` queued bytes to the start of the window, consuming nothing. Returns
        how many (> 0), 0 at the end of the stream, -1 when nothing is queued."""
        sock = self._sock
        if sock is None:
            raise OSError("handle is closed")
        size = min(size, RECV_BUFFER_SIZE)
        error = None
        try:
            n = sock.recv_into(self._rview, size, socket.MSG_PEEK)
        except BlockingIOError:
            n = -1
        except OSError as exc:
            error = exc
        if error is not None or n < 0:
            self._rstart = self._rend = 0
            if error is None:
                self._queue_empty = True
                return -1
            if self._sock is None:
                raise OSError(_CLOSED_WHILE_WAITING)
            raise error
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
            raise TimeoutError("timed out waiting for a message")
        while True:
            n = self._peek(size)
            if n > 0:
                self._queue_empty = False
                return n >= need
            if n == 0:
                raise EOFError("the peer closed the connection")
            if self._wait(_POLLIN, deadline):
                raise TimeoutError("timed out waiting for a message")

    def _discard(self, at, n):
        """Consume `n` bytes known (peeked) to be queued, whose copy is _rbuf[at:at + n]: on
        Linux without copying them (MSG_TRUNC), elsewhere by receiving them where they already
        are. Never waits: the bytes are queued."""
        while n > 0:
            sock = self._sock
            if sock is None:
                raise OSError("handle is closed")
            error = None
            got = -1
            try:
                with self._rview[at:at + n] as part:
                    got = sock.recv_into(part, n, _DISCARD_FLAGS)
            except BlockingIOError:
                pass
            except OSError as exc:
                error = exc
            if error is not None:
                if self._sock is None:
                    raise OSError(_CLOSED_WHILE_WAITING)
                raise self._protocol_error(
                    f"connection lost in the middle of a message ({error.strerror or error})"
                ) from error
            if got > 0:
                n -= got
                at += got
                continue
            if got < 0:
                raise self._protocol_error(
                    "bytes this channel had seen queued were taken by someone else (another "
                    "process receiving without a lock?)")
            raise self._protocol_error("connection lost in the middle of a message")

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
                raise TimeoutError("timed out in the middle of a message; "
                                   "the next receive resumes it")
            error = None
            n = -1
            try:
                if len(views) == 1 or not _HAVE_RECVMSG:
                    n = sock.recv_into(views[0])
                else:
                    n = sock.recvmsg_into(views)[0]
            except BlockingIOError:
                pass
            except OSError as exc:
                error = exc
            if error is not None:
                if self._sock is None:
                    raise OSError(_CLOSED_WHILE_WAITING)
                raise self._protocol_error(
                    f"connection lost in the middle of a message ({error.strerror or error})"
                ) from error
            if n > 0:
                self._last_recv_was_empty = n < asked
                return n
            if n == 0:
                raise self._protocol_error(
                    "the peer closed the connection in the middle of a message")
            self._last_recv_was_empty = True

    def _header_error(self, at):
        """Check the frame header at _rbuf[at:at + HEADER_SIZE]: None if it is valid, else what
        is wrong with it. No side effects."""
        kind, flags, reserved, count, length = FRAME_HEADER.unpack_from(self._rbuf, at)
        # `count` is the number of out-of-band buffers: not 0 exactly for an object message.
        if (kind not in (KIND_BYTES, KIND_PICKLE, KIND_OBJECT) or flags or reserved
                or (count != 0) != (kind == KIND_OBJECT)):
            header = bytes(self._rview[at:at + HEADER_SIZE])
            return ("malformed frame header " + header.hex()
                    + " (is the peer a loopfast channel of the same protocol version?)")
        if kind == KIND_OBJECT and (count > MAX_OOB_BUFFERS or length < 8 * (count + 1)):
            return (f"malformed object frame: {count} out-of-band buffers "
                    f"(at most {MAX_OOB_BUFFERS}) in {length} bytes")
        if length > self._max_message_size:
            return (f"the peer announced a {length}-byte message, over this channel's "
                    f"max_message_size of {self._max_message_size_obj} bytes")
        if length > sys.maxsize:
            return f"the peer announced a {length}-byte message, too large for this machine"
        return None

    def _head_size(self, at):
        """The size of the (valid) frame head at _rbuf[at:]: its header, and for an object
        message its size table."""
        kind, _, _, count, _ = FRAME_HEADER.unpack_from(self._rbuf, at)
        return HEADER_SIZE + 8 * (count + 1) if kind == KIND_OBJECT else HEADER_SIZE

    def _check_table(self, at):
        """An object frame's size table (after the header at _rbuf[at:]) must add up to its
        length; otherwise the channel closes (ProtocolError), before anything is allocated."""
        _, _, _, count, length = FRAME_HEADER.unpack_from(self._rbuf, at)
        sizes = struct.unpack_from(f"<{count + 1}Q", self._rbuf, at + HEADER_SIZE)
        # Python integers do not wrap around: sizes whose u64 sum would overflow do not add up.
        if 8 * (count + 1) + sum(sizes) != length:
            raise self._protocol_error(
                f"malformed object frame: the sizes of its {count + 1} parts do not add up to "
                f"its length of {length} bytes")

    def _next_head(self, deadline, objects):
        """Wait for the next frame's head (its header and, for an object message, its size
        table), check it (a bad one closes the channel: ProtocolError, before anything is
        allocated; an object message when not `objects`: OSError from the header alone, the
        message left in place) and return False when it is in the window at _rstart, not
        consumed (the usual case), or True when it was consumed into _rbuf[0:_head_have] because
        it arrived in pieces (a consumed head stays there until its payload has been
        allocated)."""
        while True:
            if self._head_have > 0:
                self._read_head(HEADER_SIZE, deadline)
                error = self._header_error(0)
                if error is not None:
                    raise self._protocol_error(error)
                if self._rbuf[0] == KIND_OBJECT and not objects:
                    self._refuse_object()
                self._read_head(self._head_size(0), deadline)
                if self._rbuf[0] == KIND_OBJECT:
                    self._check_table(0)
                return True
            if self._know(HEADER_SIZE, deadline):
                error = self._header_error(self._rstart)
                if error is not None:
                    raise self._protocol_error(error)
                if self._rbuf[self._rstart] == KIND_OBJECT and not objects:
                    self._refuse_object()
                if self._know(self._head_size(self._rstart), deadline):  # a peek moves _rstart
                    if self._rbuf[self._rstart] == KIND_OBJECT:
                        self._check_table(self._rstart)
                    return False
            # Only part of the head is queued: take it, and read the rest as it arrives.
            have = self._rend - self._rstart
            if self._rstart:
                self._rview[:have] = self._rview[self._rstart:self._rend]
            self._rstart = self._rend = 0
            self._discard(0, have)
            self._head_have = have
            self._last_recv_was_empty = True

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
        sizes = struct.unpack_from(f"<{count + 1}Q", self._rbuf, at + HEADER_SIZE)
        return [bytearray(size) for size in sizes]

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
        kind, _, _, _, length = FRAME_HEADER.unpack_from(self._rbuf, at)
        if not consumed and HEADER_SIZE + length <= self._rend - self._rstart:
            if kind == KIND_OBJECT:
                out = self._object_parts(at)
                pos = at + self._head_size(at)
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
            self._discard(self._rstart, self._head_size(self._rstart))
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
        raise OSError("the next message was sent with send() and carries out-of-band buffers: "
                      "receive it with recv()")

    def _bad_message_length(self):
        # As multiprocessing does: reading is over on this channel (the message is left unread).
        if self._writable:
            self._readable = False
        else:
            self.close()
        raise OSError("bad message length")

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
        with _take(self._recv_lock, deadline, "receive"):
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
                self._bad_message_length()
            return self._finish_pending(deadline)[0]
        consumed = self._next_head(deadline, False)
        at = 0 if consumed else self._rstart
        if maxlength is not None and FRAME_HEADER.unpack_from(self._rbuf, at)[4] > maxlength:
            self._bad_message_length()
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
                raise ValueError("max_messages must be >= 1 or None")
        deadline = _deadline(timeout)
        with _take(self._recv_lock, deadline, "receive"):
            self._begin_receive(deadline)
            out = [self._recv_bytes_frame(deadline, None)]
            self._sent_since_recv = False
            short_of_memory = False
            looks = 0
            while limit is None or len(out) < limit:
                # Every whole plain frame in the window, up to the limit.
                pos = self._rstart
                while (limit is None or len(out) < limit) and self._rend - pos >= HEADER_SIZE:
                    if self._rbuf[pos] == KIND_OBJECT or self._header_error(pos) is not None:
                        break  # an object message or a bad header: the next call takes it
                    length = FRAME_HEADER.unpack_from(self._rbuf, pos)[4]
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
        with _take(self._recv_lock, deadline, "receive"):
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
            with _take(self._recv_lock, deadline, "receive"):
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
        at = 0 if consumed else self._rstart
        kind, _, _, _, length = FRAME_HEADER.unpack_from(self._rbuf, at)
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
            with _take(self._recv_lock, deadline, "receive"):
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

    def _spin_time(self):
        """Seconds this channel has spent busy-polling: always 0 (the twin never spins)."""
        return 0.0

    def _awaits_reply(self):
        """True if this channel sent since its last receive (the compiled channel's waits for
        data busy-poll then; the twin only keeps the flag, for loopfast.wait)."""
        return self._sent_since_recv

    def _has_message(self):
        """True if a whole message (or a malformed header) is known to be queued (no syscall)."""
        avail = self._rend - self._rstart
        if (self._sock is None or self._shared or avail < HEADER_SIZE
                or self._pending is not None or self._head_have > 0):
            return False
        if self._header_error(self._rstart) is not None:
            return True  # ready: the receive will raise the ProtocolError
        return FRAME_HEADER.unpack_from(self._rbuf, self._rstart)[4] <= avail - HEADER_SIZE

    # ---- sending ---------------------------------------------------------------------------------

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
                error = None
                n = -1  # -1: wait for room first
                if full:
                    full = False  # wait rather than make a write that would fail
                else:
                    try:
                        n = self._send_some(sock, parts, sent)
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        error = exc
                if error is not None:
                    if self._sock is None:
                        raise OSError(_CLOSED_WHILE_WAITING)
                    raise error
                if n >= 0:
                    sent += n
                    if sent == total:
                        return
                    full = True
                    continue
                if self._wait(_POLLOUT, deadline):
                    if flushing:
                        # The caller must be able to tell whether to send this message again.
                        raise TimeoutError(
                            f"timed out sending the rest of an earlier message ({sent} of the "
                            f"{total} bytes left went out); this message was not sent")
                    if sent == 0:
                        raise TimeoutError("timed out sending a message")
                    raise TimeoutError(f"timed out after sending {sent} of {total} bytes of a "
                                       "message; the rest goes out before the next message")
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
        with _take(self._send_lock, deadline, "send"):
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
            with _take(self._send_lock, deadline, "send"):
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
            with view[offset:offset + size] as payload, _take(self._send_lock, deadline, "send"):
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
        with _take(self._send_lock, deadline, "send"):
            self._flush_pending_sends(deadline)
            self._send_all([head, data, *buffers], deadline)

    # ---- raw bytes for the handshake (_handshake.py), before any frame ---------------------------

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
            error = None
            data = None
            try:
                data = sock.recv(max_size)
            except BlockingIOError:
                pass
            except OSError as exc:
                error = exc
            if error is not None:
                if self._sock is None:
                    raise OSError(_CLOSED_WHILE_WAITING)
                raise error
            if data:
                return data
            if data is not None:
                raise EOFError("the peer closed the connection")
            if self._wait(_POLLIN, deadline):
                raise TimeoutError("timed out waiting for a message")

    def _defer_handshake(self, handshake):
        """Leave the rest of the handshake (`handshake.advance()` runs it without waiting) to
        the channel's first use: every receive and poll() finishes it first, and a send checks
        whether it can finish without waiting (see connection.Client)."""
        self._deferred_handshake = handshake

    # ---- handing a channel to another process (see _reduction.py) --------------------------------

    def _prepare_handover(self):
        """Before this channel's socket is duplicated into another process: refuse a channel
        that a timeout left in the middle of a message, finish a deferred handshake, and treat
        the socket as shared from now on (what this channel knows of the queue can go stale).

        A receive in progress in another thread (a Pool's result handler waits in one while the
        pool starts workers) is not waited for: this twin holds nothing delivered in the socket
        between its steps. Only a deferred handshake waits for that receive to finish it."""
        if self._send_rest is not None:
            raise OSError("cannot hand over a channel in the middle of sending a message")
        self._shared = True
        while True:
            if self._recv_lock.acquire(False):
                try:
                    if self._pending is not None or self._head_have > 0:
                        raise OSError("cannot hand over a channel in the middle of receiving a "
                                      "large message")
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
