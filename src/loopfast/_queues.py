"""multiprocessing's queues on loopfast channels: how objects move through them.

multiprocessing.queues.Queue (and JoinableQueue, and concurrent.futures' call queue, which is a
subclass) keeps what put() is given in a buffer that a feeder thread pickles and writes, one
send_bytes() per object, at the default pickle protocol, and get() unpickles what recv_bytes()
returns. On a loopfast pipe (a queue made by a loopfast context, or while install() is on), this
module changes how, never what:

- put() after a pause (DIRECT_PUT_IDLE_NS without a put) pickles in the caller, at protocol 5,
  and a small object (no out-of-band buffer, at most DIRECT_PUT_SIZE bytes) is written at once,
  without waking the feeder, when the feeder has nothing queued, no other process holds the
  queue's write lock and the socket has room. Puts in a burst go to the feeder. A write
  the socket takes only part of keeps the write lock and leaves the rest to the feeder, which
  writes it before anything else and then lets the lock go: put() never blocks on a full pipe.
- Everything else goes through the feeder, as in multiprocessing: an object with out-of-band
  buffers (a numpy array) with Channel.send(), written from its own memory; small objects that
  piled up while it was busy in one gather write (send_bytes_many()).
- get() is Channel.recv(): it unpickles both, and receives an out-of-band buffer straight into
  its final memory.
- An object that cannot be pickled takes multiprocessing's path: the feeder tries, fails,
  releases its slot and calls the queue's _on_queue_feeder_error(exc, obj) (concurrent.futures
  sets the future's exception there; the default prints the traceback).

SimpleQueue (Pool's task and result queues, concurrent.futures' result queue) has no feeder:
its put() is Channel.send() under the write lock, its get() Channel.recv() under the read lock.

Queue.put/get, JoinableQueue.put, Queue._feed and SimpleQueue.put/get are replaced by functions
that take this path only for a queue whose buffer is a _FeedBuffer (which _reset gives queues on a
loopfast pipe, also after a fork and in a child that unpickled the queue) and run multiprocessing's
own code for every other queue. Names and semantics otherwise stay multiprocessing's (close(),
join_thread(), cancel_join_thread(), qsize(), empty(), maxsize and Full/Empty).
"""

import collections
import errno
import io
import time
from multiprocessing import queues as _queues_module
from multiprocessing.reduction import ForkingPickler as _ForkingPickler
from multiprocessing.util import info, is_exiting
from queue import Empty, Full
from time import monotonic_ns as _monotonic_ns
from typing import Any, List, Optional, Tuple

from ._backend import CHANNEL_TYPES

# multiprocessing's private names this module reads and replaces (the same from 3.9 to 3.13),
# untyped: typeshed does not declare them.
_mp_queues: Any = _queues_module
ForkingPickler: Any = _ForkingPickler

# A pickle at most this large is written by put() itself when the socket has room; larger ones
# go to the feeder (whose blocking write does not hold up the caller).
DIRECT_PUT_SIZE = 64 * 1024
# put() writes itself only after the queue was this long without a put (ns): a lone put (a task
# handed to an idle pool, a request after the last reply came back) goes out at once, without a
# thread switch; puts in a burst (a few µs apart) go to the feeder, which writes what piled up in
# one gather write (one system call, and one wake-up of the reader, for many messages).
DIRECT_PUT_IDLE_NS = 15_000
# The feeder writes at most this many piled-up messages per gather write.
FEED_BATCH = 256

_stock_reset = _mp_queues.Queue._reset
_stock_put = _mp_queues.Queue.put
_stock_get = _mp_queues.Queue.get
_stock_joinable_put = _mp_queues.JoinableQueue.put
_stock_feed = _mp_queues.Queue._feed
_stock_simple_queue_get = _mp_queues.SimpleQueue.get
_stock_simple_queue_put = _mp_queues.SimpleQueue.put


class _FeedBuffer(collections.deque):  # type: ignore[type-arg]
    """The buffer of a queue on a loopfast pipe. `busy` (guarded by the queue's _notempty) is
    true while the feeder holds objects it took from the buffer and has not written yet: put()
    must not write past them. `last_put`: when put() was last called (time.monotonic_ns)."""

    busy = False
    last_put = 0

    def __init__(self) -> None:
        super().__init__()
        self.dumper = _Dumper()


class _Flush:
    """Put in the buffer by a put() whose write went out only in part: the feeder writes the
    rest (it is kept by the channel) and then releases the write lock that put() kept."""


_FLUSH = _Flush()


class _Dumper:
    """multiprocessing's pickler (ForkingPickler: its reducers for connections, sockets, ...)
    at protocol 5, collecting out-of-band buffers, kept from one object to the next (making one
    costs more than pickling a small object). Not thread-safe: put() uses its queue's under
    _notempty, the feeder thread its own."""

    __slots__ = ("_buffers", "_out", "_pickler", "_reducers")

    def __init__(self) -> None:
        self._pickler: Any = None

    def _new(self) -> None:
        self._out = io.BytesIO()
        self._buffers: List[Any] = []
        self._pickler = ForkingPickler(self._out, 5, True, self._buffers.append)
        # A pickler copies the registered reducers when it is made: one registered since is
        # seen by a new one.
        self._reducers = len(ForkingPickler._extra_reducers)

    def dumps(self, obj: Any) -> Tuple[Any, List[Any]]:
        """(pickle, out-of-band buffers as PickleBuffers). Raises what pickling raises."""
        if self._pickler is None or self._reducers != len(ForkingPickler._extra_reducers):
            self._new()
        out = self._out
        try:
            self._pickler.dump(obj)
        except BaseException:
            for view in self._buffers:
                view.release()
            self._pickler = None  # a fresh one next time, whatever state this one is in
            raise
        buffers = self._buffers[:]
        self._buffers.clear()
        self._pickler.clear_memo()
        data: Any
        if out.tell() <= DIRECT_PUT_SIZE:
            data = out.getvalue()
            out.seek(0)
            out.truncate()
        else:  # a large pickle is not copied: it keeps this pickler's memory, a new one follows
            data = out.getbuffer()
            self._pickler = None
        return data, buffers


def _release(data: Any, buffers: List[Any]) -> None:
    for view in buffers:
        view.release()
    if isinstance(data, memoryview):
        data.release()


# ---- put ---------------------------------------------------------------------------------

class _Pickled:
    """An object that put() pickled but could not write at once: the feeder writes the pickle."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data


def _enqueue(queue: Any, obj: Any) -> None:
    """Hand `obj` on, with queue._notempty held and a slot of queue._sem taken."""
    buffer = queue._buffer
    if queue._thread is None:
        queue._start_thread()
    now = _monotonic_ns()
    idle = now - buffer.last_put > DIRECT_PUT_IDLE_NS
    buffer.last_put = now
    if not idle:
        buffer.append(obj)  # the feeder pickles it
        queue._notempty.notify()
        return
    try:
        data, buffers = buffer.dumper.dumps(obj)
    except Exception:
        # The feeder tries again and reports it to _on_queue_feeder_error, as multiprocessing's.
        item = obj
    else:
        if buffers:
            # Out-of-band buffers: the feeder sends the object from their own memory.
            _release(data, buffers)
            item = obj
        elif (not buffer and not buffer.busy and len(data) <= DIRECT_PUT_SIZE
                and _write_now(queue, data)):
            return
        else:
            item = _Pickled(data)
    buffer.append(item)
    queue._notempty.notify()


def _write_now(queue: Any, data: Any) -> bool:
    """Write one pickle without blocking; False if it must go through the feeder instead."""
    wlock = queue._wlock
    if not wlock.acquire(False):
        return False  # another process is writing: the feeder waits for it, not the caller
    writer = queue._writer
    try:
        writer.send_bytes(data, timeout=0)
    except TimeoutError:
        if writer.unsent_bytes:
            # Part of it went out: the rest must follow before any other process writes, so
            # the lock stays taken until the feeder has written it.
            queue._buffer.append(_FLUSH)
            queue._notempty.notify()
            return True
        wlock.release()
        return False
    except BaseException:
        wlock.release()
        raise
    wlock.release()
    return True


def _queue_put(self: Any, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
    if type(self._buffer) is not _FeedBuffer:
        _stock_put(self, obj, block, timeout)
        return
    if self._closed:
        raise ValueError(f"Queue {self!r} is closed")
    if not self._sem.acquire(block, timeout):
        raise Full
    with self._notempty:
        _enqueue(self, obj)


def _joinable_queue_put(self: Any, obj: Any, block: bool = True,
                        timeout: Optional[float] = None) -> None:
    if type(self._buffer) is not _FeedBuffer:
        _stock_joinable_put(self, obj, block, timeout)
        return
    if self._closed:
        raise ValueError(f"Queue {self!r} is closed")
    if not self._sem.acquire(block, timeout):
        raise Full
    with self._notempty, self._cond:
        self._unfinished_tasks.release()
        _enqueue(self, obj)


# ---- get ---------------------------------------------------------------------------------

def _queue_get(self: Any, block: bool = True, timeout: Optional[float] = None) -> Any:
    if type(self._buffer) is not _FeedBuffer:
        return _stock_get(self, block, timeout)
    if self._closed:
        raise ValueError(f"Queue {self!r} is closed")
    reader = self._reader
    if block and timeout is None:
        with self._rlock:
            obj = reader.recv()
        self._sem.release()
        return obj
    if block:
        deadline = time.monotonic() + timeout  # type: ignore[operator]
    if not self._rlock.acquire(block, timeout):
        raise Empty
    try:
        if block:
            if not reader.poll(max(0.0, deadline - time.monotonic())):
                raise Empty
        elif not reader.poll():
            raise Empty
        obj = reader.recv()
        self._sem.release()
    finally:
        self._rlock.release()
    return obj


# ---- SimpleQueue ----------------------------------------------------------------------------

def _simple_queue_get(self: Any) -> Any:
    reader = self._reader
    if type(reader) not in CHANNEL_TYPES:
        return _stock_simple_queue_get(self)
    # recv(), not recv_bytes(): Pool's task handler writes to this pipe with send(), which
    # puts an object's large buffers out of band.
    with self._rlock:
        return reader.recv()


def _simple_queue_put(self: Any, obj: Any) -> None:
    writer = self._writer
    if type(writer) not in CHANNEL_TYPES:
        _stock_simple_queue_put(self, obj)
        return
    with self._wlock:
        writer.send(obj)


# ---- the feeder thread -------------------------------------------------------------------

def _feed(buffer: Any, notempty: Any, send_bytes: Any, writelock: Any, reader_close: Any,
          writer_close: Any, ignore_epipe: bool, onerror: Any, queue_sem: Any) -> None:
    """Queue._feed's replacement (Queue._start_thread starts it with these arguments): the
    loopfast feeder for a _FeedBuffer, multiprocessing's own for any other buffer."""
    if type(buffer) is not _FeedBuffer:
        _stock_feed(buffer, notempty, send_bytes, writelock, reader_close, writer_close,
                    ignore_epipe, onerror, queue_sem)
        return
    feeder = _Feeder(send_bytes.__self__, writelock, ignore_epipe, onerror, queue_sem)
    sentinel = _mp_queues._sentinel
    popleft = buffer.popleft
    while True:
        if not buffer:
            with notempty:
                while not buffer:
                    buffer.busy = False  # everything taken is written: put() may write
                    notempty.wait()
                buffer.busy = True  # before the first object leaves the buffer
        # The lock is taken only when the buffer is empty, as in multiprocessing's feeder:
        # taking it per batch makes put() and the feeder queue up behind each other.
        try:
            while buffer:
                item = popleft()
                if item is sentinel:
                    feeder.write_pending()
                    reader_close()
                    writer_close()
                    return
                feeder.take(item)
            feeder.write_pending()
        except _Stop:
            return
        finally:
            feeder.drop_pending()
            item = None


class _Stop(Exception):
    """The feeder must end (EPIPE on a queue that ignores it, or the process is exiting)."""


class _Feeder:
    """What the feeder thread writes, and multiprocessing's feeder's error path for it."""

    def __init__(self, writer: Any, writelock: Any, ignore_epipe: bool, onerror: Any,
                 queue_sem: Any) -> None:
        self.writer = writer
        self.writelock = writelock
        self.ignore_epipe = ignore_epipe
        self.onerror = onerror
        self.queue_sem = queue_sem
        self.pending: List[Any] = []  # pickles of small objects, written together
        self.dumper = _Dumper()

    def take(self, item: Any) -> None:
        if item is _FLUSH:
            # put() kept the write lock for this rest: write it first, then let the lock go.
            self.write_pending()
            try:
                self.send(self.writer.flush, [])
            finally:
                self.writelock.release()
            return
        if type(item) is _Pickled:
            data = item.data
        else:
            obj = item
            try:
                data, buffers = self.dumper.dumps(obj)
            except Exception as exc:
                self.write_pending()
                self.queue_sem.release()
                self.onerror(exc, obj)
                return
            if buffers:
                pickled = bytes(data)  # the in-band part, small: what a failed write reports
                _release(data, buffers)
                self.write_pending()
                with self.writelock:
                    # Pickled again by send(), whose write is from the buffers' own memory.
                    self.send(lambda: self.writer.send(obj), [pickled])
                return
        self.pending.append(data)
        if len(self.pending) >= FEED_BATCH:
            self.write_pending()

    def write_pending(self) -> None:
        pending = self.pending
        if not pending:
            return
        writer = self.writer
        with self.writelock:
            if len(pending) == 1:
                self.send(lambda: writer.send_bytes(pending[0]), pending)
            else:
                self.send(lambda: writer.send_bytes_many(pending), pending)
        self.drop_pending()

    def drop_pending(self) -> None:
        for data in self.pending:
            if isinstance(data, memoryview):
                data.release()
        self.pending.clear()

    def send(self, send: Any, pickles: List[Any]) -> None:
        """EPIPE ends a queue that ignores it; while the process exits, an error is logged and
        ends the feeder; otherwise every message not written gives its slot back and is reported
        to onerror(exc, pickle), as multiprocessing's feeder does: a write error reports the
        pickle, not the object (only a pickling error reports the object; concurrent.futures
        fails the future there, and must not for a write error: it holds a lock the feeder
        would wait for while the pool is torn down)."""
        try:
            send()
        except Exception as exc:
            if self.ignore_epipe and getattr(exc, "errno", 0) == errno.EPIPE:
                raise _Stop() from exc
            if is_exiting():
                info("error in queue thread: %s", exc)
                raise _Stop() from exc
            for pickle in list(pickles):
                self.queue_sem.release()
                self.onerror(exc, pickle)


# ---- hooks ---------------------------------------------------------------------------------

def _queue_reset(self: Any, after_fork: bool = False) -> None:
    _stock_reset(self, after_fork)
    if type(self._writer) in CHANNEL_TYPES:
        self._buffer = _FeedBuffer()


def hook() -> None:
    """Give multiprocessing's Queue and JoinableQueue the loopfast path (idempotent; every
    queue that is not on a loopfast pipe keeps running multiprocessing's own code)."""
    _mp_queues.Queue._reset = _queue_reset
    _mp_queues.Queue.put = _queue_put
    _mp_queues.Queue.get = _queue_get
    _mp_queues.Queue._feed = staticmethod(_feed)
    _mp_queues.JoinableQueue.put = _joinable_queue_put
    _mp_queues.SimpleQueue.get = _simple_queue_get
    _mp_queues.SimpleQueue.put = _simple_queue_put
