# The state of a channel and what both directions need: the socket, its locks, waiting for it
# (busy-poll, then poll()), the handshake still to finish, and the ledger of delivered bytes
# still to discard. Included by channel.pyx; the fields are declared in channel.pxd.

# ---- using the socket: the one protocol that makes close() safe from any thread ----------------
#
# Every syscall on a channel's _fd runs between _enter_fd() and _leave_fd(), which count it in
# _blocked. close() takes _fd away and, while any such call is under way, shuts the socket down
# (which wakes a thread asleep in poll()) instead of closing it: the last call to leave closes
# it. So a descriptor is never closed under a syscall, and its number never reused under one.
# The two touch _fd, _blocked and _deferred_close_fd inside a critical section on the channel:
# free-threaded, another thread's close() runs truly at the same time; with the GIL (which the
# section then compiles away to nothing) the GIL alone orders them.
#
# A syscall made with the GIL held (a small send, a peek) uses _enter_fd_held() and
# _leave_fd_held() instead: with the GIL, no close() can run until it returns, so they only
# read _fd; free-threaded, they are the pair above.

cdef inline int _enter_fd(_ChannelBase ch, lf_socket_t *fd) except -1:
    """Before a syscall on the socket: its descriptor into *fd, counted in _blocked; OSError if
    the channel is closed."""
    cdef bint closed
    with cython.critical_section(ch):
        fd[0] = ch._fd
        closed = fd[0] == LF_INVALID_SOCKET
        if not closed:
            ch._blocked += 1
    if closed:
        raise OSError("handle is closed")
    return 0


cdef inline int _leave_fd(_ChannelBase ch) except -1:
    """After the syscall: raises OSError if the channel was closed meanwhile, closing the socket
    if this was the last call on it."""
    cdef lf_socket_t deferred = LF_INVALID_SOCKET
    cdef bint closed
    with cython.critical_section(ch):
        ch._blocked -= 1
        closed = ch._fd == LF_INVALID_SOCKET
        if closed and ch._blocked == 0:
            deferred = ch._deferred_close_fd
            ch._deferred_close_fd = LF_INVALID_SOCKET
    if deferred != LF_INVALID_SOCKET:
        lf_close(deferred)
    if closed:
        raise OSError(_messages.CLOSED_WHILE_WAITING)
    return 0


cdef inline int _enter_fd_held(_ChannelBase ch, lf_socket_t *fd) except -1:
    """_enter_fd() for a syscall made without releasing the GIL."""
    if LF_FREE_THREADED:
        return _enter_fd(ch, fd)
    fd[0] = ch._fd
    if fd[0] == LF_INVALID_SOCKET:
        raise OSError("handle is closed")
    return 0


cdef inline int _leave_fd_held(_ChannelBase ch) except -1:
    """_leave_fd() after a syscall made without releasing the GIL."""
    if LF_FREE_THREADED:
        return _leave_fd(ch)
    return 0


cdef class _ChannelBase:
    """A channel's state and the waiting, locking and handshake both of its paths use
    (Channel is the class to use)."""

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

    cdef int _drop_receive_state(self) except -1:
        """A closed channel lets go of a half-received message and its window (the receive
        lock is held)."""
        self._pending = self._pending_sizes = None
        self._deferred_handshake = None
        self._rstart = self._rend = self._head_have = 0
        return 0

    cdef int _check_readable(self) except -1:
        if self._fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        if not self._readable:
            raise OSError(self._reading_stopped or _messages.WRITE_ONLY)
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
        cdef int timeout_ms, rc, err, skip
        cdef short revents = 0
        cdef char *peek_buf = NULL
        cdef Py_ssize_t peeked = -1
        cdef int peek_error = 0
        cdef lf_socket_t fd = self._fd
        cdef int64_t spin_ns = self._spin_ns if self._spin_ns >= 0 else _default_spin_ns
        if fd == LF_INVALID_SOCKET:
            raise OSError("handle is closed")
        # Spin only where a reply is awaited (this channel sent since its last receive), or for
        # room to send: a receiver of a stream that spins takes each message alone as it
        # arrives, which costs the stream more than a sleeping receiver's wake-ups.
        if spin_ns > 0 and deadline != 0 and (events != LF_POLLIN or self._sent_since_recv):
            skip = lf_relaxed_load_int(&self._spin_skip)
            if skip > 0:
                lf_relaxed_store_int(&self._spin_skip, skip - 1)
            else:
                # Bounded busy-polling: a sleeping receiver costs ~25 us of kernel wake-up per hop
                # on loopback, so check readiness (never read: poll() must not consume) in a
                # tight loop with the GIL released, up to the spin budget; then sleep in poll().
                if peek_size > 0:
                    self._flush_discards()  # a look must start at the first byte not delivered
                    self._rstart = self._rend = 0
                    peek_buf = self._rbuf
                    peek_size = min(peek_size, self._rcap)
                _enter_fd(self, &fd)
                with nogil:
                    started = lf_monotonic_ns()
                    rc = _spin_until_ready(fd, events, spin_ns, deadline, peek_buf,
                                           <size_t>peek_size, &peeked, &peek_error)
                    # Both directions spin: an atomic add, as no lock covers both.
                    lf_counter_add(&self._spun_ns, <uint64_t>(lf_monotonic_ns() - started))
                _leave_fd(self)
                if peek_error != 0:
                    _raise_os_error(peek_error)  # ConnectionResetError, as the read would have
                if peeked >= 0:
                    self._rstart = 0
                    self._rend = peeked
                    self._peek_saw_all = peeked < peek_size
                    self._spin_peeked = True
                if rc > 0 and rc != SPIN_READY_SHARED:
                    lf_relaxed_store_int(&self._spin_backoff, 0)
                    return 0
                if rc == SPIN_READY_SHARED or rc == SPIN_CONTENDED:
                    # The peer shares this CPU: sleep instead for the next waits (8, 16, ... up
                    # to 1024 of them), then try spinning again in case it moved.
                    skip = min(max(8, 2 * lf_relaxed_load_int(&self._spin_backoff)), 1024)
                    lf_relaxed_store_int(&self._spin_backoff, skip)
                    lf_relaxed_store_int(&self._spin_skip, skip)
                    if rc == SPIN_READY_SHARED:
                        return 0
                # A signal that arrived while spinning interrupted no syscall: run its handler
                # now (Ctrl-C raises here), or the blocking wait below would sleep through it.
                PyErr_CheckSignals()
        while True:
            if deadline < 0:
                timeout_ms = -1
            else:
                remaining = deadline - lf_monotonic_ns()
                if remaining <= 0:
                    timeout_ms = 0
                else:  # round up: never return before the deadline
                    timeout_ms = <int>min((remaining + 999999) // 1000000, 0x7fffffff)
            _enter_fd(self, &fd)
            with nogil:
                rc = lf_poll(fd, events, timeout_ms, &revents)
                err = lf_last_error()
            _leave_fd(self)
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

    cdef int _count_consumed(self, Py_ssize_t n) except -1:
        """Record `n` bytes received straight from the socket (a payload, a head, handshake
        bytes) in the ledger."""
        with cython.critical_section(self):  # the fork handler may be moving the ledger
            self._consumed_seen = lf_counter_add(self._ledger, <uint64_t>n)
        return 0

    cdef int _flush_discards(self) except -1:
        """Discard from the socket the bytes delivered and not yet discarded (_deliver)."""
        cdef uint64_t undiscarded = 0
        cdef Py_ssize_t n, chunk
        # The usual case, nothing to discard, needs no lock: a look at either ledger (the fork
        # handler copies the counts before it switches) tells the truth.
        if lf_counter_load(self._ledger + 1) == 0:
            return 0
        with cython.critical_section(self):  # the fork handler may be moving the ledger
            if self._fd != LF_INVALID_SOCKET:
                undiscarded = lf_counter_load(self._ledger + 1)
                if undiscarded:
                    lf_counter_add(self._ledger + 1, <uint64_t>0 - undiscarded)
        if undiscarded == 0:
            return 0
        n = <Py_ssize_t>undiscarded
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
                raise TimeoutError(_messages.TIMED_OUT_WAITING)

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

    cdef int _discard(self, char *at, Py_ssize_t n) except -1:
        """Consume `n` bytes known (peeked) to be queued, whose copy is at `at`."""
        cdef Py_ssize_t got
        cdef int err
        cdef lf_socket_t fd
        while n > 0:
            _enter_fd_held(self, &fd)
            got = lf_discard(fd, at, <size_t>n)
            err = lf_last_error()
            _leave_fd_held(self)
            if got > 0:
                n -= got
                at += got
                continue
            if got < 0 and lf_error_interrupted(err):
                continue  # nothing was consumed; the bytes are still queued
            if got < 0 and lf_error_would_block(err):
                self._protocol_error("bytes this channel had seen queued were taken by someone "
                                     "else (another process receiving without a lock?)")
            self._protocol_error(_messages.LOST_MID_MESSAGE
                                 + ("" if got == 0 else f" ({_os_error_text(err)})"))
        return 0
