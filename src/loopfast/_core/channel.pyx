# cython: language_level=3, embedsignature=True, freethreading_compatible=True
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
cimport cython

import operator
import os
import sys
import warnings
import weakref
from multiprocessing.reduction import ForkingPickler

from .._errors import BufferTooShort, ProtocolError
from .. import _messages
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
                           Py_ssize_t *peeked, int *peek_error) noexcept nogil:
    """poll() with a zero timeout until the socket is ready (returns > 0), the spin budget or the
    deadline is spent (returns 0), this CPU turns out to be shared (returns SPIN_CONTENDED, or
    SPIN_READY_SHARED when the socket became ready after another thread ran here), or
    poll() fails (returns < 0; the caller's blocking wait reports the error).
    With `peek_buf`, each check is a peek instead of a poll(): when data arrives, it is already
    in `peek_buf` (*peeked bytes; 0 at the end of the stream), which saves the receive the
    syscall of its own first look (measured, 64 B round trip: ~1 us). A failed peek returns < 0
    with its error in *peek_error, for the caller to raise: the kernel reports a socket error
    (a reset) once, so a later wait or read would see only the end of the stream."""
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
                peek_error[0] = lf_last_error()
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


# What _parse_head() finds, and what is wrong with a bad head (lf_head.problem).
cdef enum:
    HEAD_MORE = 0  # not all of the head is there yet
    HEAD_OK = 1    # a valid head, all there
    HEAD_BAD = 2   # a malformed head
cdef enum:
    BAD_HEADER = 1     # a kind, flag, reserved byte or count this protocol version does not have
    BAD_OOB_COUNT = 2  # more out-of-band buffers than allowed, or than the length can hold
    BAD_OVER_LIMIT = 3  # a length over the channel's max_message_size
    BAD_OVER_MACHINE = 4  # a length over what this machine can address
    BAD_TABLE = 5      # an object message's part sizes that do not add up to its length


cdef inline int _parse_head(const unsigned char *h, Py_ssize_t avail, uint64_t max_size,
                            lf_head *head) noexcept nogil:
    """The one place a frame head is parsed: the `avail` bytes at `h` from the start of a frame.
    HEAD_OK: a valid head (the header and, for an object message, its size table) all there;
    HEAD_MORE: not all of it there yet (head.size, once the header is there, says how much is
    needed; the header's fields are then known and valid); HEAD_BAD: a malformed head
    (head.problem says why). The twin's _parse_head (receiving_py.py) is the same."""
    cdef uint64_t total, size
    cdef uint32_t i
    head.size = HEADER_SIZE
    head.problem = 0
    if avail < HEADER_SIZE:
        head.kind = 0
        head.count = 0
        head.length = 0
        return HEAD_MORE
    head.kind = h[0]
    head.count = lf_load_u32le(h + 4)
    head.length = lf_load_u64le(h + 8)
    # `count` is the number of out-of-band buffers: not 0 exactly for an object message.
    if (head.kind < KIND_BYTES or head.kind > KIND_OBJECT or h[1] != 0 or h[2] != 0 or h[3] != 0
            or (head.count != 0) != (head.kind == KIND_OBJECT)):
        head.problem = BAD_HEADER
    elif head.kind == KIND_OBJECT and (head.count > MAX_OOB_BUFFERS
                                       or head.length < 8 * (<uint64_t>head.count + 1)):
        head.problem = BAD_OOB_COUNT
    elif head.length > max_size:
        head.problem = BAD_OVER_LIMIT
    elif head.length > <uint64_t>PY_SSIZE_T_MAX:
        head.problem = BAD_OVER_MACHINE
    if head.problem:
        return HEAD_BAD
    if head.kind != KIND_OBJECT:
        return HEAD_OK
    head.size = HEADER_SIZE + 8 * (<Py_ssize_t>head.count + 1)
    if avail < head.size:
        return HEAD_MORE
    # The size table must add up to the frame's length (before anything is allocated).
    total = 8 * (<uint64_t>head.count + 1)
    for i in range(head.count + 1):
        size = lf_load_u64le(h + HEADER_SIZE + 8 * i)
        if size > head.length or total + size > head.length:  # no overflow
            head.problem = BAD_TABLE
            return HEAD_BAD
        total += size
    if total != head.length:
        head.problem = BAD_TABLE
        return HEAD_BAD
    return HEAD_OK


cdef inline void _store_header(unsigned char *h, int kind, uint32_t count,
                               uint64_t length) noexcept nogil:
    """Encode a frame header (docs/protocol.md, "Frames")."""
    h[0] = <unsigned char>kind
    h[1] = h[2] = h[3] = 0
    lf_store_u32le(h + 4, count)
    lf_store_u64le(h + 8, length)


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
        raise ValueError(_messages.NAN_TIMEOUT)
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
                raise TimeoutError(_messages.TIMED_OUT_LOCK.format(what=what))
            microseconds = (remaining + 999) // 1000
        with nogil:
            status = PyThread_acquire_lock_timed(lock, microseconds, 1)
        if status == PY_LOCK_ACQUIRED:
            return 0
        if status == PY_LOCK_INTR:
            PyErr_CheckSignals()


# Every channel of this process, for the fork handlers below: weak references that remove
# themselves when their channel goes. A snapshot is set.copy(), one C call that another thread
# cannot interleave with, with or without the GIL (a WeakSet is iterated by Python code, which
# another thread's new channel interrupts: "Set changed size during iteration").
cdef set _channels = set()
cdef object _forget_channel = _channels.discard


cdef list _live_channels():
    cdef list out = []
    for ref in _channels.copy():
        channel = ref()
        if channel is not None:
            out.append(channel)
    return out


def _before_fork():
    """Move every channel's ledger into memory shared with the child (see _begin_receive), so
    that both processes can tell whether the other received from the socket since they last
    did, and either can discard what the other delivered. Where the mapping fails, the channel
    settles its ledger now and forgets what it saw at every receive."""
    cdef Channel channel
    cdef uint64_t *shared
    for channel in _live_channels():
        if channel._ledger == channel._own_ledger and channel._fd != LF_INVALID_SOCKET:
            shared = lf_shared_ledger_new()
            if shared == NULL:
                channel._shared = True  # forget the window at every receive from now on
                channel._flush_discards()
                continue
            # Another thread may be receiving (free-threaded, at this very moment): its ledger
            # updates take the same critical section (_deliver, _count_consumed, _flush_discards),
            # so none lands in the old ledger after the counts were copied.
            with cython.critical_section(channel):
                shared[0] = channel._own_ledger[0]
                shared[1] = channel._own_ledger[1]
                channel._ledger = shared


def _after_fork_in_child():
    """Only the forking thread survives fork(): in the child no thread is blocked on any channel.
    Forget the parent's blocked threads, or the child's close() would shut down the socket it
    shares with the parent (see close()) instead of closing its own descriptor."""
    cdef Channel channel
    for channel in _live_channels():
        channel._blocked = 0
        if channel._deferred_close_fd != LF_INVALID_SOCKET:
            lf_close(channel._deferred_close_fd)
            channel._deferred_close_fd = LF_INVALID_SOCKET


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


include "base.pxi"
include "send.pxi"
include "receive.pxi"


cdef class Channel(_ReceivePath):
    """Channel(fd, readable=True, writable=True, *, max_message_size=4294967296,
               serializer=None, spin=None)
--

    One end of a framed, bidirectional loopback connection.

    ``Channel(fd, readable=True, writable=True, *, max_message_size=...)`` takes ownership of a
    connected TCP socket's file descriptor whose handshake is done; applications get channels from
    ``Pipe()``, ``Client()`` or ``Listener.accept()``.
    """

    def __init__(self, fd, bint readable=True, bint writable=True, *,
                 max_message_size=DEFAULT_MAX_MESSAGE_SIZE, serializer=None, spin=None):
        if not readable and not writable:
            raise ValueError(_messages.NEITHER_DIRECTION)
        self.spin = spin
        _check_serializer(serializer)
        self._serializer = serializer
        if max_message_size is None:
            self._max_message_size = UINT64_MAX
        else:
            if max_message_size < 0:
                raise ValueError(_messages.BAD_MAX_MESSAGE_SIZE)
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
        _channels.add(weakref.ref(self, _forget_channel))

    def __del__(self):
        if self._fd != LF_INVALID_SOCKET:
            # Not while the interpreter shuts down: warnings can no longer be shown then (a
            # spawned child that exits with a channel open would print a stray error). Not for a
            # pipe of multiprocessing's queues and pools either: their code leaves many open for
            # the collector, as multiprocessing's own connections allow.
            if self._warn_unclosed and not _is_finalizing():
                _warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()

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
            raise ValueError(_messages.BAD_SPIN)
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
        cdef lf_socket_t fd
        cdef bint busy
        with cython.critical_section(self):  # see _enter_fd() in base.pxi
            fd = self._fd
            self._fd = LF_INVALID_SOCKET
            busy = self._blocked > 0
            if busy and fd != LF_INVALID_SOCKET:
                # Another thread is in a syscall on fd (poll(), recv(), send()). Closing fd would
                # not wake it (and the number could be reused under it): shut the socket down,
                # which wakes it, and let the last such call close fd (_leave_fd).
                lf_shutdown_both(fd)
                self._deferred_close_fd = fd
        if fd == LF_INVALID_SOCKET:
            return
        if not busy:
            lf_close(fd)
        # What a receive or send left half-done is let go of here, unless a receive or send is
        # under way (in another thread, or in this one: a signal handler, a protocol error):
        # that one lets go of it when it ends (_settle, _unlock_send).
        if PyThread_acquire_lock(self._recv_lock, NOWAIT_LOCK):
            self._drop_receive_state()
            PyThread_release_lock(self._recv_lock)
        if PyThread_acquire_lock(self._send_lock, NOWAIT_LOCK):
            self._send_rest = None
            PyThread_release_lock(self._send_lock)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self._fd == LF_INVALID_SOCKET else f"fd={self._fd}"
        mode = ("r" if self._readable else "") + ("w" if self._writable else "")
        return f"<loopfast.Channel {state} mode={mode!r}>"

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
            raise OSError(_messages.HANDOVER_MID_SEND)
        self._shared = True
        while True:
            if PyThread_acquire_lock(self._recv_lock, NOWAIT_LOCK):
                try:
                    if self._pending is not None or self._head_have > 0:
                        raise OSError(_messages.HANDOVER_MID_RECEIVE)
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
