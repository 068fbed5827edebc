"""The pure-Python twin's plumbing: argument conversion as Cython does it, deadlines and locks,
buffer views, and the platform's socket capabilities (see channel_py.py for the design)."""

import io
import math
import operator
import os
import select
import socket
import sys
import time
from multiprocessing.reduction import ForkingPickler

from .. import _messages
from .._wire import HANDOVER_NAP_NS

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

_CLOSED_WHILE_WAITING = _messages.CLOSED_WHILE_WAITING


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
        raise ValueError(_messages.NAN_TIMEOUT)
    if seconds <= 0:
        return time.monotonic_ns()
    if seconds > 1e9:  # ~32 years: as good as no limit, and keeps the arithmetic in 64 bits
        return -1
    return time.monotonic_ns() + int(seconds * 1e9)


class _Held:
    """A channel lock taken by _take(); released when the with block ends, after `ending()`
    (which lets a channel closed meanwhile drop what the call left half-done)."""

    __slots__ = ("_ending", "_lock")

    def __init__(self, lock, ending):
        self._lock = lock
        self._ending = ending

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        try:
            if self._ending is not None:
                self._ending()
        finally:
            self._lock.release()


def _take(lock, deadline, what, ending=None):
    """Take a channel lock (another thread's send or receive holds it while it runs), waiting no
    longer than the call's deadline; interruptible by Ctrl-C. Use as `with _take(...):`; the
    call `ending()` runs before the lock is released."""
    if not lock.acquire(False):
        if deadline < 0:
            lock.acquire()
        else:
            remaining = (deadline - time.monotonic_ns()) / 1e9
            if remaining <= 0 or not lock.acquire(timeout=remaining):
                raise TimeoutError(_messages.TIMED_OUT_LOCK.format(what=what))
    return _Held(lock, ending)


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
