# cython: language_level=3
"""Declarations of the compiled channel (implementation in channel.pyx)."""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from cpython.pythread cimport PyThread_type_lock


cdef extern from "platform.h" nogil:
    ctypedef long lf_socket_t  # the real type is int (POSIX) or SOCKET (Windows)
    lf_socket_t LF_INVALID_SOCKET
    short LF_POLLIN
    short LF_POLLOUT
    int LF_IOV_MAX
    bint LF_FREE_THREADED           # a free-threaded (no-GIL) interpreter: a C constant

    ctypedef struct lf_iovec:
        void *base
        size_t len

    int lf_last_error()
    int lf_error_would_block(int err)
    int lf_error_interrupted(int err)
    int lf_error_not_socket(int err)
    Py_ssize_t lf_send(lf_socket_t s, const char *buf, size_t len)
    Py_ssize_t lf_recv(lf_socket_t s, char *buf, size_t len)
    Py_ssize_t lf_sendv(lf_socket_t s, const lf_iovec *iov, int count)
    Py_ssize_t lf_peek(lf_socket_t s, char *buf, size_t len)
    Py_ssize_t lf_discard(lf_socket_t s, char *buf, size_t len)
    Py_ssize_t lf_recvv(lf_socket_t s, const lf_iovec *iov, int count)
    int lf_poll(lf_socket_t s, short events, int timeout_ms, short *revents)
    int lf_set_nonblocking(lf_socket_t s)
    int lf_close(lf_socket_t s)
    int lf_shutdown_both(lf_socket_t s)
    int lf_set_nodelay(lf_socket_t s)
    int64_t lf_monotonic_ns()
    void lf_yield()
    void lf_nap(int64_t nanoseconds)
    uint64_t *lf_shared_ledger_new()
    void lf_shared_ledger_free(uint64_t *p)
    uint64_t lf_counter_load(uint64_t *p)
    uint64_t lf_counter_add(uint64_t *p, uint64_t n)
    int lf_relaxed_load_int(int *p)
    void lf_relaxed_store_int(int *p, int v)
    void lf_set_os_error(int err) with gil
    void lf_store_u64le(unsigned char *p, uint64_t v)
    uint64_t lf_load_u64le(const unsigned char *p)
    void lf_store_u32le(unsigned char *p, uint32_t v)
    uint32_t lf_load_u32le(const unsigned char *p)


cdef struct lf_head:
    # A frame head as _parse_head() found it (channel.pyx).
    int kind
    uint32_t count                 # out-of-band buffers (object messages)
    uint64_t length                # the payload's length (an object message's: with its table)
    Py_ssize_t size                # the head's size: the header, and an object message's table
    int problem                    # what is wrong with a bad head (BAD_* in channel.pyx), or 0


cdef class _ChannelBase:
    cdef lf_socket_t _fd            # the connected socket; LF_INVALID_SOCKET once closed
    cdef bint _readable             # recv* allowed (False for the write end of Pipe(duplex=False))
    cdef bint _writable             # send* allowed (False for the read end of Pipe(duplex=False))
    cdef uint64_t _max_message_size  # frames announcing more raise ProtocolError before allocating
    cdef object _max_message_size_obj  # the same, as given (int or None), for the property
    cdef int64_t _spin_ns           # busy-poll budget before a wait sleeps; -1: process default
    # The spin state is shared by both directions (a sender's wait for room, a receiver's for a
    # reply), under no lock: it is a hint, read and written with relaxed atomics (platform.h).
    cdef int _spin_skip             # waits left that sleep without spinning (the CPU was shared)
    cdef int _spin_backoff          # how many the last contention made skip (doubles, to 1024)
    cdef uint64_t _spun_ns          # ns spent busy-polling, in all (_spin_time()); atomic adds
    cdef object _serializer         # dumps/loads for send()/recv(); None: pickle-5 out of band
    cdef public bint _warn_unclosed  # ResourceWarning when collected open (False: a queue's pipe)
    cdef public object _peer_uid    # the uid of the peer's socket, checked at the handshake
    # The peer proved the authkey, or is this process's own user (who could end this process
    # anyway): a frame's parts are allocated at their final sizes before its payload arrives.
    # Otherwise only as the bytes arrive (_reserve): a header announcing 4 GiB reserves 64 KiB.
    cdef public bint _trusted

    # The kernel's queue holds every message not yet delivered. The window: bytes [_rstart,
    # _rend) of _rbuf are a copy (a peek) of the head of that queue, nothing in it consumed.
    cdef char *_rbuf
    cdef Py_ssize_t _rcap
    cdef Py_ssize_t _rstart
    cdef Py_ssize_t _rend
    # A process this one cannot see may receive from the socket (a handover): the window is
    # forgotten at every receive.
    cdef bint _shared
    # The ledger: [0] the bytes delivered from the socket (returned in messages), [1] how many of
    # them are still in the socket, not yet discarded (see _deliver). In _own_ledger until a
    # fork, then in memory shared with the child, so that every process with a copy of this
    # channel can tell whether another received since it last did ([0] moved: the window is
    # forgotten) and discard what another delivered.
    cdef uint64_t _own_ledger[2]
    cdef uint64_t *_ledger
    cdef uint64_t _consumed_seen    # [0] as this channel last left it
    cdef bint _look_small          # another process received since: peek PEEK_SIZE_SHARED
    cdef bint _queue_empty         # the last look found nothing queued: wait before peeking
    cdef bint _peek_saw_all        # the last peek returned less than it asked: all of the queue
    # Head mode (rare): the first _head_have bytes of a frame's head (header, size table) were
    # consumed into _rbuf because only part of it had arrived; the rest is read as it arrives.
    cdef Py_ssize_t _head_have
    cdef bint _last_recv_was_empty  # a direct read came back short: wait before the next one
    cdef bint _sent_since_recv     # sent since the last receive: a wait for data busy-polls
    cdef bint _streaming           # the last message was queued when looked for: nap first
    cdef bint _spin_peeked         # a busy-poll filled the window just now (see _wait)
    cdef object _deferred_handshake  # a Handshake whose rest runs at first use, or None

    # A payload that was not all queued is read straight into its final objects (allocated
    # before its head was consumed). While it is incomplete (a timeout interrupted it) it is
    # kept here, so that the next receive resumes it and the stream stays whole.
    cdef object _pending            # list of the message's parts (bytes/bytearray), or None
    cdef object _pending_sizes      # their final sizes while they grow as bytes arrive, or None
    cdef Py_ssize_t _pending_received  # bytes of the message's payload received so far
    cdef Py_ssize_t _pending_part   # index of the part being filled
    cdef Py_ssize_t _pending_filled  # bytes of that part already received
    cdef int _pending_kind          # frame kind of the message

    # The unsent tail of a frame whose send timed out part-way; sent before any later frame.
    cdef object _send_rest          # bytes, or None
    cdef Py_ssize_t _send_rest_sent  # how much of _send_rest has gone out since

    cdef int _blocked               # syscalls under way on _fd (_enter_fd() in base.pxi)
    cdef lf_socket_t _deferred_close_fd  # closed by the last of them, after close() shut it down
    # batch(): small frames gather here and go out many per send().
    cdef int _batch_depth           # open batch() blocks
    cdef char *_batch_buf
    cdef Py_ssize_t _batch_len
    cdef Py_ssize_t _batch_cap
    cdef char *_sbuf                # scratch space where a small frame is assembled for one send()
    cdef PyThread_type_lock _send_lock  # one sender at a time: frames never interleave
    cdef PyThread_type_lock _recv_lock  # one receiver at a time: each gets whole messages
    cdef lf_head _head              # the head _next_head() checked last
    cdef object _reading_stopped    # why receiving stopped (recv_bytes' maxlength), or None
    cdef object __weakref__

    cdef int _drop_receive_state(self) except -1
    cdef int _check_readable(self) except -1
    cdef int _check_writable(self) except -1
    cdef int _wait(self, short events, int64_t deadline, Py_ssize_t peek_size=*) except -1
    cdef int _finish_handshake(self, int64_t deadline) except -1
    cdef int _check_handshake_now(self) except -1
    cdef int _discard(self, char *at, Py_ssize_t n) except -1
    cdef int _count_consumed(self, Py_ssize_t n) except -1
    cdef int _flush_discards(self) except -1
    cdef int _protocol_error(self, str message) except -1


cdef class _SendPath(_ChannelBase):
    cdef int _unlock_send(self) except -1
    cdef int _flush_rest(self, int64_t deadline) except -1
    cdef int _flush_pending_sends(self, int64_t deadline) except -1
    cdef int _reserve_batch(self, Py_ssize_t extra) except -1
    cdef int _flush_batch(self, int64_t deadline) except -1
    cdef Py_ssize_t _unsent(self)
    cdef int _end_batch(self, object timeout) except -1
    cdef int _send_object(self, object data, list buffers, int64_t deadline) except -1
    cdef int _send_buffer(self, int kind, object obj, Py_ssize_t offset, object size_obj,
                          int64_t deadline) except -1
    cdef int _send_all(self, lf_iovec *iov, int count, Py_ssize_t total,
                       int64_t deadline, Py_ssize_t *progress=*) except -1
    cdef int _send_frame(self, int kind, const char *data, Py_ssize_t size,
                         int64_t deadline) except -1


cdef class _ReceivePath(_SendPath):
    cdef int _begin_receive(self, int64_t deadline) except -1
    cdef Py_ssize_t _peek(self, Py_ssize_t size) except -2
    cdef int _know(self, Py_ssize_t need, int64_t deadline) except -1
    cdef bint _await_data(self, int64_t deadline, Py_ssize_t peek_size) except -1
    cdef int _after_consume(self) except -1
    cdef int _deliver(self, Py_ssize_t n) except -1
    cdef int _settle(self) except -1
    cdef bint _window_valid(self) noexcept
    cdef Py_ssize_t _recv_some(self, char *dst, Py_ssize_t size, int64_t deadline) except -1
    cdef Py_ssize_t _recv_some_v(self, lf_iovec *iov, int count, Py_ssize_t total,
                                 int64_t deadline) except -1
    cdef str _head_problem(self, const unsigned char *h, const lf_head *head)
    cdef int _checked_head(self, const unsigned char *h, Py_ssize_t avail, bint objects,
                           lf_head *head) except -1
    cdef int _next_head(self, int64_t deadline, bint objects) except -1
    cdef int _read_head(self, Py_ssize_t size, int64_t deadline) except -1
    cdef object _take_frame(self, int64_t deadline, bint consumed)
    cdef int _consume_head(self, bint consumed) except -1
    cdef int _start_pending(self, list parts, int kind, object sizes) except -1
    cdef int _reserve(self) except -1
    cdef Py_ssize_t _pending_size(self, Py_ssize_t i)
    cdef object _finish_pending(self, int64_t deadline)
    cdef int _refuse_object(self) except -1
    cdef object _recv_bytes_frame(self, int64_t deadline, Py_ssize_t maxlength)
    cdef _bad_message_length(self, Py_ssize_t maxlength, uint64_t length)


cdef class Channel(_ReceivePath):
    pass
