# The receive path: the window over the socket's queue (peek), frame heads, taking exactly the
# frames returned, and payloads read straight into their final objects. Included by channel.pyx.

cdef class _ReceivePath(_SendPath):
    """The receive half of a Channel."""

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

    cdef int _deliver(self, Py_ssize_t n) except -1:
        """The next `n` bytes of the window are delivered (their messages returned). They are
        discarded from the socket later, in one syscall for many messages (_flush_discards):
        before the next look at the socket or read from it, and at the end of the call that
        delivered the last message known to be queued, so that between calls the socket holds
        delivered bytes only while it also holds a whole message not yet delivered (its
        readiness stays the truth), and the ledger says how many, for a process that shares
        the socket to discard them first."""
        with cython.critical_section(self):  # the fork handler may be moving the ledger
            self._consumed_seen = lf_counter_add(self._ledger, <uint64_t>n)
            lf_counter_add(self._ledger + 1, <uint64_t>n)
        self._rstart += n
        return 0

    cdef int _settle(self) except -1:
        """End of a receive call: discard the delivered bytes unless a whole message not yet
        delivered is known to follow them (then the socket is readable anyway, and the next
        receive discards them with its own)."""
        cdef Py_ssize_t avail = self._rend - self._rstart
        cdef const unsigned char *h = <const unsigned char *>(self._rbuf + self._rstart)
        cdef lf_head head
        if self._fd == LF_INVALID_SOCKET:  # closed meanwhile (close() cannot take this lock)
            return self._drop_receive_state()
        if lf_counter_load(self._ledger + 1) == 0:
            return 0
        if self._shared:  # a process we cannot see may receive next: it must find none
            return self._flush_discards()
        if _parse_head(h, avail, self._max_message_size, &head) == HEAD_OK \
                and <Py_ssize_t>head.length <= avail - HEADER_SIZE:
            return 0
        return self._flush_discards()

    cdef Py_ssize_t _peek(self, Py_ssize_t size) except -2:
        """Copy up to `size` queued bytes to the start of the window, consuming nothing. Returns
        how many (> 0), 0 at the end of the stream, -1 when nothing is queued."""
        cdef Py_ssize_t n
        cdef int err
        cdef lf_socket_t fd
        self._flush_discards()  # a look must start at the first byte not delivered
        if size > self._rcap:
            size = self._rcap
        while True:
            _enter_fd_held(self, &fd)
            n = lf_peek(fd, self._rbuf, <size_t>size)
            err = lf_last_error()
            _leave_fd_held(self)
            if n >= 0:
                self._rstart = 0
                self._rend = n
                self._peek_saw_all = n < size
                return n
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
                raise EOFError(_messages.PEER_CLOSED)
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
            raise TimeoutError(_messages.TIMED_OUT_WAITING)
        return True

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
            if self._last_recv_was_empty:
                # The last read came back short: the socket is drained, wait before reading.
                if self._wait(LF_POLLIN, deadline):
                    raise TimeoutError(_messages.TIMED_OUT_MID_MESSAGE)
            _enter_fd(self, &fd)
            with nogil:
                if count == 1:
                    n = lf_recv(fd, <char *>iov[0].base, iov[0].len)
                else:
                    n = lf_recvv(fd, iov, count)
                err = lf_last_error()
            _leave_fd(self)
            if n > 0:
                self._count_consumed(n)
                self._last_recv_was_empty = n < total
                return n
            if n == 0:
                self._protocol_error(_messages.PEER_CLOSED_MID_MESSAGE)
            if lf_error_would_block(err):
                self._last_recv_was_empty = True
            elif lf_error_interrupted(err):
                PyErr_CheckSignals()
            else:
                self._protocol_error(
                    _messages.LOST_MID_MESSAGE + f" ({_os_error_text(err)})")

    cdef str _head_problem(self, const unsigned char *h, const lf_head *head):
        """What is wrong with the bad frame head at `h` that _parse_head() found."""
        if head.problem == BAD_HEADER:
            return _messages.MALFORMED_HEADER.format(header=(<bytes>h[:HEADER_SIZE]).hex())
        if head.problem == BAD_OOB_COUNT:
            return _messages.TOO_MANY_BUFFERS.format(count=head.count, most=MAX_OOB_BUFFERS,
                                                     length=head.length)
        if head.problem == BAD_OVER_LIMIT:
            return _messages.OVER_LIMIT.format(length=head.length,
                                               limit=self._max_message_size_obj)
        if head.problem == BAD_OVER_MACHINE:
            return _messages.OVER_MACHINE.format(length=head.length)
        return _messages.PARTS_DO_NOT_ADD_UP.format(parts=head.count + 1, length=head.length)

    cdef int _checked_head(self, const unsigned char *h, Py_ssize_t avail, bint objects,
                           lf_head *head) except -1:
        """_parse_head(), with a bad head raised (ProtocolError, the channel closes) and an
        object message refused when not `objects` (OSError, from its header alone: then only
        the header is parsed, a frame of another kind having no more). Returns the status."""
        cdef int status = _parse_head(h, avail if objects else min(avail, HEADER_SIZE),
                                      self._max_message_size, head)
        if status == HEAD_BAD:
            self._protocol_error(self._head_problem(h, head))
        if head.kind == KIND_OBJECT and not objects:
            self._refuse_object()
        return status

    cdef int _next_head(self, int64_t deadline, bint objects) except -1:
        """Wait for the next frame's head (its header and, for an object message, its size
        table), check it (a bad one closes the channel: ProtocolError, before anything is
        allocated; an object message when not `objects`: OSError from the header alone, the
        message left in place), keep it in _head, and return 0 when it is in the window at
        _rstart, not consumed (the usual case), or 1 when it was consumed into
        _rbuf[0:_head_have] because it arrived in pieces (a consumed head stays there until its
        payload has been allocated)."""
        cdef const unsigned char *h
        cdef Py_ssize_t have
        cdef lf_head head
        cdef int status
        while True:
            if self._head_have > 0:
                self._read_head(HEADER_SIZE, deadline)
                h = <const unsigned char *>self._rbuf
                status = self._checked_head(h, self._head_have, objects, &head)
                if status == HEAD_MORE:
                    self._read_head(head.size, deadline)
                    self._checked_head(h, self._head_have, objects, &head)
                self._head = head
                return 1
            if self._know(HEADER_SIZE, deadline) == 0:
                h = <const unsigned char *>(self._rbuf + self._rstart)
                status = self._checked_head(h, self._rend - self._rstart, objects, &head)
                if status == HEAD_OK or self._know(head.size, deadline) == 0:
                    if status == HEAD_MORE:
                        h = <const unsigned char *>(self._rbuf + self._rstart)  # a peek moves it
                        self._checked_head(h, self._rend - self._rstart, objects, &head)
                    self._head = head
                    return 0
            # Only part of the head is queued: take it, and read the rest as it arrives.
            have = self._rend - self._rstart
            self._flush_discards()
            memmove(self._rbuf, self._rbuf + self._rstart, have)
            self._rstart = self._rend = 0
            self._discard(self._rbuf, have)
            self._count_consumed(have)
            self._head_have = have
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
        cdef Py_ssize_t length = <Py_ssize_t>self._head.length
        cdef int kind = self._head.kind
        cdef object out
        if not consumed and HEADER_SIZE + length <= self._rend - self._rstart:
            if kind == KIND_OBJECT:
                out = _object_parts(h)
                _copy_parts(out, <const char *>h + self._head.size)
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
            head_size = self._head.size
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
        raise OSError(_messages.OBJECT_NEEDS_RECV)

    cdef _bad_message_length(self, Py_ssize_t maxlength, uint64_t length):
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
                self._bad_message_length(maxlength, self._pending_size(0))
            return self._finish_pending(deadline)[0]
        consumed = self._next_head(deadline, False)
        if maxlength >= 0 and <Py_ssize_t>self._head.length > maxlength:
            self._bad_message_length(maxlength, self._head.length)
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
        cdef lf_head head
        cdef list out
        cdef bint short_of_memory = False
        self._check_readable()
        if max_messages is not None:
            if max_messages < 1:
                raise ValueError(_messages.BAD_MAX_MESSAGES)
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
                while limit < 0 or taken < limit:
                    h = <const unsigned char *>(self._rbuf + pos)
                    if _parse_head(h, self._rend - pos, self._max_message_size, &head) != HEAD_OK \
                            or head.kind == KIND_OBJECT:
                        break  # an object message, a bad header, or more to come: next call
                    length = <Py_ssize_t>head.length
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
                kind = self._head.kind
                length = <Py_ssize_t>self._head.length
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
        return lf_counter_load(&self._spun_ns) / 1e9

    def _awaits_reply(self):
        """True if this channel sent since its last receive (its waits for data busy-poll)."""
        return self._sent_since_recv

    def _has_message(self):
        """True if a whole message (or a malformed header) is known to be queued (no syscall)."""
        cdef Py_ssize_t avail = self._rend - self._rstart
        cdef const unsigned char *h = <const unsigned char *>(self._rbuf + self._rstart)
        cdef lf_head head
        cdef int status
        if self._fd == LF_INVALID_SOCKET or avail < HEADER_SIZE or self._pending is not None \
                or self._head_have > 0 or not self._window_valid():
            return False
        status = _parse_head(h, avail, self._max_message_size, &head)
        # A malformed head is ready: the receive will raise the ProtocolError.
        return status == HEAD_BAD or (status == HEAD_OK
                                      and <Py_ssize_t>head.length <= avail - HEADER_SIZE)

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
        cdef lf_socket_t fd
        while True:
            _enter_fd_held(self, &fd)
            n = lf_recv(fd, PyBytes_AS_STRING(out), <size_t>max_size)
            err = lf_last_error()
            _leave_fd_held(self)
            if n > 0:
                self._count_consumed(n)
                return out if n == max_size else out[:n]
            if n == 0:
                raise EOFError(_messages.PEER_CLOSED)
            if lf_error_would_block(err):
                if self._wait(LF_POLLIN, deadline):
                    raise TimeoutError(_messages.TIMED_OUT_WAITING)
            elif lf_error_interrupted(err):
                PyErr_CheckSignals()
            else:
                _raise_os_error(err)
