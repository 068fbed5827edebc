# cython: language_level=3, embedsignature=True
"""The compiled channel: framed messages over a nonblocking loopback TCP socket.

This is where frames are encoded (``_send_frame``) and parsed (``_next_head``, ``_take_frame``);
where the process waits (``_wait``, a ``poll()`` with the GIL released); and where
OS errors become Python exceptions (``_raise_os_error``). The wire format is specified in
docs/protocol.md; the handshake that precedes the frames lives in _handshake.py.
"""

from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytearray cimport (PyByteArray_AS_STRING, PyByteArray_FromStringAndSize,
                                PyByteArray_GET_SIZE, PyByteArray_Resize)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.pythread cimport (NOWAIT_LOCK, PY_LOCK_ACQUIRED, PY_LOCK_INTR, PyLockStatus,
                               PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_release_lock)
from libc.stdint cimport UINT64_MAX, uint32_t, uint64_t
from libc.string cimport memcpy, memmove

import io
import operator
import os
import pickle
import sys
import warnings
import weakref
from multiprocessing.reduction import ForkingPickler

from .._errors import BufferTooShort, ProtocolError
from .._pickling import dumps_out_of_band as _pickle
from .._wire import DEFAULT_MAX_MESSAGE_SIZE, FD_MAX as _FD_MAX

# ---- wire format (docs/protocol.md, "Frames") ---------------------------------------------------
cdef enum:
    # The wire constants, as C: the same values as _wire.py (where each is explained), which a
    # test checks (WIRE_CONSTANTS below).
    # header layout: [0] kind, [1] flags, [2:4] reserved, [4:8] count, [8:16] payload length (LE)
    HEADER_SIZE = 16
    KIND_BYTES = 1
    KIND_PICKLE = 2
    KIND_OBJECT = 3
    MAX_OOB_BUFFERS = 8191
    OOB_MIN_SIZE = 4096

# ---- buffer sizes, chosen by measurement: the same values as _wire.py (which explains each) --
cdef enum:
    RECV_BUFFER_SIZE = 128 * 1024
    PEEK_SIZE = 64 * 1024
    PEEK_SIZE_SHARED = 4096 + HEADER_SIZE
    PENDING_IOV = 64
    RESERVE_FLOOR = 64 * 1024
    MANY_LOOKS = 4
    SMALL_SEND_SIZE = 8 * 1024
    BATCH_FLUSH_SIZE = 64 * 1024
    HANDOVER_NAP_NS = 200 * 1000

# ---- the compiled core's own tuning (the twin never busy-polls) ------------------------------
cdef enum:
    # While busy-polling: time between two readiness checks, and how often to give the CPU
    # away in case the peer shares it (ns).
    SPIN_GAP_NS = 500
    SPIN_YIELD_NS = 5000
    # A yield that takes longer than this (ns) means another thread ran on this CPU.
    SPIN_CONTENDED_NS = 2000
    SPIN_CONTENDED = -1000
    SPIN_READY_SHARED = 1000
    # Socket I/O on more than this many bytes releases the GIL (a large copy into the kernel).
    RELEASE_GIL_SIZE = 64 * 1024

cdef int64_t _default_spin_ns = 0  # the process-wide spin budget (loopfast.set_default_spin)


# The wire constants this module has as C enums, for the test that checks them against
# _wire.py (where the protocol's numbers live in Python).
WIRE_CONSTANTS = {"HEADER_SIZE": HEADER_SIZE, "KIND_BYTES": KIND_BYTES,
                  "KIND_PICKLE": KIND_PICKLE, "KIND_OBJECT": KIND_OBJECT,
                  "MAX_OOB_BUFFERS": MAX_OOB_BUFFERS, "OOB_MIN_SIZE": OOB_MIN_SIZE,
                  "RECV_BUFFER_SIZE": RECV_BUFFER_SIZE, "PEEK_SIZE": PEEK_SIZE,
                  "PEEK_SIZE_SHARED": PEEK_SIZE_SHARED, "PENDING_IOV": PENDING_IOV,
                  "RESERVE_FLOOR": RESERVE_FLOOR, "MANY_LOOKS": MANY_LOOKS,
                  "SMALL_SEND_SIZE": SMALL_SEND_SIZE, "BATCH_FLUSH_SIZE": BATCH_FLUSH_SIZE,
                  "HANDOVER_NAP_NS": HANDOVER_NAP_NS}


def _set_default_spin_ns(int64_t nanoseconds):
    global _default_spin_ns
    _default_spin_ns = nanoseconds


# How long a receiver in the middle of a stream that drained the queue naps before it sleeps in
# poll() (see Channel._await_data), in ns; the kernel may round it up (Linux: by its 50 us timer
# slack). 0: never nap.
cdef int64_t _nap_ns = 10000


def _set_nap_ns(int64_t nanoseconds):
    """For benchmarks and tests: the stream receiver's nap (0 turns it off)."""
    global _nap_ns
    _nap_ns = nanoseconds


cdef bint _detect_shared_cpu = True  # off only in tests of the spin budget itself


def _set_shared_cpu_detection(bint on):
    """For tests: whether a spin stops early when its CPU turns out to be shared."""
    global _detect_shared_cpu
    _detect_shared_cpu = on


cdef int _spin_until_ready(lf_socket_t fd, short events, int64_t spin_ns, int64_t deadline,
                           char *peek_buf, size_t peek_size,
                           Py_ssize_t *peeked) noexcept nogil:
    """poll() with a zero timeout until the socket is ready (returns > 0), the spin budget or the
    deadline is spent (returns 0), this CPU turns out to be shared (returns SPIN_CONTENDED, or
    SPIN_READY_SHARED when the socket became ready after another thread ran here), or
    poll() fails (returns < 0; the caller's blocking wait reports the error).
    With `peek_buf`, each check is a peek instead of a poll(): when data arrives, it is already
    in `peek_buf` (*peeked bytes; 0 at the end of the stream), which saves the receive the
    syscall of its own first look (measured, 64 B round trip: ~1 us)."""
    cdef short revents = 0
    cdef int rc
    cdef Py_ssize_t n
    cdef int64_t now = lf_monotonic_ns()
    cdef int64_t limit = now + spin_ns
    cdef int64_t next_yield = now + SPIN_YIELD_NS
    cdef int slow_yields = 0
    if deadline >= 0 and deadline < limit:
        limit = deadline
    while True:
        if peek_buf != NULL:
            n = lf_peek(fd, peek_buf, peek_size)
            if n >= 0:
                peeked[0] = n
                rc = 1
            elif lf_error_would_block(lf_last_error()) or lf_error_interrupted(lf_last_error()):
                rc = 0
            else:
                rc = -1
        else:
            rc = lf_poll(fd, events, 0, &revents)
        now = lf_monotonic_ns()
        if rc > 0 and slow_yields > 0:
            return SPIN_READY_SHARED  # ready after another thread ran here: likely the peer
        if rc != 0 or now >= limit:
            return rc
        # Space the checks out a little: each takes the socket's lock, which the peer's send
        # then waits for. Only a wait for a reply spins (streams nap instead), and there the
        # gap mattered little: 64 B round trip, median us, gap 0 / 0.3 / 1 / 2 us: 9.5-10.5 /
        # 9.5-11.4 / 9.9-11.0 / 10.6-11.2; 4 KiB: 11.8-12.0 / 11.5 / 11.4-11.5 / 11.6-12.1.
        while lf_monotonic_ns() - now < SPIN_GAP_NS:
            pass
        if now >= next_yield:
            # Offer the CPU now and then. If yields take long, another thread runs here (most
            # likely the peer we wait for): spinning on a shared CPU only delays it (measured,
            # both ends on one CPU: 64 B round trip 25 us spinning vs 6 us sleeping), so stop.
            # One slow yield is not enough: on this VM about 1 in 6,000 takes > 2 us with the
            # CPU to itself (an interrupt, the hypervisor), which ended long spins at once.
            now = lf_monotonic_ns()
            lf_yield()
            if _detect_shared_cpu and lf_monotonic_ns() - now > SPIN_CONTENDED_NS:
                slow_yields += 1
                if slow_yields >= 2:
                    return SPIN_CONTENDED
            next_yield = lf_monotonic_ns() + SPIN_YIELD_NS


cdef inline Py_ssize_t _write(lf_socket_t fd, lf_iovec *iov, int count) noexcept nogil:
    """One write of the bytes described by `iov`: send() for one piece, a gather write for more."""
    if count == 1:
        return lf_send(fd, <char *>iov[0].base, iov[0].len)
    return lf_sendv(fd, iov, count)


cdef inline bint _plain_frame_header(const unsigned char *h, uint64_t max_size) noexcept nogil:
    """A valid header of kind 1 or 2 within the size limit (the common case of _header_error)."""
    return ((h[0] == KIND_BYTES or h[0] == KIND_PICKLE) and h[1] == 0 and h[2] == 0 and h[3] == 0
            and lf_load_u32le(h + 4) == 0 and lf_load_u64le(h + 8) <= max_size
            and lf_load_u64le(h + 8) <= <uint64_t>PY_SSIZE_T_MAX)


cdef inline void _store_header(unsigned char *h, int kind, uint32_t count,
                               uint64_t length) noexcept nogil:
    """Encode a frame header (docs/protocol.md, "Frames")."""
    h[0] = <unsigned char>kind
    h[1] = h[2] = h[3] = 0
    lf_store_u32le(h + 4, count)
    lf_store_u64le(h + 8, length)


cdef inline Py_ssize_t _head_size(const unsigned char *h) noexcept nogil:
    """The size of a frame's head: its header, and for an object message its size table."""
    if h[0] == KIND_OBJECT:
        return HEADER_SIZE + 8 * (<Py_ssize_t>lf_load_u32le(h + 4) + 1)
    return HEADER_SIZE


cdef list _object_parts(const unsigned char *h):
    """Allocate the parts of the object message whose (checked) head is at `h`, at their final
    sizes: the in-band pickle as bytes, each out-of-band buffer as a writable bytearray."""
    cdef uint32_t count = lf_load_u32le(h + 4), i
    cdef const unsigned char *table = h + HEADER_SIZE
    parts = [PyBytes_FromStringAndSize(NULL, <Py_ssize_t>lf_load_u64le(table))]
    for i in range(1, count + 1):
        parts.append(PyByteArray_FromStringAndSize(NULL,
                                                   <Py_ssize_t>lf_load_u64le(table + 8 * i)))
    return parts


cdef bytes _part_sizes(const unsigned char *h):
    """The sizes of the parts of the frame whose (checked) head is at `h`, as a table of 64-bit
    little-endian sizes (8 bytes a part: the object message's own size table, copied)."""
    cdef bytes sizes
    if h[0] != KIND_OBJECT:
        sizes = PyBytes_FromStringAndSize(NULL, 8)
        lf_store_u64le(<unsigned char *>PyBytes_AS_STRING(sizes), lf_load_u64le(h + 8))
        return sizes
    return PyBytes_FromStringAndSize(<const char *>h + HEADER_SIZE,
                                     8 * (<Py_ssize_t>lf_load_u32le(h + 4) + 1))


cdef inline Py_ssize_t _capacity(object part):
    if part is None:
        return -1
    if type(part) is bytes:
        return PyBytes_GET_SIZE(part)
    return PyByteArray_GET_SIZE(part)


cdef object _grown(object part, Py_ssize_t size, Py_ssize_t filled, bint as_bytes):
    """`part` (None: not allocated yet) with room for `size` bytes, its first `filled` kept. A
    bytes part is replaced by a new one (its contents copied: a failed allocation leaves the old
    one whole, so a MemoryError loses nothing); a bytearray part grows in place."""
    if as_bytes:
        grown = PyBytes_FromStringAndSize(NULL, size)
        if filled:
            memcpy(PyBytes_AS_STRING(grown), PyBytes_AS_STRING(part), filled)
        return grown
    if part is None:
        return PyByteArray_FromStringAndSize(NULL, size)
    PyByteArray_Resize(part, size)
    return part


cdef int _copy_parts(list parts, const char *src) except -1:
    """Fill `parts` (from _object_parts) with the bytes that follow one another at `src`."""
    cdef Py_ssize_t size
    for part in parts:
        if type(part) is bytes:
            size = PyBytes_GET_SIZE(part)
            memcpy(PyBytes_AS_STRING(part), src, size)
        else:
            size = PyByteArray_GET_SIZE(part)
            memcpy(PyByteArray_AS_STRING(part), src, size)
        src += size
    return 0


cdef class _Batch:
    """What Channel.batch() returns."""
    cdef Channel channel
    cdef object timeout

    def __cinit__(self, Channel channel, timeout):
        self.channel = channel
        self.timeout = timeout

    def __enter__(self):
        _lock(self.channel._send_lock, -1, "send")
        self.channel._batch_depth += 1
        PyThread_release_lock(self.channel._send_lock)
        return self.channel

    def __exit__(self, *exc_info):
        self.channel._end_batch(self.timeout)


cdef int _check_serializer(object serializer) except -1:
    if serializer is not None and not (callable(getattr(serializer, "dumps", None))
                                       and callable(getattr(serializer, "loads", None))):
        raise TypeError("serializer must have dumps(obj) -> bytes-like and loads(data) -> obj, "
                        f"got {serializer!r}")
    return 0


cdef object _warn = warnings.warn
cdef object _is_finalizing = sys.is_finalizing
cdef object _dumps = ForkingPickler.dumps
cdef object _loads = ForkingPickler.loads


cdef inline int64_t _deadline(object timeout) except? -2:
    """Absolute monotonic deadline in ns for a timeout in seconds; -1 for no deadline."""
    cdef double seconds
    if timeout is None:
        return -1
    seconds = timeout
    if seconds != seconds:
        raise ValueError("timeout must be a number, not NaN")
    if seconds <= 0:
        return lf_monotonic_ns()
    if seconds > 1e9:
        return -1
    return lf_monotonic_ns() + <int64_t>(seconds * 1e9)


cdef int _raise_os_error(int err) except -1:
    """The one place where an OS error code becomes a Python exception (an OSError subclass:
    ConnectionResetError, BrokenPipeError, ...)."""
    lf_set_os_error(err)
    return -1


cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX


cdef extern from "pythread.h":
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                             int intr_flag) nogil


cdef inline int _lock(PyThread_type_lock lock, int64_t deadline, str what) except -1:
    """Take a channel lock (another thread's send or receive holds it while it runs); wait for
    it with the GIL released, interruptible by Ctrl-C, and no longer than the call's deadline."""
    cdef PyLockStatus status
    cdef long long microseconds
    cdef int64_t remaining
    if PyThread_acquire_lock(lock, NOWAIT_LOCK):
        return 0
    while True:
        if deadline < 0:
            microseconds = -1
        else:
            remaining = deadline - lf_monotonic_ns()
            if remaining <= 0:
                raise TimeoutError(f"timed out waiting for another thread's {what} on this "
                                   "channel to finish")
            microseconds = (remaining + 999) // 1000
        with nogil:
            status = PyThread_acquire_lock_timed(lock, microseconds, 1)
        if status == PY_LOCK_ACQUIRED:
            return 0
        if status == PY_LOCK_INTR:
            PyErr_CheckSignals()


# Every open channel of this process, for the fork handler below.
cdef object _channels = weakref.WeakSet()


def _before_fork():
    """Move every channel's ledger into memory shared with the child (see _begin_receive), so
    that both processes can tell whether the other received from the socket since they last
    did, and either can discard what the other delivered. Where the mapping fails, the channel
    settles its ledger now and forgets what it saw at every receive."""
    cdef Channel channel
    for channel in list(_channels):
        if channel._ledger == channel._own_ledger and channel._fd != LF_INVALID_SOCKET:
            shared = lf_shared_ledger_new()
            if shared == NULL:
                channel._flush_discards()
                channel._shared = True
            else:
                shared[0] = channel._own_ledger[0]
                shared[1] = channel._own_ledger[1]
                channel._ledger = shared


def _after_fork_in_child():
    """Only the forking thread survives fork(): in the child no thread is blocked on any channel.
    Forget the parent's blocked threads, or the child's close() would shut down the socket it
    shares with the parent (see close()) instead of closing its own descriptor."""
    cdef Channel channel
    for channel in list(_channels):
        channel._blocked = 0
        if channel._deferred_close_fd != LF_INVALID_SOCKET:
            lf_close(channel._deferred_close_fd)
            channel._deferred_close_fd = LF_INVALID_SOCKET


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


cdef class Channel:
    """One end of a framed, bidirectional loopback connection.

    ``Channel(fd, readable=True, writable=True, *, max_message_size=...)`` takes ownership of a
    connected TCP socket's file descriptor whose handshake is done; applications get channels from
    ``Pipe()``, ``Client()`` or ``Listener.accept()``.
    """

    def __cinit__(self):
        self._fd = LF_INVALID_SOCKET
        self._spin_ns = -1
        self._deferred_close_fd = LF_INVALID_SOCKET
        self._blocked = 0
        self._rbuf = NULL
        self._sbuf = NULL
        self._batch_buf = NULL
        self._send_lock = NULL
        self._recv_lock = NULL
        self._ledger = self._own_ledger
        self._warn_unclosed = True
        self._peer_uid = None
        self._trusted = False

    def __init__(self, fd, bint readable=True, bint writable=True, *,
                 max_message_size=DEFAULT_MAX_MESSAGE_SIZE, serializer=None, spin=None):
        if not readable and not writable:
            raise ValueError("at least one of `readable` and `writable` must be True")
        self.spin = spin
        _check_serializer(serializer)
        self._serializer = serializer
        if max_message_size is None:
            self._max_message_size = UINT64_MAX
        else:
            if max_message_size < 0:
                raise ValueError("max_message_size must be >= 0 or None")
            self._max_message_size = operator.index(max_message_size)  # no silent float truncation
        self._max_message_size_obj = max_message_size
        fd = operator.index(fd)
        if fd > _FD_MAX:  # checked here: the C conversion's message varies with the versions
            raise OverflowError("file descriptor too large")
        cdef lf_socket_t c_fd = fd
        if c_fd == LF_INVALID_SOCKET or fd < 0:
            raise ValueError("invalid file descriptor")
        self._rbuf = <char *>PyMem_Malloc(RECV_BUFFER_SIZE)
        self._sbuf = <char *>PyMem_Malloc(SMALL_SEND_SIZE + HEADER_SIZE)
        self._send_lock = PyThread_allocate_lock()
        self._recv_lock = PyThread_allocate_lock()
        if (self._rbuf == NULL or self._sbuf == NULL
                or self._send_lock == NULL or self._recv_lock == NULL):
            raise MemoryError()
        self._rcap = RECV_BUFFER_SIZE
        self._rstart = self._rend = 0
        self._head_have = 0
        self._queue_empty = True
        self._peek_saw_all = True
        self._last_recv_was_empty = True
        self._shared = False
        self._look_small = False
        self._own_ledger[0] = self._own_ledger[1] = 0
        self._ledger = self._own_ledger
        self._consumed_seen = 0
        self._sent_since_recv = False
        self._streaming = False
        self._spin_peeked = False
        self._deferred_handshake = None
        self._pending = None
        self._pending_sizes = None
        self._send_rest = None
        # TCP_NODELAY: a message is sent when send_bytes() returns, never held back by Nagle.
        # It fails harmlessly on a socket that is not TCP (a socketpair() in tests), but a
        # descriptor that is no socket at all is refused here rather than at the first receive.
        if lf_set_nodelay(c_fd) < 0 and lf_error_not_socket(lf_last_error()):
            _raise_os_error(lf_last_error())
        if lf_set_nonblocking(c_fd) < 0:
            _raise_os_error(lf_last_error())
        # Socket buffer sizes (SO_SNDBUF/SO_RCVBUF) are left to the kernel: fixing them turns off
        # Linux's autotuning, and every fixed size measured worse or no better. Medians of 5
        # interleaved runs on the 2-core dev machine, GB/s for a 1 MiB / 16 MiB stream:
        # kernel default 8.4 / 4.2; 256 KiB 3.5 / 3.3; 1 MiB 7.1 / 4.7; 4 MiB 7.7 / 3.6.
        self._fd = c_fd
        self._readable = readable
        self._writable = writable
        _channels.add(self)

    def __del__(self):
        if self._fd != LF_INVALID_SOCKET:
            # Not while the interpreter shuts down: warnings can no longer be shown then (a
            # spawned child that exits with a channel open would print a stray error). Not for a
            # pipe of multiprocessing's queues and pools either: their code leaves many open for
            # the collector, as multiprocessing's own connections allow.
            if self._warn_unclosed and not _is_finalizing():
                _warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()

    def __dealloc__(self):
        if self._fd != LF_INVALID_SOCKET:
            lf_close(self._fd)
            self._fd = LF_INVALID_SOCKET
        if self._deferred_close_fd != LF_INVALID_SOCKET:
            lf_close(self._deferred_close_fd)
        if self._ledger != self._own_ledger:
            lf_shared_ledger_free(self._ledger)
        PyMem_Free(self._rbuf)
        PyMem_Free(self._sbuf)
        PyMem_Free(self._batch_buf)
        if self._send_lock != NULL:
            PyThread_free_lock(self._send_lock)
        if self._recv_lock != NULL:
            PyThread_free_lock(self._recv_lock)

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
        """Busy-polling budget in microseconds before a wait sleeps (0: never spin), or None to
        follow the process-wide default (loopfast.set_default_spin)."""
        return None if self._spin_ns < 0 else self._spin_ns / 1000.0

    @spin.setter
    def spin(self, microseconds):
        if microseconds is None:
            self._spin_ns = -1
            return
        if not microseconds >= 0:  # also refuses NaN
            raise ValueError("spin must be a number of microseconds >= 0, or None")
        self._spin_ns = <int64_t>(min(microseconds, 1e9) * 1000)

    @property
    def serializer(self):
        """The object whose dumps()/loads() send() and recv() use; None: pickle protocol 5 with
        out-of-band buffers."""
        return self._serializer

    # ---- properties and small methods -----------------------------------------------------------

    @property
    def closed(self):
        """True once the channel is closed."""
        return self._fd == LF_INVALID_SOCKET

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
        if self._fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        return self._fd

    def close(self):
        """Close the channel. Messages not yet received stay in the socket for any other process
        that shares it; with no other copy of the socket, they are discarded.

        A thread blocked in a receive or send on this channel wakes up and raises OSError.
        """
        cdef lf_socket_t fd = self._fd
        if fd != LF_INVALID_SOCKET:
            self._fd = LF_INVALID_SOCKET
            self._pending = self._pending_sizes = None
            self._send_rest = None
            self._deferred_handshake = None
            self._rstart = self._rend = self._head_have = 0
            if self._blocked:
                # Another thread is in poll()/recv()/send() on fd with the GIL released. Closing
                # fd would not wake it (and the number could be reused under it): shut the
                # socket down, which wakes it, and let the last such thread close fd.
                lf_shutdown_both(fd)
                self._deferred_close_fd = fd
            else:
                lf_close(fd)

    cdef int _unblocked(self) except -1:
        """Call (with the GIL) after a GIL-released call on the socket: raises OSError if the
        channel was closed meanwhile, closing the socket if this was the last blocked thread."""
        self._blocked -= 1
        if self._fd == LF_INVALID_SOCKET:
            if self._blocked == 0 and self._deferred_close_fd != LF_INVALID_SOCKET:
                lf_close(self._deferred_close_fd)
                self._deferred_close_fd = LF_INVALID_SOCKET
            raise OSError("handle is closed (by another thread, while this one waited)")
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self._fd == LF_INVALID_SOCKET else f"fd={self._fd}"
        mode = ("r" if self._readable else "") + ("w" if self._writable else "")
        return f"<loopfast.Channel {state} mode={mode!r}>"

    cdef int _check_readable(self) except -1:
        if self._fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        if not self._readable:
            raise OSError("connection is write-only")
        return 0

    cdef int _check_writable(self) except -1:
        if self._fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        if not self._writable:
            raise OSError("connection is read-only")
        return 0

    cdef int _protocol_error(self, str message) except -1:
        """The stream can no longer be trusted: close, then raise ProtocolError."""
        self.close()
        raise ProtocolError(message)

    # ---- waiting ------------------------------------------------------------------------------

    cdef int _wait(self, short events, int64_t deadline, Py_ssize_t peek_size=0) except -1:
        """Wait with the GIL released until the socket is ready for `events`.
        Returns 0 when ready, 1 when the deadline passed (would-block is a value, not an error).
        With `peek_size` (a wait for data), a busy-poll that sees data leaves up to that many
        bytes of it in the window and sets _spin_peeked."""
        cdef int64_t remaining, started
        cdef int timeout_ms, rc, err
        cdef short revents = 0
        cdef char *peek_buf = NULL
        cdef Py_ssize_t peeked = -1
        cdef lf_socket_t fd = self._fd
        cdef int64_t spin_ns = self._spin_ns if self._spin_ns >= 0 else _default_spin_ns
        if fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        # Spin only where a reply is awaited (this channel sent since its last receive), or for
        # room to send: a receiver of a stream that spins takes each message alone as it
        # arrives, which costs the stream more than a sleeping receiver's wake-ups.
        if spin_ns > 0 and deadline != 0 and (events != LF_POLLIN or self._sent_since_recv):
            if self._spin_skip > 0:
                self._spin_skip -= 1
            else:
                # Bounded busy-polling: a sleeping receiver costs ~25 us of kernel wake-up per hop
                # on loopback, so check readiness (never read: poll() must not consume) in a
                # tight loop with the GIL released, up to the spin budget; then sleep in poll().
                if peek_size > 0:
                    self._flush_discards()  # a look must start at the first byte not delivered
                    self._rstart = self._rend = 0
                    peek_buf = self._rbuf
                    peek_size = min(peek_size, self._rcap)
                self._blocked += 1
                with nogil:
                    started = lf_monotonic_ns()
                    rc = _spin_until_ready(fd, events, spin_ns, deadline, peek_buf,
                                           <size_t>peek_size, &peeked)
                    self._spun_ns += lf_monotonic_ns() - started
                self._unblocked()
                if peeked >= 0:
                    self._rstart = 0
                    self._rend = peeked
                    self._peek_saw_all = peeked < peek_size
                    self._spin_peeked = True
                if rc > 0 and rc != SPIN_READY_SHARED:
                    self._spin_backoff = 0
                    return 0
                if rc == SPIN_READY_SHARED or rc == SPIN_CONTENDED:
                    # The peer shares this CPU: sleep instead for the next waits (8, 16, ... up
                    # to 1024 of them), then try spinning again in case it moved.
                    self._spin_backoff = min(max(8, 2 * self._spin_backoff), 1024)
                    self._spin_skip = self._spin_backoff
                    if rc == SPIN_READY_SHARED:
                        return 0
                # A signal that arrived while spinning interrupted no syscall: run its handler
                # now (Ctrl-C raises here), or the blocking wait below would sleep through it.
                PyErr_CheckSignals()
        while True:
            fd = self._fd
            if fd == LF_INVALID_SOCKET:
                raise OSError("handle is closed")
            if deadline < 0:
                timeout_ms = -1
            else:
                remaining = deadline - lf_monotonic_ns()
                if remaining <= 0:
                    timeout_ms = 0
                else:  # round up: never return before the deadline
                    timeout_ms = <int>min((remaining + 999999) // 1000000, 0x7fffffff)
            self._blocked += 1
            with nogil:
                rc = lf_poll(fd, events, timeout_ms, &revents)
                err = lf_last_error()
            self._unblocked()
            if rc > 0:
                return 0
            if rc == 0:
                if timeout_ms == 0 or lf_monotonic_ns() >= deadline:
                    return 1
                continue
            if lf_error_interrupted(err):
                PyErr_CheckSignals()  # Ctrl-C raises KeyboardInterrupt here; otherwise retry
                continue
            _raise_os_error(err)

    # ---- receiving ----------------------------------------------------------------------------
    #
    # The kernel holds every message not yet delivered. A receive consumes from the socket only
    # the bytes of what it returns, so that an end shared by several processes (under their own
    # lock) and watched by any selector behaves as a multiprocessing connection does. What the
    # channel knows of the queue it learns with a peek into the window _rbuf[_rstart:_rend]; a
    # frame's bytes are consumed (_discard) only once its payload has its final home.

    cdef int _begin_receive(self, int64_t deadline) except -1:
        """Start of every receive call (the receive lock is held): finish a deferred handshake,
        and forget the window if another process may have consumed from the socket since."""
        if self._deferred_handshake is not None:
            self._finish_handshake(deadline)
        # Another process receiving from this socket makes a big look wasted work: while it
        # does, look at little (a header and a small payload) at a time.
        self._look_small = not self._window_valid()
        if self._look_small:
            self._rstart = self._rend = 0
            self._flush_discards()  # what another process delivered (see _deliver)
            self._consumed_seen = lf_counter_load(self._ledger)
        return 0

    cdef bint _window_valid(self) noexcept:
        """Whether what the window shows can still be trusted: no other process received from
        the socket since this channel last did."""
        return not self._shared and lf_counter_load(self._ledger) == self._consumed_seen

    cdef int _count_consumed(self, Py_ssize_t n) except -1:
        """Record `n` bytes received straight from the socket (a payload, a head, handshake
        bytes) in the ledger."""
        self._consumed_seen = lf_counter_add(self._ledger, <uint64_t>n)
        return 0

    cdef int _deliver(self, Py_ssize_t n) except -1:
        """The next `n` bytes of the window are delivered (their messages returned). They are
        discarded from the socket later, in one syscall for many messages (_flush_discards):
        before the next look at the socket or read from it, and at the end of the call that
        delivered the last message known to be queued, so that between calls the socket holds
        delivered bytes only while it also holds a whole message not yet delivered (its
        readiness stays the truth), and the ledger says how many, for a process that shares
        the socket to discard them first."""
        self._consumed_seen = lf_counter_add(self._ledger, <uint64_t>n)
        lf_counter_add(self._ledger + 1, <uint64_t>n)
        self._rstart += n
        return 0

    cdef int _flush_discards(self) except -1:
        """Discard from the socket the bytes delivered and not yet discarded (_deliver)."""
        cdef uint64_t undiscarded = lf_counter_load(self._ledger + 1)
        cdef Py_ssize_t n, chunk
        if undiscarded == 0 or self._fd == LF_INVALID_SOCKET:
            return 0
        n = <Py_ssize_t>undiscarded
        lf_counter_add(self._ledger + 1, <uint64_t>0 - undiscarded)
        # Where a copy is received where the discarding receive copies (not Linux), it must not
        # overwrite the window: the delivered bytes precede it, or the window is empty.
        if n <= self._rstart:
            return self._discard(self._rbuf + self._rstart - n, n)
        self._rstart = self._rend = 0
        while n > 0:
            chunk = min(n, self._rcap)
            self._discard(self._rbuf, chunk)
            n -= chunk
        return 0

    cdef int _settle(self) except -1:
        """End of a receive call: discard the delivered bytes unless a whole message not yet
        delivered is known to follow them (then the socket is readable anyway, and the next
        receive discards them with its own)."""
        cdef Py_ssize_t avail = self._rend - self._rstart
        cdef const unsigned char *h = <const unsigned char *>(self._rbuf + self._rstart)
        if lf_counter_load(self._ledger + 1) == 0:
            return 0
        if self._shared:  # a process we cannot see may receive next: it must find none
            return self._flush_discards()
        if avail >= HEADER_SIZE and self._header_error(h) is None \
                and <Py_ssize_t>lf_load_u64le(h + 8) <= avail - HEADER_SIZE:
            return 0
        return self._flush_discards()

    cdef int _finish_handshake(self, int64_t deadline) except -1:
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
                return 0
            if deadline == 0 or self._wait(LF_POLLIN, deadline):
                raise TimeoutError("timed out waiting for a message")

    cdef int _check_handshake_now(self) except -1:
        """Before a send: finish a deferred handshake if the peer's hello has arrived, without
        waiting for it (a Client may send before the listener accepts, as multiprocessing's)."""
        if not PyThread_acquire_lock(self._recv_lock, NOWAIT_LOCK):
            return 0  # a receive is under way: it finishes the handshake
        try:
            if self._deferred_handshake is not None:
                self._finish_handshake(0)
        except TimeoutError:
            pass  # the hello has not arrived yet
        finally:
            PyThread_release_lock(self._recv_lock)
        return 0

    cdef Py_ssize_t _peek(self, Py_ssize_t size) except -2:
        """Copy up to `size` queued bytes to the start of the window, consuming nothing. Returns
        how many (> 0), 0 at the end of the stream, -1 when nothing is queued."""
        cdef Py_ssize_t n
        cdef int err
        if self._fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        self._flush_discards()  # a look must start at the first byte not delivered
        if size > self._rcap:
            size = self._rcap
        while True:
            n = lf_peek(self._fd, self._rbuf, <size_t>size)
            if n >= 0:
                self._rstart = 0
                self._rend = n
                self._peek_saw_all = n < size
                return n
            err = lf_last_error()
            self._rstart = self._rend = 0
            if lf_error_would_block(err):
                self._queue_empty = True
                return -1
            if lf_error_interrupted(err):
                PyErr_CheckSignals()
                continue
            _raise_os_error(err)

    cdef int _know(self, Py_ssize_t need, int64_t deadline) except -1:
        """Make the first `need` queued bytes known (in the window), waiting for the first byte.
        Returns 0 when they are, 1 when fewer are queued (the rest of a frame is still on its
        way). EOFError when the peer closed the connection with nothing queued."""
        cdef Py_ssize_t n, size
        cdef bint slept = False
        if self._rend - self._rstart >= need:
            return 0
        size = max(need, PEEK_SIZE_SHARED if self._look_small else PEEK_SIZE)
        if self._rend == self._rstart and self._queue_empty:
            # The last look found the queue empty: wait first, saving a peek that would fail.
            slept = self._await_data(deadline, size)
        while True:
            if self._spin_peeked:  # the busy-poll of the wait looked already
                self._spin_peeked = False
                n = self._rend - self._rstart
            else:
                n = self._peek(size)
            if n > 0:
                self._queue_empty = False
                self._streaming = not slept
                return 0 if n >= need else 1
            if n == 0:
                raise EOFError("the peer closed the connection")
            slept = self._await_data(deadline, size)

    cdef bint _await_data(self, int64_t deadline, Py_ssize_t peek_size) except -1:
        """Wait for data to receive; TimeoutError at the deadline. Returns True if the wait slept
        until the data came, False after a nap.

        A receiver in the middle of a stream (its last message was already queued when it
        looked) that drains the queue naps (_nap_ns) first, off the socket's wait queue, instead of
        sleeping in poll() at once: the sender's next send() then has no receiver to wake (a
        wake-up per send, ~25 us each on this loopback, is what slowed a 64 B stream to ~200k
        msg/s), and the messages of the nap are taken one after another. Measured, 64 B stream,
        send_bytes/recv_bytes, pinned to two CPUs: poll() at once 190-250k msg/s, busy-polling
        (which drains every message alone, the kernel acknowledging each) 195-205k, a nap
        440-850k. A receiver whose message was not queued (request/response, a sporadic
        message) never naps, and one that awaits a reply busy-polls instead (see _wait)."""
        if self._streaming and not self._sent_since_recv and deadline != 0 and _nap_ns > 0:
            self._streaming = False
            with nogil:
                lf_nap(_nap_ns)
            return False
        self._spin_peeked = False
        if self._wait(LF_POLLIN, deadline, peek_size):
            self._spin_peeked = False
            raise TimeoutError("timed out waiting for a message")
        return True

    cdef int _discard(self, char *at, Py_ssize_t n) except -1:
        """Consume `n` bytes known (peeked) to be queued, whose copy is at `at`."""
        cdef Py_ssize_t got
        cdef int err
        while n > 0:
            got = lf_discard(self._fd, at, <size_t>n)
            if got > 0:
                n -= got
                at += got
                continue
            err = lf_last_error()
            if got < 0 and lf_error_interrupted(err):
                continue  # nothing was consumed; the bytes are still queued
            if got < 0 and lf_error_would_block(err):
                self._protocol_error("bytes this channel had seen queued were taken by someone "
                                     "else (another process receiving without a lock?)")
            self._protocol_error("connection lost in the middle of a message"
                                 + ("" if got == 0 else f" ({_os_error_text(err)})"))
        return 0

    cdef int _after_consume(self) except -1:
        """After consuming from the window: the queue is empty if the last peek saw all of it."""
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
            self._queue_empty = self._peek_saw_all
        return 0

    cdef Py_ssize_t _recv_some(self, char *dst, Py_ssize_t size, int64_t deadline) except -1:
        """Receive between 1 and `size` bytes of a frame straight into `dst` (their final home).
        The connection ending here is always in the middle of a message."""
        cdef lf_iovec iov
        iov.base = dst
        iov.len = size
        return self._recv_some_v(&iov, 1, size, deadline)

    cdef Py_ssize_t _recv_some_v(self, lf_iovec *iov, int count, Py_ssize_t total,
                                 int64_t deadline) except -1:
        """Receive between 1 and `total` bytes into the buffers of `iov` (one scatter read)."""
        cdef Py_ssize_t n
        cdef int err
        cdef lf_socket_t fd
        self._flush_discards()
        while True:
            fd = self._fd
            if fd == LF_INVALID_SOCKET:
                raise OSError("handle is closed")
            if self._last_recv_was_empty:
                # The last read came back short: the socket is drained, wait before reading.
                if self._wait(LF_POLLIN, deadline):
                    raise TimeoutError("timed out in the middle of a message; "
                                       "the next receive resumes it")
            self._blocked += 1
            with nogil:
                if count == 1:
                    n = lf_recv(fd, <char *>iov[0].base, iov[0].len)
                else:
                    n = lf_recvv(fd, iov, count)
                err = lf_last_error()
            self._unblocked()
            if n > 0:
                self._count_consumed(n)
                self._last_recv_was_empty = n < total
                return n
            if n == 0:
                self._protocol_error("the peer closed the connection in the middle of a message")
            if lf_error_would_block(err):
                self._last_recv_was_empty = True
            elif lf_error_interrupted(err):
                PyErr_CheckSignals()
            else:
                self._protocol_error(
                    f"connection lost in the middle of a message ({_os_error_text(err)})")

    cdef str _header_error(self, const unsigned char *h):
        """What is wrong with the frame header at `h` (HEADER_SIZE bytes), or None."""
        cdef uint64_t n = lf_load_u64le(h + 8)
        cdef uint32_t count = lf_load_u32le(h + 4)
        if h[0] < KIND_BYTES or h[0] > KIND_OBJECT or h[1] != 0 or h[2] != 0 or h[3] != 0 \
                or (count != 0) != (h[0] == KIND_OBJECT):
            return ("malformed frame header " + (<bytes>h[:HEADER_SIZE]).hex()
                    + " (is the peer a loopfast channel of the same protocol version?)")
        if h[0] == KIND_OBJECT and (count > MAX_OOB_BUFFERS or n < 8 * (<uint64_t>count + 1)):
            return (f"malformed object frame: {count} out-of-band buffers "
                    f"(at most {MAX_OOB_BUFFERS}) in {n} bytes")
        if n > self._max_message_size:
            return (f"the peer announced a {n}-byte message, over this channel's "
                    f"max_message_size of {self._max_message_size_obj} bytes")
        if n > <uint64_t>PY_SSIZE_T_MAX:
            return f"the peer announced a {n}-byte message, too large for this machine"
        return None

    cdef int _check_table(self, const unsigned char *h) except -1:
        """An object frame's size table (after the header at `h`) must add up to its length."""
        cdef uint32_t count = lf_load_u32le(h + 4), i
        cdef uint64_t length = lf_load_u64le(h + 8), size, total = 8 * (<uint64_t>count + 1)
        for i in range(count + 1):
            size = lf_load_u64le(h + HEADER_SIZE + 8 * i)
            if size > length or total + size > length:  # no overflow
                total = length + 1
                break
            total += size
        if total != length:
            self._protocol_error(f"malformed object frame: the sizes of its {count + 1} parts "
                                 f"do not add up to its length of {length} bytes")
        return 0

    cdef int _next_head(self, int64_t deadline, bint objects) except -1:
        """Wait for the next frame's head (its header and, for an object message, its size table),
        check it (a bad one closes the channel: ProtocolError, before anything is allocated; an
        object message when not `objects`: OSError from the header alone, the message left in place)
        and return 0 when it is in the window at _rstart, not consumed (the usual case), or 1 when
        it was consumed into _rbuf[0:_head_have] because it arrived in pieces
        (a consumed head stays there until its payload has been allocated)."""
        cdef const unsigned char *h
        cdef Py_ssize_t head_size
        cdef str error
        while True:
            if self._head_have > 0:
                self._read_head(HEADER_SIZE, deadline)
                h = <const unsigned char *>self._rbuf
                error = self._header_error(h)
                if error is not None:
                    self._protocol_error(error)
                if h[0] == KIND_OBJECT and not objects:
                    self._refuse_object()
                self._read_head(_head_size(h), deadline)
                if h[0] == KIND_OBJECT:
                    self._check_table(h)
                return 1
            if self._know(HEADER_SIZE, deadline) == 0:
                h = <const unsigned char *>(self._rbuf + self._rstart)
                error = self._header_error(h)
                if error is not None:
                    self._protocol_error(error)
                if h[0] == KIND_OBJECT and not objects:
                    self._refuse_object()
                head_size = _head_size(h)
                if self._know(head_size, deadline) == 0:
                    h = <const unsigned char *>(self._rbuf + self._rstart)  # a peek moves it
                    if h[0] == KIND_OBJECT:
                        self._check_table(h)
                    return 0
            # Only part of the head is queued: take it, and read the rest as it arrives.
            head_size = self._rend - self._rstart
            self._flush_discards()
            memmove(self._rbuf, self._rbuf + self._rstart, head_size)
            self._rstart = self._rend = 0
            self._discard(self._rbuf, head_size)
            self._count_consumed(head_size)
            self._head_have = head_size
            self._last_recv_was_empty = True

    cdef int _read_head(self, Py_ssize_t size, int64_t deadline) except -1:
        """Head mode: receive the head in _rbuf up to `size` bytes."""
        while self._head_have < size:
            self._head_have += self._recv_some(self._rbuf + self._head_have,
                                               size - self._head_have, deadline)
        return 0

    cdef object _take_frame(self, int64_t deadline, bint consumed):
        """Receive the frame whose head _next_head() returned: its payload as bytes (kinds 1 and
        2) or the list [pickle, buffer, ...] (an object message). A frame that is all in the
        window is copied out and then consumed; a longer one is read straight from the socket
        into its parts (self._pending while it is incomplete). From a trusted peer each
        part is allocated once at its final size *before* anything more is consumed, so that a
        MemoryError leaves the message where it was (in the socket, or its head in head mode);
        from any other, the parts are allocated as the bytes arrive (_reserve), and a
        MemoryError leaves the message pending, resumed by the next receive."""
        cdef const unsigned char *h = <const unsigned char *>(
            self._rbuf if consumed else self._rbuf + self._rstart)
        cdef Py_ssize_t length = <Py_ssize_t>lf_load_u64le(h + 8)
        cdef int kind = h[0]
        cdef object out
        if not consumed and HEADER_SIZE + length <= self._rend - self._rstart:
            if kind == KIND_OBJECT:
                out = _object_parts(h)
                _copy_parts(out, <const char *>h + _head_size(h))
            else:
                out = PyBytes_FromStringAndSize(<const char *>h + HEADER_SIZE, length)
            self._deliver(HEADER_SIZE + length)
            self._after_consume()
            return out
        sizes = None
        if not self._trusted:
            sizes = _part_sizes(h)
            parts = [None] * (len(sizes) // 8)
        elif kind == KIND_OBJECT:
            parts = _object_parts(h)
        else:
            parts = [PyBytes_FromStringAndSize(NULL, length)]
        self._consume_head(consumed)
        self._start_pending(parts, kind, sizes)
        parts = self._finish_pending(deadline)
        return parts if kind == KIND_OBJECT else parts[0]

    cdef int _consume_head(self, bint consumed) except -1:
        """The payload has a home: consume the head (if still queued) and forget the window,
        which the payload's direct reads make stale."""
        cdef Py_ssize_t head_size
        if consumed:
            self._head_have = 0
        else:
            self._flush_discards()
            head_size = _head_size(<const unsigned char *>(self._rbuf + self._rstart))
            self._discard(self._rbuf + self._rstart, head_size)
            self._count_consumed(head_size)
        self._rstart = self._rend = 0
        self._last_recv_was_empty = False  # the payload is probably queued already
        return 0

    cdef int _start_pending(self, list parts, int kind, object sizes) except -1:
        """Make `parts` the message being received: allocated at their final sizes (`sizes`
        None), or allocated by _reserve as the bytes arrive (None until then; `sizes` the table
        of their final sizes, _part_sizes)."""
        self._pending = parts
        self._pending_sizes = sizes
        self._pending_part = 0
        self._pending_filled = 0
        self._pending_received = 0
        self._pending_kind = kind
        return 0

    cdef Py_ssize_t _pending_size(self, Py_ssize_t i):
        """The final size of part `i` of the message being received."""
        if self._pending_sizes is not None:
            return <Py_ssize_t>lf_load_u64le(
                <const unsigned char *>PyBytes_AS_STRING(self._pending_sizes) + 8 * i)
        return _capacity(self._pending[i])

    cdef int _reserve(self) except -1:
        """Allocate (or grow) the parts of the message being received, from the one being filled
        on, so that at most max(RESERVE_FLOOR, bytes received so far) is allocated ahead of the
        bytes received: memory stays proportional to what the peer has sent, whatever its
        header announced. Each growth at least doubles a part, so the copies of growing bytes
        parts add up to less than the message."""
        cdef list parts = self._pending
        cdef Py_ssize_t budget = max(<Py_ssize_t>RESERVE_FLOOR, self._pending_received)
        cdef Py_ssize_t ahead = 0, i = self._pending_part, final, filled, cap, want
        while i < len(parts) and ahead < budget:
            final = self._pending_size(i)
            filled = self._pending_filled if i == self._pending_part else 0
            cap = _capacity(parts[i])
            if cap < final and filled == max(cap, 0):  # not allocated yet, or full
                want = min(final, filled + budget - ahead)
                parts[i] = _grown(parts[i], want, filled, i == 0)
                cap = want
            ahead += cap - filled
            if cap < final:
                break
            i += 1
        return 0

    cdef object _finish_pending(self, int64_t deadline):
        """Fill the parts of the message being received (self._pending, bytes / bytearray objects
        allocated at their final sizes) straight from the socket, many parts per scatter read,
        and return the list. An exception (timeout, Ctrl-C) leaves the progress recorded, so the
        next receive resumes the message."""
        cdef list parts = self._pending
        cdef bint growing = self._pending_sizes is not None
        cdef lf_iovec iov[PENDING_IOV]
        cdef int niov
        cdef Py_ssize_t i, total, n, size
        cdef object part
        cdef char *p
        while True:
            if growing:
                self._reserve()
            niov = 0
            total = 0
            i = self._pending_part
            while i < len(parts) and niov < PENDING_IOV:
                part = parts[i]
                if part is None:
                    break  # not allocated yet: _reserve allocates it once more has arrived
                if type(part) is bytes:
                    p = PyBytes_AS_STRING(part)
                    size = PyBytes_GET_SIZE(part)
                else:
                    p = PyByteArray_AS_STRING(part)
                    size = PyByteArray_GET_SIZE(part)
                if i == self._pending_part:
                    p += self._pending_filled
                    size -= self._pending_filled
                if size > 0:
                    iov[niov].base = p
                    iov[niov].len = size
                    total += size
                    niov += 1
                elif niov == 0:
                    self._pending_part += 1  # an empty part, or one just filled
                    self._pending_filled = 0
                i += 1
                if growing and _capacity(part) < self._pending_size(i - 1):
                    break  # the parts after it come after its missing bytes
            if niov == 0:
                break
            n = self._recv_some_v(iov, niov, total, deadline)
            self._pending_received += n
            # Record the progress: whole parts filled, then bytes of the next one.
            while n > 0:
                size = self._pending_size(self._pending_part) - self._pending_filled
                if n >= size:
                    n -= size
                    self._pending_part += 1
                    self._pending_filled = 0
                else:
                    self._pending_filled += n
                    n = 0
        self._pending = self._pending_sizes = None
        return parts

    cdef int _refuse_object(self) except -1:
        raise OSError("the next message was sent with send() and carries out-of-band buffers: "
                      "receive it with recv()")

    cdef _bad_message_length(self):
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
        cdef Py_ssize_t c_maxlength = -1
        self._check_readable()
        if maxlength is not None:
            if maxlength < 0:
                raise ValueError("negative maxlength")
            c_maxlength = maxlength
        cdef int64_t deadline = _deadline(timeout)
        _lock(self._recv_lock, deadline, "receive")
        try:
            self._begin_receive(deadline)
            out = self._recv_bytes_frame(deadline, c_maxlength)
            self._sent_since_recv = False
            return out
        finally:
            try:
                self._settle()
            finally:
                PyThread_release_lock(self._recv_lock)

    cdef object _recv_bytes_frame(self, int64_t deadline, Py_ssize_t maxlength):
        """The next message's payload as bytes (the receive lock is held). An object message is
        refused, and left in place: its out-of-band buffers have no place in a bytes result."""
        cdef bint consumed
        cdef const unsigned char *h
        if self._pending is not None:
            if self._pending_kind == KIND_OBJECT:
                self._refuse_object()
            if maxlength >= 0 and self._pending_size(0) > maxlength:
                self._bad_message_length()
            return self._finish_pending(deadline)[0]
        consumed = self._next_head(deadline, False)
        h = <const unsigned char *>(self._rbuf if consumed else self._rbuf + self._rstart)
        if maxlength >= 0 and <Py_ssize_t>lf_load_u64le(h + 8) > maxlength:
            self._bad_message_length()
        return self._take_frame(deadline, consumed)

    def recv_bytes_many(self, max_messages=None, *, timeout=None):
        """Wait for the next message (up to `timeout`), then return it with every further whole
        message already queued, up to `max_messages`, as a list of bytes. Only whole messages
        are taken (the rest stay queued), with two syscalls for the lot: a look at what is queued
        and one receive of exactly those messages. At least one message is returned, or an
        exception raised; a MemoryError part-way returns the messages taken so far.
        """
        cdef Py_ssize_t limit = -1, length, taken, pos, took, looks = 0
        cdef const unsigned char *h
        cdef list out
        cdef bint short_of_memory = False
        self._check_readable()
        if max_messages is not None:
            if max_messages < 1:
                raise ValueError("max_messages must be >= 1 or None")
            limit = max_messages
        cdef int64_t deadline = _deadline(timeout)
        _lock(self._recv_lock, deadline, "receive")
        try:
            self._begin_receive(deadline)
            out = [self._recv_bytes_frame(deadline, -1)]
            self._sent_since_recv = False
            taken = 1
            while limit < 0 or taken < limit:
                # Every whole plain frame in the window, up to the limit.
                pos = self._rstart
                while (limit < 0 or taken < limit) and self._rend - pos >= HEADER_SIZE:
                    h = <const unsigned char *>(self._rbuf + pos)
                    if not _plain_frame_header(h, self._max_message_size):
                        break  # an object message or a bad header: the next call takes it
                    length = <Py_ssize_t>lf_load_u64le(h + 8)
                    if length > self._rend - pos - HEADER_SIZE:
                        break  # not all queued yet
                    try:
                        out.append(PyBytes_FromStringAndSize(<const char *>h + HEADER_SIZE,
                                                             length))
                    except MemoryError:
                        short_of_memory = True
                        break
                    pos += HEADER_SIZE + length
                    taken += 1
                took = pos - self._rstart
                if took > 0:
                    self._deliver(took)
                    self._after_consume()
                if short_of_memory or (limit >= 0 and taken >= limit) or looks >= MANY_LOOKS \
                        or (looks > 0 and took == 0):
                    break
                # One more nonblocking look at the queue; stop when it shows nothing new.
                looks += 1
                if self._peek(PEEK_SIZE) <= 0:
                    break
            return out
        finally:
            try:
                self._settle()
            finally:
                PyThread_release_lock(self._recv_lock)

    def recv(self, *, timeout=None):
        """Receive one object sent with send() (unpickled: only talk to peers you trust).

        A MemoryError leaves the message in the socket, for the next receive."""
        cdef bint consumed
        self._check_readable()
        cdef int64_t deadline = _deadline(timeout)
        _lock(self._recv_lock, deadline, "receive")
        try:
            self._begin_receive(deadline)
            if self._pending is not None:
                kind = self._pending_kind
                payload = self._finish_pending(deadline)
                if kind != KIND_OBJECT:
                    payload = payload[0]
            else:
                consumed = self._next_head(deadline, True)
                kind = (self._rbuf if consumed else self._rbuf + self._rstart)[0]
                payload = self._take_frame(deadline, consumed)
            self._sent_since_recv = False
        finally:
            try:
                self._settle()
            finally:
                PyThread_release_lock(self._recv_lock)
        if kind == KIND_OBJECT:
            return _loads(payload[0], buffers=payload[1:])
        if self._serializer is not None:
            return self._serializer.loads(payload)
        return _loads(payload)

    def recv_bytes_into(self, buf, Py_ssize_t offset=0, *, timeout=None):
        """Receive one message into the writable buffer `buf`, starting `offset` bytes in, and
        return its size in bytes. A large payload is read from the socket straight into `buf`.

        If the message does not fit, it is received whole and raises BufferTooShort with the
        message as args[0] (as multiprocessing does); the next receive gets the next message.
        An object message with out-of-band buffers raises OSError and is left for recv().
        A MemoryError leaves the message in the socket.
        """
        cdef Py_buffer view
        cdef Py_ssize_t space, length, filled
        cdef int kind
        cdef bint consumed
        cdef char *dst
        cdef const unsigned char *h
        cdef int64_t deadline
        self._check_readable()
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        try:
            if offset < 0:
                raise ValueError("negative offset")
            if offset > view.len:
                raise ValueError("offset too large")
            space = view.len - offset
            dst = <char *>view.buf + offset
            deadline = _deadline(timeout)
            _lock(self._recv_lock, deadline, "receive")
            try:
                self._begin_receive(deadline)
                if self._pending is not None:
                    payload = self._recv_bytes_frame(deadline, -1)
                    self._sent_since_recv = False
                    length = PyBytes_GET_SIZE(payload)
                    if length > space:
                        raise BufferTooShort(payload)
                    memcpy(dst, PyBytes_AS_STRING(payload), length)
                    return length
                consumed = self._next_head(deadline, False)
                h = <const unsigned char *>(self._rbuf if consumed else self._rbuf + self._rstart)
                kind = h[0]
                length = <Py_ssize_t>lf_load_u64le(h + 8)
                if length > space:
                    payload = self._take_frame(deadline, consumed)
                    self._sent_since_recv = False
                    raise BufferTooShort(payload)
                if not consumed and HEADER_SIZE + length <= self._rend - self._rstart:
                    memcpy(dst, self._rbuf + self._rstart + HEADER_SIZE, length)
                    self._deliver(HEADER_SIZE + length)
                    self._after_consume()
                    self._sent_since_recv = False
                    return length
                # Not all queued yet: straight from the socket into the caller's buffer.
                self._consume_head(consumed)
                filled = 0
                try:
                    while filled < length:
                        filled += self._recv_some(dst + filled, length - filled, deadline)
                except BaseException:
                    if self._fd != LF_INVALID_SOCKET:
                        # Interrupted (timeout, Ctrl-C): keep what arrived so that the next
                        # receive resumes this message. Only this rare path copies.
                        payload = PyBytes_FromStringAndSize(NULL, length)
                        memcpy(PyBytes_AS_STRING(payload), dst, filled)
                        self._start_pending([payload], kind, None)
                        self._pending_filled = self._pending_received = filled
                    raise
                self._sent_since_recv = False
                return length
            finally:
                try:
                    self._settle()
                finally:
                    PyThread_release_lock(self._recv_lock)
        finally:
            PyBuffer_Release(&view)

    def poll(self, timeout=0.0):
        """Return whether there is data to read, waiting up to `timeout` seconds (None: no limit).

        Never consumes a message: it looks at the socket as any selector would.
        """
        self._check_readable()
        cdef int64_t deadline = _deadline(timeout)
        if self._deferred_handshake is not None:
            _lock(self._recv_lock, deadline, "receive")
            try:
                if self._deferred_handshake is not None:
                    self._finish_handshake(deadline)
            except TimeoutError:
                return False
            finally:
                PyThread_release_lock(self._recv_lock)
        if self._pending is not None or self._head_have > 0 \
                or (self._rend > self._rstart and self._window_valid()):
            return True
        return self._wait(LF_POLLIN, deadline) == 0

    def _spin_time(self):
        """Seconds this channel has spent busy-polling, in all (for tests and diagnostics)."""
        return self._spun_ns / 1e9

    def _awaits_reply(self):
        """True if this channel sent since its last receive (its waits for data busy-poll)."""
        return self._sent_since_recv

    def _has_message(self):
        """True if a whole message (or a malformed header) is known to be queued (no syscall)."""
        cdef Py_ssize_t avail = self._rend - self._rstart
        cdef const unsigned char *h = <const unsigned char *>(self._rbuf + self._rstart)
        if self._fd == LF_INVALID_SOCKET or avail < HEADER_SIZE or self._pending is not None \
                or self._head_have > 0 or not self._window_valid():
            return False
        if self._header_error(h) is not None:
            return True  # ready: the receive will raise the ProtocolError
        return <Py_ssize_t>lf_load_u64le(h + 8) <= avail - HEADER_SIZE

    # ---- sending ------------------------------------------------------------------------------

    cdef int _send_all(self, lf_iovec *iov, int count, Py_ssize_t total,
                       int64_t deadline, Py_ssize_t *progress=NULL) except -1:
        """Write all `total` bytes described by `iov`. If the deadline passes (or a signal
        interrupts) after part of them went out, the rest is copied to _send_rest and goes out
        before the next frame, so the peer never sees half a frame followed by another.
        With `progress`, nothing is copied: *progress counts the bytes written, for the caller
        (_flush_rest) to record."""
        cdef Py_ssize_t n, sent = 0
        cdef int err = 0, i
        cdef bint full = False  # the last write was short: the socket buffer is full
        cdef lf_socket_t fd
        cdef char *p
        self._sent_since_recv = True
        while True:
            fd = self._fd
            if fd == LF_INVALID_SOCKET:
                raise OSError("handle is closed")
            if full:
                n = -1  # wait for room first rather than make a write that would fail
            elif total - sent > RELEASE_GIL_SIZE:
                self._blocked += 1
                with nogil:
                    n = _write(fd, iov, count)
                    err = lf_last_error()
                self._unblocked()
            else:
                n = _write(fd, iov, count)
                err = lf_last_error()
            if n >= 0:
                sent += n
                if progress != NULL:
                    progress[0] = sent
                if sent == total:
                    return 0
                while <size_t>n >= iov[0].len:  # drop what went out
                    n -= iov[0].len
                    iov += 1
                    count -= 1
                iov[0].base = <char *>iov[0].base + n
                iov[0].len -= n
                full = True
                continue
            try:
                if full or lf_error_would_block(err):
                    full = False
                    if self._wait(LF_POLLOUT, deadline):
                        raise TimeoutError("timed out sending a message" if sent == 0 else
                                           f"timed out after sending {sent} of {total} bytes of a "
                                           "message; the rest goes out before the next message")
                elif lf_error_interrupted(err):
                    PyErr_CheckSignals()
                else:
                    _raise_os_error(err)
            except BaseException:
                if sent > 0 and progress == NULL and self._fd != LF_INVALID_SOCKET:
                    rest = PyBytes_FromStringAndSize(NULL, total - sent)  # one copy
                    p = PyBytes_AS_STRING(rest)
                    for i in range(count):
                        memcpy(p, iov[i].base, iov[i].len)
                        p += iov[i].len
                    self._send_rest = rest
                    self._send_rest_sent = 0
                raise

    cdef int _flush_rest(self, int64_t deadline) except -1:
        """Write the rest of a frame whose send was interrupted. _send_rest is never copied
        again: _send_rest_sent records how much of it is out, and it is dropped once all is."""
        cdef lf_iovec iov
        cdef Py_ssize_t done = self._send_rest_sent, progress = 0
        rest = self._send_rest
        iov.base = PyBytes_AS_STRING(rest) + done
        iov.len = PyBytes_GET_SIZE(rest) - done
        try:
            self._send_all(&iov, 1, iov.len, deadline, &progress)
        except TimeoutError:
            self._send_rest_sent = done + progress
            # The caller must be able to tell that *this* message was not sent at all.
            raise TimeoutError(
                f"timed out sending the rest of an earlier message ({progress} of the "
                f"{PyBytes_GET_SIZE(rest) - done} bytes left went out); this message was not "
                "sent") from None
        except BaseException:
            self._send_rest_sent = done + progress
            raise
        self._send_rest = None
        self._send_rest_sent = 0
        return 0

    cdef int _send_frame(self, int kind, const char *data, Py_ssize_t size,
                         int64_t deadline) except -1:
        """Send one frame (the send lock is held)."""
        cdef unsigned char header[HEADER_SIZE]
        cdef lf_iovec iov[2]
        if self._batch_depth > 0 and size <= SMALL_SEND_SIZE:
            # Inside batch(): append to the batch buffer; it goes out when full or at the end.
            if self._send_rest is not None:
                self._flush_rest(deadline)
            self._reserve_batch(HEADER_SIZE + size)
            self._sent_since_recv = True
            _store_header(<unsigned char *>self._batch_buf + self._batch_len, kind, 0, size)
            memcpy(self._batch_buf + self._batch_len + HEADER_SIZE, data, size)
            self._batch_len += HEADER_SIZE + size
            if self._batch_len >= BATCH_FLUSH_SIZE:
                self._flush_batch(deadline)
            return 0
        self._flush_pending_sends(deadline)
        if size <= SMALL_SEND_SIZE:
            # One contiguous send(): for small frames a memcpy is cheaper than a gather write.
            _store_header(<unsigned char *>self._sbuf, kind, 0, size)
            memcpy(self._sbuf + HEADER_SIZE, data, size)
            iov[0].base = self._sbuf
            iov[0].len = HEADER_SIZE + size
            return self._send_all(iov, 1, HEADER_SIZE + size, deadline)
        _store_header(header, kind, 0, size)
        iov[0].base = header
        iov[0].len = HEADER_SIZE
        iov[1].base = <void *>data
        iov[1].len = size
        return self._send_all(iov, 2, HEADER_SIZE + size, deadline)

    cdef int _flush_pending_sends(self, int64_t deadline) except -1:
        """Before a frame goes out directly: the rest of a timed-out frame, then the batch."""
        if self._send_rest is not None:
            self._flush_rest(deadline)
        if self._batch_len > 0:
            self._flush_batch(deadline)
        return 0

    cdef int _reserve_batch(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t capacity
        cdef char *grown
        if self._batch_len + extra <= self._batch_cap:
            return 0
        capacity = max(self._batch_len + extra, 2 * self._batch_cap, BATCH_FLUSH_SIZE)
        grown = <char *>PyMem_Realloc(self._batch_buf, capacity)
        if grown == NULL:
            raise MemoryError()
        self._batch_buf = grown
        self._batch_cap = capacity
        return 0

    cdef int _flush_batch(self, int64_t deadline) except -1:
        """Write the batch buffer (the send lock is held). If the deadline passes part-way the
        rest moves to _send_rest; if nothing went out, the batch stays as it was."""
        cdef lf_iovec iov
        if self._batch_len == 0:
            return 0
        iov.base = self._batch_buf
        iov.len = self._batch_len
        try:
            self._send_all(&iov, 1, self._batch_len, deadline)
        except BaseException:
            if self._send_rest is not None:  # part of it went out: the rest is saved there
                self._batch_len = 0
            raise
        self._batch_len = 0
        return 0

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
        cdef int64_t deadline = _deadline(timeout)
        _lock(self._send_lock, deadline, "send")
        try:
            try:
                self._flush_pending_sends(deadline)
            except TimeoutError:
                raise TimeoutError(f"timed out flushing; {self._unsent()} bytes are still "
                                   "queued") from None
        finally:
            PyThread_release_lock(self._send_lock)

    @property
    def unsent_bytes(self):
        """How many bytes that sends accepted are queued here, not yet written to the socket (the
        rest of a timed-out send, an open batch's frames). flush() writes them."""
        return self._unsent()

    cdef Py_ssize_t _unsent(self):
        cdef Py_ssize_t n = self._batch_len
        if self._send_rest is not None:
            n += PyBytes_GET_SIZE(self._send_rest) - self._send_rest_sent
        return n

    cdef int _end_batch(self, object timeout) except -1:
        # The block must end whatever happens (the lock wait is not bounded); the timeout bounds
        # the final write.
        _lock(self._send_lock, -1, "send")
        try:
            self._batch_depth -= 1
            if self._batch_depth == 0 and self._fd != LF_INVALID_SOCKET:
                self._flush_pending_sends(_deadline(timeout))
        finally:
            PyThread_release_lock(self._send_lock)
        return 0

    def send_bytes_many(self, buffers, *, timeout=None):
        """Send every buffer of an iterable as its own message, with as few gather writes as
        possible: small payloads are copied, with their headers, into one block; large ones are
        written from their own memory. Nothing is sent if any item is not a buffer."""
        cdef list items = buffers if type(buffers) is list else list(buffers)
        cdef Py_ssize_t count = len(items), i, nviews = 0, niov = 0, block_size = 0, pos = 0
        cdef Py_ssize_t total = 0, size
        cdef Py_buffer *views = NULL
        cdef lf_iovec *iov = NULL
        cdef char *block = NULL
        cdef const char *data
        cdef object item
        self._check_writable()
        if self._deferred_handshake is not None:
            self._check_handshake_now()
        cdef int64_t deadline = _deadline(timeout)
        if count == 0:
            return
        try:
            views = <Py_buffer *>PyMem_Malloc(count * sizeof(Py_buffer))
            iov = <lf_iovec *>PyMem_Malloc((2 * count + 1) * sizeof(lf_iovec))
            if views == NULL or iov == NULL:
                raise MemoryError()
            for i in range(count):
                item = items[i]
                try:
                    PyObject_GetBuffer(item, &views[i], PyBUF_SIMPLE)
                except (BufferError, ValueError):
                    item = memoryview(item).tobytes()  # not contiguous: one C-order copy
                    PyObject_GetBuffer(item, &views[i], PyBUF_SIMPLE)
                nviews += 1
                block_size += HEADER_SIZE
                if views[i].len <= SMALL_SEND_SIZE:
                    block_size += views[i].len
            block = <char *>PyMem_Malloc(block_size)
            if block == NULL:
                raise MemoryError()
            for i in range(count):
                size = views[i].len
                data = <const char *>views[i].buf
                # This frame's header (and small payload) extends the block piece in progress.
                if niov == 0 or <char *>iov[niov - 1].base + iov[niov - 1].len != block + pos:
                    iov[niov].base = block + pos
                    iov[niov].len = 0
                    niov += 1
                _store_header(<unsigned char *>block + pos, KIND_BYTES, 0, size)
                pos += HEADER_SIZE
                iov[niov - 1].len += HEADER_SIZE
                if size <= SMALL_SEND_SIZE:
                    memcpy(block + pos, data, size)
                    pos += size
                    iov[niov - 1].len += size
                else:
                    iov[niov].base = <void *>data
                    iov[niov].len = size
                    niov += 1
                total += HEADER_SIZE + size
            _lock(self._send_lock, deadline, "send")
            try:
                self._flush_pending_sends(deadline)
                self._send_all(iov, <int>niov, total, deadline)
            finally:
                PyThread_release_lock(self._send_lock)
        finally:
            for i in range(nviews):
                PyBuffer_Release(&views[i])
            PyMem_Free(views)
            PyMem_Free(iov)
            PyMem_Free(block)

    cdef int _send_buffer(self, int kind, object obj, Py_ssize_t offset, object size_obj,
                          int64_t deadline) except -1:
        cdef Py_buffer view
        cdef Py_ssize_t size
        try:
            PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
        except (BufferError, ValueError):
            # Not contiguous (a strided memoryview, a Fortran-ordered array): one C-order copy,
            # as multiprocessing does.
            obj = memoryview(obj).tobytes()
            PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
        try:
            if offset < 0:
                raise ValueError("offset is negative")
            if view.len < offset:
                raise ValueError("buffer length < offset")
            if size_obj is None:
                size = view.len - offset
            else:
                size = size_obj
                if size < 0:
                    raise ValueError("size is negative")
                if offset + size > view.len:
                    raise ValueError("buffer length < offset + size")
            _lock(self._send_lock, deadline, "send")
            try:
                self._send_frame(kind, <char *>view.buf + offset, size, deadline)
            finally:
                PyThread_release_lock(self._send_lock)
        finally:
            PyBuffer_Release(&view)
        return 0

    def send_bytes(self, buf, Py_ssize_t offset=0, size=None, *, timeout=None):
        """Send the bytes of a buffer-protocol object (bytes, bytearray, memoryview, array, numpy)
        as one message. `offset` and `size` are in bytes. The payload is never copied when it is
        large: header and payload go to the kernel in one gather write.
        """
        self._check_writable()
        if self._deferred_handshake is not None:
            self._check_handshake_now()
        self._send_buffer(KIND_BYTES, buf, offset, size, _deadline(timeout))

    def send(self, obj, *, timeout=None):
        """Send a picklable object as one message.

        It is pickled with multiprocessing's ForkingPickler (so everything multiprocessing can
        send, this can send) at protocol 5: large buffers that support it (numpy arrays,
        pickle.PickleBuffer, anything that pickles its data as one) travel out of band,
        written from their own memory in the same gather write as the pickle, and are received
        straight into their final memory.
        An object that cannot be pickled raises here and nothing is sent. With a `serializer`,
        the message is its dumps(obj), in band.
        """
        self._check_writable()
        if self._deferred_handshake is not None:
            self._check_handshake_now()
        cdef int64_t deadline = _deadline(timeout)
        if self._serializer is not None:
            self._send_buffer(KIND_PICKLE, self._serializer.dumps(obj), 0, None, deadline)
            return
        data, buffers = _pickle(obj)
        if not buffers:
            self._send_buffer(KIND_PICKLE, data, 0, None, deadline)
        elif len(buffers) > MAX_OOB_BUFFERS:
            self._send_buffer(KIND_PICKLE, _dumps(obj, 5), 0, None, deadline)  # all in band
        else:
            self._send_object(data, buffers, deadline)

    cdef int _send_object(self, object data, list buffers, int64_t deadline) except -1:
        """One object message: header and size table, then the pickle, then each out-of-band
        buffer from its own memory, all in one gather write (docs/protocol.md, "Objects")."""
        cdef Py_ssize_t count = len(buffers), i, nviews = 0
        cdef Py_ssize_t head_size = HEADER_SIZE + 8 * (count + 1)
        cdef uint64_t total = 8 * (count + 1)
        cdef Py_buffer *views = <Py_buffer *>PyMem_Malloc((count + 1) * sizeof(Py_buffer))
        cdef lf_iovec *iov = <lf_iovec *>PyMem_Malloc((count + 2) * sizeof(lf_iovec))
        cdef unsigned char *head = <unsigned char *>PyMem_Malloc(head_size)
        try:
            if views == NULL or iov == NULL or head == NULL:
                raise MemoryError()
            PyObject_GetBuffer(data, &views[0], PyBUF_SIMPLE)
            nviews = 1
            for i in range(count):
                PyObject_GetBuffer(buffers[i], &views[i + 1], PyBUF_SIMPLE)
                nviews += 1
            for i in range(count + 1):
                lf_store_u64le(head + HEADER_SIZE + 8 * i, views[i].len)
                total += views[i].len
                iov[i + 1].base = views[i].buf
                iov[i + 1].len = views[i].len
            _store_header(head, KIND_OBJECT, <uint32_t>count, total)
            iov[0].base = head
            iov[0].len = head_size
            _lock(self._send_lock, deadline, "send")
            try:
                self._flush_pending_sends(deadline)
                self._send_all(iov, <int>(count + 2), <Py_ssize_t>(HEADER_SIZE + total), deadline)
            finally:
                PyThread_release_lock(self._send_lock)
        finally:
            for i in range(nviews):
                PyBuffer_Release(&views[i])
            PyMem_Free(views)
            PyMem_Free(iov)
            PyMem_Free(head)
        return 0

    # ---- raw bytes for the handshake (_handshake.py), before any frame --------------------------

    def _send_raw(self, data, *, timeout=None):
        """Send bytes as they are, without a frame header."""
        cdef Py_buffer view
        cdef lf_iovec iov
        if self._fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            iov.base = view.buf
            iov.len = view.len
            if view.len:
                self._send_all(&iov, 1, view.len, _deadline(timeout))
        finally:
            PyBuffer_Release(&view)

    def _recv_raw(self, Py_ssize_t max_size, *, timeout=None):
        """Return between 1 and `max_size` received bytes, waiting for the first one. Never
        takes more than `max_size` from the socket: what follows the handshake stays queued."""
        cdef Py_ssize_t n
        cdef int err
        if self._fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        cdef int64_t deadline = _deadline(timeout)
        self._flush_discards()
        self._rstart = self._rend = 0
        if max_size == 0:
            return b""
        out = PyBytes_FromStringAndSize(NULL, max_size)
        while True:
            if self._fd == LF_INVALID_SOCKET:
                raise OSError("handle is closed")
            n = lf_recv(self._fd, PyBytes_AS_STRING(out), <size_t>max_size)
            if n > 0:
                self._count_consumed(n)
                return out if n == max_size else out[:n]
            if n == 0:
                raise EOFError("the peer closed the connection")
            err = lf_last_error()
            if lf_error_would_block(err):
                if self._wait(LF_POLLIN, deadline):
                    raise TimeoutError("timed out waiting for a message")
            elif lf_error_interrupted(err):
                PyErr_CheckSignals()
            else:
                _raise_os_error(err)

    def _defer_handshake(self, handshake):
        """Leave the rest of the handshake (`handshake.advance()` runs it without waiting) to
        the channel's first use: every receive and poll() finishes it first, and a send checks
        whether it can finish without waiting (see connection.Client)."""
        self._deferred_handshake = handshake

    # ---- handing a channel to another process (see _reduction.py) -------------------------------

    def _prepare_handover(self):
        """Before this channel's socket is duplicated into another process: refuse a channel
        that a timeout left in the middle of a message, finish a deferred handshake, and treat
        the socket as shared from now on: the other process can receive from it without this
        one knowing, so what this channel saw queued is forgotten at every receive.

        Another thread may be inside a receive on this channel, for good (a Pool's result
        handler waits in one while the pool starts workers): the handover does not wait for it.
        That receive discarded what it delivered before it began to wait and, with _shared set,
        discards what it delivers before it returns, so the copy finds the socket as this
        channel leaves it, as a multiprocessing connection's copy does. Only a deferred
        handshake, or the discards of a receive that ended just before _shared was set, make
        the handover wait for the receive lock."""
        if self._send_rest is not None:
            raise OSError("cannot hand over a channel in the middle of sending a message")
        self._shared = True
        while True:
            if PyThread_acquire_lock(self._recv_lock, NOWAIT_LOCK):
                try:
                    if self._pending is not None or self._head_have > 0:
                        raise OSError("cannot hand over a channel in the middle of receiving a "
                                      "large message")
                    self._flush_discards()
                    if self._deferred_handshake is not None:
                        self._finish_handshake(-1)
                finally:
                    PyThread_release_lock(self._recv_lock)
                return
            if self._deferred_handshake is None and lf_counter_load(self._ledger + 1) == 0:
                return
            with nogil:
                lf_nap(HANDOVER_NAP_NS)
            PyErr_CheckSignals()

    def _mark_shared(self):
        """Another process may receive from this socket too (the copy rebuilt from a handover)."""
        self._shared = True


cdef str _os_error_text(int err):
    try:
        _raise_os_error(err)
    except OSError as exc:
        return exc.strerror or str(exc)
