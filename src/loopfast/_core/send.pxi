# The send path: small frames assembled and sent with one send(), large ones with one gather
# write, batches, and the unsent rest of an interrupted send kept whole. Included by channel.pyx.

cdef class _SendPath(_ChannelBase):
    """The send half of a Channel."""

    cdef int _unlock_send(self) except -1:
        """Release the send lock; a channel closed meanwhile (close() cannot take this lock while
        a send holds it) lets go of the unsent rest of a frame first."""
        if self._fd == LF_INVALID_SOCKET:
            self._send_rest = None
        PyThread_release_lock(self._send_lock)
        return 0

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
            if full:
                n = -1  # wait for room first rather than make a write that would fail
            elif total - sent > RELEASE_GIL_SIZE:
                _enter_fd(self, &fd)
                with nogil:
                    n = _write(fd, iov, count)
                    err = lf_last_error()
                _leave_fd(self)
            else:
                _enter_fd_held(self, &fd)
                n = _write(fd, iov, count)
                err = lf_last_error()
                _leave_fd_held(self)
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
                        raise TimeoutError(
                            _messages.TIMED_OUT_SEND if sent == 0
                            else _messages.TIMED_OUT_SENDING.format(sent=sent, total=total))
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
            raise TimeoutError(_messages.TIMED_OUT_EARLIER.format(
                sent=progress, total=PyBytes_GET_SIZE(rest) - done)) from None
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
            self._unlock_send()

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
            self._unlock_send()
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
                self._unlock_send()
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
                self._unlock_send()
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
                self._unlock_send()
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
