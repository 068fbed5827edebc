# cython: language_level=3, embedsignature=True
"""The compiled channel: framed messages over a nonblocking loopback TCP socket.

This is where frames are encoded (``_send_frame``) and parsed (``_read_header``,
``_recv_frame``); where the process waits (``_wait``, a ``poll()`` with the GIL released); and where
OS errors become Python exceptions (``_raise_os_error``). The wire format is specified in
docs/protocol.md; the handshake that precedes the frames lives in _handshake.py.
"""

from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytearray cimport (PyByteArray_AS_STRING, PyByteArray_FromStringAndSize,
                                PyByteArray_GET_SIZE)
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

from ._errors import BufferTooShort, ProtocolError
from ._protocol import DEFAULT_MAX_MESSAGE_SIZE

# ---- wire format (docs/protocol.md, "Frames") ---------------------------------------------------
cdef enum:
    # header layout: [0] kind, [1] flags, [2:4] reserved, [4:8] count, [8:16] payload length (LE)
    HEADER_SIZE = 16
    KIND_BYTES = 1     # payload is raw bytes (send_bytes)
    KIND_PICKLE = 2    # payload is a pickle (send), all in-band
    KIND_OBJECT = 3    # a pickle-5 with out-of-band buffers (send): size table, pickle, buffers
    # Most out-of-band buffers one object message may carry; with the header, its size table
    # (8 bytes per part) always fits in the receive buffer. A pickle with more goes in-band.
    MAX_OOB_BUFFERS = 8191
    # Buffers smaller than this stay in the in-band pickle: out of band they would cost an
    # allocation and a table entry each for a copy that is cheap anyway.
    OOB_MIN_SIZE = 4096

# ---- buffer sizes, chosen by measurement ------------------------------------------------------
cdef enum:
    # Receive buffer: one recv() of up to this much takes in every small frame that has arrived.
    RECV_BUFFER_SIZE = 256 * 1024
    # A payload larger than this is read straight into its final object instead of through the
    # receive buffer (saves one copy; below it the copy out of a cache-warm buffer is cheaper
    # than the extra recv() calls a direct read needs). Measured, GB/s streaming recv_bytes(),
    # direct from 16 KiB vs from 128 KiB: 20 kB 4.6 vs 4.1, 40 kB 6.6 vs 7.4, 60 kB 7.8 vs 7.6,
    # 100 kB 6.9 vs 5.2: a wash below ~64 KiB, a clear gain above.
    DIRECT_READ_THRESHOLD = 64 * 1024
    # A frame up to this size is assembled with its header in one contiguous buffer and sent with
    # send(); above it, header and payload go out with one gather write (sendmsg) and no copy.
    # Measured (stream between two processes, msg/s, copy+send vs sendmsg): 256 B 567k vs 543k,
    # 1 KiB 506k vs 496k, 4 KiB 401k vs 388k, 8 KiB 334k vs 331k, 16000 B 251k vs 270k.
    SMALL_SEND_SIZE = 8 * 1024
    # A recv() after a wait that returns at least this much says the peer outruns us.
    RECV_PLENTY = 16 * 1024
    # Inside batch(), the buffered frames are written once they reach this size.
    BATCH_FLUSH_SIZE = 64 * 1024
    # While busy-polling: time between two readiness checks, and how often to give the CPU
    # away in case the peer shares it (ns).
    SPIN_GAP_NS = 2000
    SPIN_YIELD_NS = 5000
    # A yield that takes longer than this (ns) means another thread ran on this CPU.
    SPIN_CONTENDED_NS = 2000
    SPIN_CONTENDED = -1000
    SPIN_READY_SHARED = 1000
    # Socket I/O on more than this many bytes releases the GIL (a large copy into the kernel).
    RELEASE_GIL_SIZE = 64 * 1024

cdef class _BufferCollector:
    """buffer_callback for pickle protocol 5: keeps large buffers out of band."""
    cdef list buffers

    def __cinit__(self):
        self.buffers = []

    def __call__(self, pickle_buffer):
        try:
            raw = pickle_buffer.raw()  # contiguous bytes, no copy
        except BufferError:
            # A non-contiguous buffer: one C-order copy, sent out of band as flat bytes.
            raw = memoryview(pickle_buffer).tobytes()
        if len(raw) < OOB_MIN_SIZE:
            return True  # small: in band
        self.buffers.append(raw)
        return False


class _OutOfBandPickler(pickle.Pickler):
    """multiprocessing's ForkingPickler (the same reducers: channels, sockets, ... pickle as
    they do for multiprocessing) at protocol 5 with a buffer_callback, which ForkingPickler's
    constructor does not pass on before Python 3.12."""

    def __init__(self, file, buffer_callback):
        super().__init__(file, 5, buffer_callback=buffer_callback)
        self.dispatch_table = ForkingPickler._copyreg_dispatch_table.copy()
        self.dispatch_table.update(ForkingPickler._extra_reducers)


cdef tuple _pickle(object obj):
    """Pickle `obj` at protocol 5; returns (in-band pickle, list of out-of-band buffers)."""
    out = io.BytesIO()
    collector = _BufferCollector()
    _OutOfBandPickler(out, collector).dump(obj)
    return out.getbuffer(), collector.buffers


cdef int64_t _default_spin_ns = 0  # the process-wide spin budget (loopfast.set_default_spin)


def _set_default_spin_ns(int64_t nanoseconds):
    global _default_spin_ns
    _default_spin_ns = nanoseconds


cdef bint _detect_shared_cpu = True  # off only in tests of the spin budget itself


def _set_shared_cpu_detection(bint on):
    """For tests: whether a spin stops early when its CPU turns out to be shared."""
    global _detect_shared_cpu
    _detect_shared_cpu = on


cdef int _spin_until_ready(lf_socket_t fd, short events, int64_t spin_ns,
                           int64_t deadline) noexcept nogil:
    """poll() with a zero timeout until the socket is ready (returns > 0), the spin budget or the
    deadline is spent (returns 0), this CPU turns out to be shared (returns SPIN_CONTENDED, or
    SPIN_READY_SHARED when the socket became ready after another thread ran here), or
    poll() fails (returns < 0; the caller's blocking wait reports the error)."""
    cdef short revents = 0
    cdef int rc
    cdef int64_t now = lf_monotonic_ns()
    cdef int64_t limit = now + spin_ns
    cdef int64_t next_yield = now + SPIN_YIELD_NS
    cdef int slow_yields = 0
    if deadline >= 0 and deadline < limit:
        limit = deadline
    while True:
        rc = lf_poll(fd, events, 0, &revents)
        now = lf_monotonic_ns()
        if rc > 0 and slow_yields > 0:
            return SPIN_READY_SHARED  # ready after another thread ran here: likely the peer
        if rc != 0 or now >= limit:
            return rc
        # Space the checks out: a poll() on every turn contends with the sender for the socket
        # and slowed a 64 B stream from ~500k to ~410k msg/s; 2 us apart costs <= 2 us latency.
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


# The largest descriptor number: a C int on POSIX, a SOCKET (pointer-sized) on Windows. The twin
# (_channel_py.py) has the same limit.
_FD_MAX = (2**64 - 1 if sys.maxsize > 2**32 else 2**32 - 1) if sys.platform == "win32" \
    else 2**31 - 1

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
    os.register_at_fork(after_in_child=_after_fork_in_child)


cdef class Channel:
    """One end of a framed, bidirectional loopback connection.

    ``Channel(fd, readable=True, writable=True, *, max_message_size=...)`` takes ownership of a
    connected TCP socket's file descriptor whose handshake is done; applications get channels from
    ``Pipe()``, ``Client()``, ``Listener.accept()`` or ``Channel.connect()``.
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
        self._last_recv_was_empty = True
        self._pending = None
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
            # spawned child that exits with a channel open would print a stray error).
            if not _is_finalizing():
                _warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()

    def __dealloc__(self):
        if self._fd != LF_INVALID_SOCKET:
            lf_close(self._fd)
            self._fd = LF_INVALID_SOCKET
        if self._deferred_close_fd != LF_INVALID_SOCKET:
            lf_close(self._deferred_close_fd)
        PyMem_Free(self._rbuf)
        PyMem_Free(self._sbuf)
        PyMem_Free(self._batch_buf)
        if self._send_lock != NULL:
            PyThread_free_lock(self._send_lock)
        if self._recv_lock != NULL:
            PyThread_free_lock(self._recv_lock)

    @classmethod
    def connect(cls, address, *, authkey=None, timeout=None,
                max_message_size=DEFAULT_MAX_MESSAGE_SIZE, family=None, serializer=None,
                spin=None):
        """Connect to a loopfast Listener at a loopback (host, port) and return a Channel.

        `timeout` (seconds) bounds the connection and the handshake.
        """
        from .connection import connect
        return connect(address, family=family, authkey=authkey, timeout=timeout,
                       max_message_size=max_message_size, serializer=serializer, spin=spin)

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
        """Close the channel. Messages already received but not read are discarded.

        A thread blocked in a receive or send on this channel wakes up and raises OSError.
        """
        cdef lf_socket_t fd = self._fd
        if fd != LF_INVALID_SOCKET:
            self._fd = LF_INVALID_SOCKET
            self._pending = None
            self._send_rest = None
            self._rstart = self._rend = 0
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

    cdef int _wait(self, short events, int64_t deadline) except -1:
        """Wait with the GIL released until the socket is ready for `events`.
        Returns 0 when ready, 1 when the deadline passed (would-block is a value, not an error)."""
        cdef int64_t remaining, started
        cdef int timeout_ms, rc, err
        cdef short revents = 0
        cdef lf_socket_t fd = self._fd
        cdef int64_t spin_ns = self._spin_ns if self._spin_ns >= 0 else _default_spin_ns
        if fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        if spin_ns > 0 and deadline != 0:
            if self._spin_skip > 0:
                self._spin_skip -= 1
            else:
                # Bounded busy-polling: a sleeping receiver costs ~25 us of kernel wake-up per hop
                # on loopback, so check readiness (never read: poll() must not consume) in a
                # tight loop with the GIL released, up to the spin budget; then sleep in poll().
                self._blocked += 1
                with nogil:
                    started = lf_monotonic_ns()
                    rc = _spin_until_ready(fd, events, spin_ns, deadline)
                    self._spun_ns += lf_monotonic_ns() - started
                self._unblocked()
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

    cdef void _make_room(self) noexcept:
        """Before a recv() into the receive buffer: start over when it is empty, or move the
        unconsumed bytes to the front when less than a quarter is free at the end. Any frame
        kept in the buffer is <= DIRECT_READ_THRESHOLD + HEADER_SIZE (or, for an object message,
        its header and size table), well under 3/4 of it, so afterwards there is room."""
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
        elif self._rstart > 0 and self._rcap - self._rend < self._rcap // 4:
            memmove(self._rbuf, self._rbuf + self._rstart, self._rend - self._rstart)
            self._rend -= self._rstart
            self._rstart = 0

    cdef int _fill(self, int64_t deadline) except -1:
        """Receive at least one more byte into the receive buffer."""
        cdef Py_ssize_t n
        cdef int err
        cdef bint waited
        self._make_room()
        if self._fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        while True:
            waited = self._last_recv_was_empty
            if waited:
                # The last recv() found nothing: wait first, saving a recv() that would fail.
                if self._wait(LF_POLLIN, deadline):
                    raise TimeoutError("timed out waiting for a message")
            n = lf_recv(self._fd, self._rbuf + self._rend, <size_t>(self._rcap - self._rend))
            if n > 0:
                self._rend += n
                # Try recv() first next time only if data is plentiful (a stream that outruns
                # us); a request/response peer leaves nothing to read, so wait first there.
                self._last_recv_was_empty = waited and n < RECV_PLENTY
                return 0
            if n == 0:
                if self._rend > self._rstart or self._pending is not None:
                    self._protocol_error(
                        "the peer closed the connection in the middle of a message")
                raise EOFError("the peer closed the connection")
            err = lf_last_error()
            if lf_error_would_block(err):
                self._last_recv_was_empty = True
            elif lf_error_interrupted(err):
                PyErr_CheckSignals()
            elif self._rend > self._rstart or self._pending is not None:
                self._protocol_error(
                    f"connection lost in the middle of a message ({_os_error_text(err)})")
            else:
                _raise_os_error(err)

    cdef Py_ssize_t _recv_some(self, char *dst, Py_ssize_t size, int64_t deadline) except -1:
        """Receive between 1 and `size` bytes of a payload straight into `dst` (its final home).
        The connection ending here is always in the middle of a message."""
        cdef Py_ssize_t n
        cdef int err
        cdef lf_socket_t fd
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
                n = lf_recv(fd, dst, <size_t>size)
                err = lf_last_error()
            self._unblocked()
            if n > 0:
                self._last_recv_was_empty = n < size
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

    cdef str _header_error(self):
        """Check the frame header at the start of the buffered bytes (there must be at least
        HEADER_SIZE): None if it is valid, else what is wrong with it. No side effects."""
        cdef const unsigned char *h = <const unsigned char *>(self._rbuf + self._rstart)
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

    cdef int _read_header(self, int *kind, Py_ssize_t *length) except -1:
        """Parse the frame header at the start of the buffered bytes (there must be at least
        HEADER_SIZE); a bad one closes the channel and raises ProtocolError, before anything is
        allocated for the payload. Consumes nothing."""
        cdef const unsigned char *h = <const unsigned char *>(self._rbuf + self._rstart)
        error = self._header_error()
        if error is not None:
            self._protocol_error(error)
        kind[0] = h[0]
        length[0] = <Py_ssize_t>lf_load_u64le(h + 8)
        return 0

    cdef object _finish_pending(self, int64_t deadline):
        """Fill the parts of the message being received (self._pending, a list of bytes /
        bytearray objects allocated at their final sizes) and return the list. Small parts are
        copied out of the receive buffer, large ones read straight from the socket. An exception
        (timeout, Ctrl-C) leaves the progress recorded, so the next receive resumes the message."""
        cdef list parts = self._pending
        cdef object part
        cdef Py_ssize_t size, avail, n
        cdef char *p
        while self._pending_part < len(parts):
            part = parts[self._pending_part]
            if type(part) is bytes:
                p = PyBytes_AS_STRING(part)
                size = PyBytes_GET_SIZE(part)
            else:
                p = PyByteArray_AS_STRING(part)
                size = PyByteArray_GET_SIZE(part)
            while self._pending_filled < size:
                n = size - self._pending_filled
                avail = self._rend - self._rstart
                if avail > 0:
                    n = min(n, avail)
                    memcpy(p + self._pending_filled, self._rbuf + self._rstart, n)
                    self._rstart += n
                elif n < DIRECT_READ_THRESHOLD:
                    self._fill(deadline)  # one recv() for this and the following small parts
                    continue
                else:
                    n = self._recv_some(p + self._pending_filled, n, deadline)
                self._pending_filled += n
            self._pending_part += 1
            self._pending_filled = 0
        self._pending = None
        return parts

    cdef int _start_pending(self, list parts, int kind) except -1:
        self._pending = parts
        self._pending_part = 0
        self._pending_filled = 0
        self._pending_kind = kind
        return 0

    cdef list _object_parts(self, Py_ssize_t length, uint32_t count):
        """Check an object frame's size table (at the start of the buffered bytes, after the
        header) and allocate its parts: the in-band pickle as bytes, each out-of-band buffer as
        a writable bytearray. Consumes header and table. Nothing is allocated for a bad table."""
        cdef const unsigned char *table = <const unsigned char *>(
            self._rbuf + self._rstart + HEADER_SIZE)
        cdef uint64_t size, total = 8 * (<uint64_t>count + 1)
        cdef uint32_t i
        cdef bint consistent = True
        for i in range(count + 1):
            size = lf_load_u64le(table + 8 * i)
            if size > <uint64_t>length or total + size > <uint64_t>length:  # no overflow
                consistent = False
                break
            total += size
        if not consistent or total != <uint64_t>length:
            self._protocol_error(f"malformed object frame: the sizes of its {count + 1} parts "
                                 f"do not add up to its length of {length} bytes")
        parts = [PyBytes_FromStringAndSize(NULL, <Py_ssize_t>lf_load_u64le(table))]
        for i in range(1, count + 1):
            parts.append(PyByteArray_FromStringAndSize(
                NULL, <Py_ssize_t>lf_load_u64le(table + 8 * i)))
        self._rstart += HEADER_SIZE + 8 * (count + 1)
        return parts

    cdef object _recv_frame(self, int64_t deadline, Py_ssize_t maxlength, int *kind):
        """Receive one whole message. Returns its payload as bytes (allocated once, at its final
        size) for kinds 1 and 2, and the list [pickle, buffer, ...] for an object message.
        maxlength < 0: no limit."""
        cdef Py_ssize_t avail, length
        cdef uint32_t count
        cdef object out
        if self._pending is not None:
            kind[0] = self._pending_kind
            if kind[0] != KIND_OBJECT:
                if maxlength >= 0 and PyBytes_GET_SIZE(self._pending[0]) > maxlength:
                    self._bad_message_length()
                return self._finish_pending(deadline)[0]
            return self._finish_pending(deadline)
        while True:
            avail = self._rend - self._rstart
            if avail >= HEADER_SIZE:
                self._read_header(kind, &length)
                if kind[0] == KIND_OBJECT:
                    count = lf_load_u32le(<const unsigned char *>(self._rbuf + self._rstart + 4))
                    if avail >= HEADER_SIZE + 8 * (count + 1):
                        self._start_pending(self._object_parts(length, count), KIND_OBJECT)
                        return self._finish_pending(deadline)
                else:
                    if maxlength >= 0 and length > maxlength:
                        self._bad_message_length()
                    if length <= avail - HEADER_SIZE:
                        out = PyBytes_FromStringAndSize(
                            self._rbuf + self._rstart + HEADER_SIZE, length)
                        self._rstart += HEADER_SIZE + length
                        return out
                    if length > DIRECT_READ_THRESHOLD:
                        self._rstart += HEADER_SIZE
                        self._start_pending([PyBytes_FromStringAndSize(NULL, length)], kind[0])
                        return self._finish_pending(deadline)[0]
            self._fill(deadline)

    cdef int _refuse_object(self) except -1:
        raise OSError("the next message was sent with send() and carries out-of-band buffers: "
                      "receive it with recv()")

    cdef _bad_message_length(self):
        # As multiprocessing does: the stream is left mid-message, so reading is over.
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
            return self._recv_bytes_frame(deadline, c_maxlength)
        finally:
            PyThread_release_lock(self._recv_lock)

    cdef object _recv_bytes_frame(self, int64_t deadline, Py_ssize_t maxlength):
        """The next message's payload as bytes (the receive lock is held). An object message is
        refused: its out-of-band buffers have no place in a bytes result."""
        cdef int kind
        if self._next_is_object(deadline):
            self._refuse_object()
        return self._recv_frame(deadline, maxlength, &kind)

    cdef bint _next_is_object(self, int64_t deadline) except -1:
        """Wait for the next message's header; True if it is an object message (which only
        recv() can take: its out-of-band buffers have no place in a bytes result)."""
        cdef int kind
        cdef Py_ssize_t length
        if self._pending is not None:
            return self._pending_kind == KIND_OBJECT
        while self._rend - self._rstart < HEADER_SIZE:
            self._fill(deadline)
        self._read_header(&kind, &length)
        return kind == KIND_OBJECT

    def recv_bytes_many(self, max_messages=None, *, timeout=None):
        """Wait for the next message (up to `timeout`), then return it with every further whole
        message already received, up to `max_messages`, as a list of bytes. The further ones
        come out of the receive buffer without a syscall each; one more nonblocking recv() is
        made when the buffer runs dry. At least one message is returned, or an exception raised.
        """
        cdef Py_ssize_t limit = -1, avail, length, taken
        cdef const unsigned char *h
        cdef list out
        self._check_readable()
        if max_messages is not None:
            if max_messages < 1:
                raise ValueError("max_messages must be >= 1 or None")
            limit = max_messages
        cdef int64_t deadline = _deadline(timeout)
        _lock(self._recv_lock, deadline, "receive")
        try:
            out = [self._recv_bytes_frame(deadline, -1)]
            taken = 1
            while limit < 0 or taken < limit:
                avail = self._rend - self._rstart
                h = <const unsigned char *>(self._rbuf + self._rstart)
                if avail >= HEADER_SIZE and _plain_frame_header(h, self._max_message_size):
                    length = <Py_ssize_t>lf_load_u64le(h + 8)
                    if length <= avail - HEADER_SIZE:
                        out.append(PyBytes_FromStringAndSize(<char *>h + HEADER_SIZE, length))
                        self._rstart += HEADER_SIZE + length
                        taken += 1
                        continue
                    if length > DIRECT_READ_THRESHOLD:
                        break  # a large payload: the next call reads it into its own object
                elif avail >= HEADER_SIZE:
                    break  # an object message or a bad header: the next call takes or reports it
                # A partial frame (or none): one nonblocking recv() for more, then stop.
                if not self._fill_nowait():
                    break
            return out
        finally:
            PyThread_release_lock(self._recv_lock)

    cdef bint _fill_nowait(self) except -1:
        """One nonblocking recv() into the receive buffer: True if it brought data. End of
        stream and errors are left for the next receive to report."""
        cdef Py_ssize_t n
        self._make_room()
        if self._rend == self._rcap:
            return False
        n = lf_recv(self._fd, self._rbuf + self._rend, <size_t>(self._rcap - self._rend))
        if n <= 0:
            return False
        self._rend += n
        return True

    def recv(self, *, timeout=None):
        """Receive one object sent with send() (unpickled: only talk to peers you trust)."""
        cdef int kind
        self._check_readable()
        cdef int64_t deadline = _deadline(timeout)
        _lock(self._recv_lock, deadline, "receive")
        try:
            payload = self._recv_frame(deadline, -1, &kind)
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

        If the message does not fit, raises BufferTooShort with the whole message as args[0].
        An object message with out-of-band buffers raises OSError and is left for recv().
        """
        cdef Py_buffer view
        cdef Py_ssize_t space, avail, length, filled
        cdef int kind
        cdef char *dst
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
                if self._next_is_object(deadline):
                    self._refuse_object()
                if self._pending is not None:
                    payload = self._recv_frame(deadline, -1, &kind)
                    length = PyBytes_GET_SIZE(payload)
                    if length > space:
                        raise BufferTooShort(payload)
                    memcpy(dst, PyBytes_AS_STRING(payload), length)
                    return length
                while True:
                    avail = self._rend - self._rstart
                    if avail >= HEADER_SIZE:
                        self._read_header(&kind, &length)
                        if length > space:
                            raise BufferTooShort(self._recv_frame(deadline, -1, &kind))
                        if length <= avail - HEADER_SIZE:
                            memcpy(dst, self._rbuf + self._rstart + HEADER_SIZE, length)
                            self._rstart += HEADER_SIZE + length
                            return length
                        if length > DIRECT_READ_THRESHOLD:
                            break
                    self._fill(deadline)
                # A large payload: straight from the socket into the caller's buffer.
                filled = avail - HEADER_SIZE
                memcpy(dst, self._rbuf + self._rstart + HEADER_SIZE, filled)
                self._rstart = self._rend = 0
                try:
                    while filled < length:
                        filled += self._recv_some(dst + filled, length - filled, deadline)
                except BaseException:
                    if self._fd != LF_INVALID_SOCKET:
                        # Interrupted (timeout, Ctrl-C): keep what arrived so that the next
                        # receive resumes this message. Only this rare path copies.
                        payload = PyBytes_FromStringAndSize(NULL, length)
                        memcpy(PyBytes_AS_STRING(payload), dst, filled)
                        self._start_pending([payload], kind)
                        self._pending_filled = filled
                    raise
                return length
            finally:
                PyThread_release_lock(self._recv_lock)
        finally:
            PyBuffer_Release(&view)

    def poll(self, timeout=0.0):
        """Return whether there is data to read, waiting up to `timeout` seconds (None: no limit).

        Never reads from the socket, so it never consumes or splits a message.
        """
        self._check_readable()
        if self._rend > self._rstart or self._pending is not None:
            return True
        return self._wait(LF_POLLIN, _deadline(timeout)) == 0

    def _spin_time(self):
        """Seconds this channel has spent busy-polling, in all (for tests and diagnostics)."""
        return self._spun_ns / 1e9

    def _has_message(self):
        """True if a whole message is already in the receive buffer (no syscall)."""
        cdef Py_ssize_t avail = self._rend - self._rstart
        if self._fd == LF_INVALID_SOCKET or avail < HEADER_SIZE or self._pending is not None:
            return False
        if self._header_error() is not None:
            return True  # ready: the receive will raise the ProtocolError
        return <Py_ssize_t>lf_load_u64le(<const unsigned char *>(self._rbuf + self._rstart + 8)) \
            <= avail - HEADER_SIZE

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
        """Return between 1 and `max_size` received bytes, waiting for the first one."""
        cdef Py_ssize_t n
        if self._fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        cdef int64_t deadline = _deadline(timeout)
        if self._rend == self._rstart:
            self._fill(deadline)
        n = min(max_size, self._rend - self._rstart)
        out = PyBytes_FromStringAndSize(self._rbuf + self._rstart, n)
        self._rstart += n
        return out

    # ---- handing a channel to another process (see _reduction in connection.py) ------------------

    def _buffered(self):
        """The bytes received but not yet consumed, for this channel's copy in another process."""
        if self._pending is not None:
            raise OSError("cannot hand over a channel in the middle of receiving a large message")
        if self._send_rest is not None:
            raise OSError("cannot hand over a channel in the middle of sending a message")
        return PyBytes_FromStringAndSize(self._rbuf + self._rstart, self._rend - self._rstart)

    def _prefill(self, bytes data not None):
        """Put bytes received by another copy of this channel back in front of the stream."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if self._rend != self._rstart or n > self._rcap:
            raise ValueError("cannot prefill a channel that holds data")
        memcpy(self._rbuf, PyBytes_AS_STRING(data), n)
        self._rstart = 0
        self._rend = n


cdef str _os_error_text(int err):
    try:
        _raise_os_error(err)
    except OSError as exc:
        return exc.strerror or str(exc)
