"""asyncio channels: loopfast messages from coroutines, without threads.

::

    import loopfast.aio

    async def client(address, key):
        async with await loopfast.aio.open_channel(address, authkey=key) as channel:
            await channel.send({"op": "ping"})
            print(await channel.recv())

    async def server(key):
        async with await loopfast.aio.start_listener(authkey=key) as listener:
            print("listening on", listener.address)
            channel = await listener.accept()
            async for message in channel:          # ends when the peer closes
                await channel.send(message)

``AsyncChannel(channel)`` wraps any existing `loopfast.Channel` (for example the parent's end of a
``Pipe()`` whose other end a child process uses synchronously); the wire protocol is the same, so
a sync peer and an async peer talk to each other.

How it works: every operation is the core channel's own call with ``timeout=0`` (a nonblocking
attempt that never spins and keeps the stream intact when it raises TimeoutError), retried after
the event loop's ``add_reader`` / ``add_writer`` callback says the socket is ready. So the frames
are encoded and parsed by the core, in its receive buffer, as for the sync API; there is no thread
and no second protocol implementation. It needs an event loop with ``add_reader``: the default
loop on Linux and macOS, uvloop, or ``asyncio.SelectorEventLoop`` on Windows (the Proactor loop
has no ``add_reader``).

Guarantees:

- Cancellation never splits a message. A cancelled receive leaves what arrived of a message in
  the core's buffer, and the next receive returns that message whole. A cancelled send either
  sent nothing (it had not started: the peer never sees the message) or its frame had started, and
  then the rest still goes out: a drain task owned by the channel writes it, and the next send
  (and ``aclose()``) waits for that first. If the connection fails while the rest is being
  written, the channel is closed and every later call raises OSError saying so.
- Backpressure: a send waits (``add_writer``) while the socket's buffer is full. Nothing is
  buffered in Python beyond the unsent rest of the one frame being written (held by the core).
- Concurrent senders on one channel are serialized (first come, first served), so frames never
  interleave; so are concurrent receivers (each gets whole messages, in arrival order).

An `AsyncChannel` belongs to the event loop that first uses it. Close it with ``aclose()`` or
``close()``, not through ``.channel.close()`` (its socket stays registered with the loop between
receives), and do not use ``.channel`` from other threads while coroutines use it.

Channels made here (`open_channel`, `Listener`) have ``spin=0``, where the synchronous API's
default is ``spin=None`` (the process's busy-poll budget, `loopfast.set_default_spin`): the
asyncio calls never wait in the core (the event loop waits), and a busy-poll there would stall
every other task of the loop, so the budget would only matter to synchronous use of
``.channel``. The other defaults are the synchronous API's (backlog 100, for both).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Coroutine,
    Deque,
    Dict,
    Iterable,
    List,
    Optional,
    Tuple,
    Type,
    TypeVar,
)

from ._address import check_peer, listening_socket, resolve
from ._backend import Channel
from ._handshake import CONNECTOR, LISTENER, Handshake, check_authkey
from ._peer import AllowUsers, allowed_users
from ._wire import (
    ACCEPT_BURST,
    ACCEPT_PAUSE,
    DEFAULT_BACKLOG,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    OUT_OF_RESOURCES,
)
from .connection import Address, Serializer

if TYPE_CHECKING:
    from ._core.channel import Buffer  # what the buffer protocol accepts (see the stub)

__all__ = ["AsyncChannel", "Listener", "open_channel", "start_listener"]

_T = TypeVar("_T")
_SelfChannel = TypeVar("_SelfChannel", bound="AsyncChannel")

class _Readiness:
    """Waits for one file descriptor to become readable or writable, through the event loop's
    add_reader/add_writer (level-triggered).

    Reading: the reader stays registered after it woke a waiter, so that a receive after a
    receive (the usual case) costs no epoll_ctl() in and out; a callback that finds nobody
    waiting unregisters it. A callback can be stale (the loop's select() saw data that the woken
    task has consumed since): the waiter it wakes then makes one attempt that finds nothing and
    waits again. (Checking with poll() in the callback instead measured ~0.8 us slower per round
    trip: with a prompt peer, the next reply has usually arrived by then.) Writing (rare: only
    when the socket is full): registered per wait. `close()` unregisters and wakes every waiter.
    """

    __slots__ = ("_fd", "_loop", "_readers", "_reading", "_writers", "closed")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._readers: List[asyncio.Future[None]] = []
        self._writers: List[asyncio.Future[None]] = []
        self._reading = False  # the reader callback is registered
        self.closed = False

    def reader(self) -> asyncio.Future[None]:
        """A future that the next readable callback completes (await it; if the await raises,
        call forget_reader()). Plain methods, not a coroutine: this is the hot path."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
        self._readers.append(fut)
        return fut

    def forget_reader(self, fut: asyncio.Future[None]) -> None:
        if fut in self._readers:  # not woken (cancelled): the next callback unregisters
            self._readers.remove(fut)

    async def readable(self) -> None:
        """Return once the descriptor is readable (or closed: the caller checks)."""
        fut = self.reader()
        try:
            await fut
        except BaseException:
            self.forget_reader(fut)
            raise

    async def writable(self) -> None:
        """Return once the descriptor is writable (or closed: the caller checks)."""
        loop = self._loop
        fut: asyncio.Future[None] = loop.create_future()
        waiters = self._writers
        if not waiters:
            loop.add_writer(self._fd, self._on_writable)
        waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._writers:  # not woken (cancelled): unregister if it was the last
                self._writers.remove(fut)
                if not self._writers and not self.closed:
                    loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        waiters = self._readers
        if not waiters:
            self._loop.remove_reader(self._fd)
            self._reading = False
            return
        self._readers = []
        _wake(waiters)

    def _on_writable(self) -> None:
        self._loop.remove_writer(self._fd)
        waiters, self._writers = self._writers, []
        _wake(waiters)

    def close(self) -> None:
        """Unregister (before the descriptor is closed) and wake every waiter."""
        if self.closed:
            return
        self.closed = True
        loop = self._loop
        if not loop.is_closed():
            for registered, remove in ((self._reading, loop.remove_reader),
                                       (bool(self._writers), loop.remove_writer)):
                if registered:
                    try:
                        remove(self._fd)
                    except (OSError, ValueError):  # the core already closed the descriptor
                        pass
        self._reading = False
        readers, writers = self._readers, self._writers
        self._readers, self._writers = [], []
        _wake(readers + writers)


def _wake(waiters: List[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)


class _Gate:
    """A first-come first-served mutex for the coroutines of one loop: taking it when it is free
    is setting a flag (asyncio.Lock's ``async with`` costs about 1.3 us a pair here, twice per
    round trip). Released with waiters, it passes straight to the first of them."""

    __slots__ = ("_waiters", "busy")

    def __init__(self) -> None:
        self.busy = False
        self._waiters: Deque[asyncio.Future[None]] = collections.deque()

    async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until the gate is passed to this caller (call only when it is busy)."""
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed over just as this caller was cancelled: pass it on
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # still busy: now this waiter's
                return
        self.busy = False


def _running_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.get_running_loop()
    if not hasattr(loop, "add_reader"):  # pragma: no cover - not a selector-based loop
        raise RuntimeError(f"loopfast.aio needs an event loop with add_reader(), not {loop!r} "
                           "(on Windows use asyncio.SelectorEventLoop)")
    return loop


class AsyncChannel:
    """An asyncio view of a `loopfast.Channel`: the same messages, awaited instead of blocked on.

    ``AsyncChannel(channel)`` takes over `channel` (closing the AsyncChannel closes it). Get one
    from `open_channel()` or `Listener.accept()`, or wrap a channel you have, such as one end of
    ``loopfast.Pipe()``. Every method that waits is a coroutine; bound any of them with
    ``asyncio.wait_for`` (cancelling one never splits a message, see the module docstring).

    ``async for message in channel`` receives objects until the peer closes the connection;
    ``async with channel`` closes it at the end (``aclose()``).
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._fd = channel.fileno()  # OSError for a closed channel
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready: Optional[_Readiness] = None
        self._send_gate = _Gate()  # one sender at a time: frames never interleave
        self._recv_gate = _Gate()  # one receiver at a time: each gets whole messages
        self._drain: Optional[asyncio.Task[None]] = None
        self._error: Optional[BaseException] = None  # why this side closed the channel
        self._closed = False

    # ---- plumbing -------------------------------------------------------------------------------

    def _bind(self) -> _Readiness:
        """The readiness waiter of the running loop (made on first use, in that loop)."""
        loop = _running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                raise RuntimeError("this AsyncChannel is used by another event loop than the "
                                   "one that first used it")
            self._loop = loop
            self._ready = _Readiness(loop, self._fd)
        assert self._ready is not None
        return self._ready

    def _closed_error(self) -> OSError:
        if self._error is not None:
            err = OSError(f"the channel was closed: {self._error}")
            err.__cause__ = self._error
            return err
        return OSError("handle is closed")

    async def _socket_ready(self, writable: bool = False) -> None:
        """Wait until the socket is readable (or, with `writable`, has room)."""
        if self._closed or self._channel.closed:
            raise self._closed_error()
        ready = self._ready or self._bind()
        await (ready.writable() if writable else ready.readable())
        if self._closed:
            raise OSError("handle is closed (by aclose() or close(), while this call waited)")

    def _after_error(self) -> None:
        """The core closed the channel (ProtocolError, connection lost): unregister too."""
        if self._channel.closed and not self._closed:
            self.close()

    # ---- receiving ------------------------------------------------------------------------------

    async def _receive(self, attempt: Callable[..., _T], *args: Any) -> _T:
        """One receive: `attempt(*args, timeout=0)` (a core receive method), retried each time the
        socket becomes readable. A cancelled wait leaves what arrived of a message in the core's
        buffer, where the next receive resumes it."""
        if self._closed:
            raise self._closed_error()
        readiness = self._ready or self._bind()
        gate = self._recv_gate
        if gate.busy:
            assert self._loop is not None
            await gate.wait(self._loop)
        else:
            gate.busy = True
        try:
            ch = self._channel
            # A whole message already buffered: no wait and no syscall. (A channel that cannot
            # read: the core raises the error.) Otherwise the first attempt is made only once the
            # socket is readable: a would-block attempt costs a poll() and an exception.
            ready = ch._has_message() or not ch.readable
            while True:
                if ready:
                    try:
                        return attempt(*args, timeout=0)
                    except TimeoutError:
                        pass  # a partial message: it stays in the core, resumed next time
                    except BaseException:
                        self._after_error()
                        raise
                # Wait for the socket (inlined self._socket_ready(): no coroutine per wait).
                if self._closed or ch.closed:
                    raise self._closed_error()
                fut = readiness.reader()
                try:
                    await fut
                except BaseException:
                    readiness.forget_reader(fut)
                    raise
                if self._closed:
                    raise OSError("handle is closed (by aclose() or close(), while this call "
                                  "waited)")
                ready = True
        finally:
            gate.release()

    def recv_bytes(self, maxlength: Optional[int] = None) -> Coroutine[Any, Any, bytes]:
        """Coroutine: receive one message sent with send_bytes() and return its payload as bytes.

        EOFError when the peer closed the connection between messages, ProtocolError when it
        vanished in the middle of one or sent garbage (the channel is then closed), OSError when
        the message is longer than `maxlength` (and the channel stops reading)."""
        return self._receive(self._channel.recv_bytes, maxlength)

    def recv(self) -> Coroutine[Any, Any, Any]:
        """Coroutine: receive one object sent with send() (unpickled: only talk to peers you
        trust)."""
        return self._receive(self._channel.recv)

    def recv_bytes_into(self, buf: Buffer, offset: int = 0) -> Coroutine[Any, Any, int]:
        """Coroutine: receive one message into the writable buffer `buf` from `offset` on; return
        its size. BufferTooShort (with the whole message as args[0]) if it does not fit."""
        return self._receive(self._channel.recv_bytes_into, buf, offset)

    def recv_bytes_many(self, max_messages: Optional[int] = None) -> Coroutine[Any, Any,
                                                                                List[bytes]]:
        """Coroutine: wait for the next message, then return it with every further whole message
        already received (up to `max_messages`), as a list of bytes (Channel.recv_bytes_many)."""
        return self._receive(self._channel.recv_bytes_many, max_messages)

    async def poll(self, timeout: Optional[float] = 0.0) -> bool:
        """Whether there is something to receive, waiting up to `timeout` seconds (None: until
        there is). Never consumes anything."""
        if self._channel.poll(0):
            return True
        if timeout is not None and timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._socket_ready(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def __aiter__(self: _SelfChannel) -> _SelfChannel:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.recv()
        except EOFError:
            raise StopAsyncIteration from None

    # ---- sending --------------------------------------------------------------------------------

    async def _send(self, attempt: Callable[..., None], *args: Any) -> None:
        """One send: `attempt(*args, timeout=0)` (a core send method). Would-block with nothing
        sent: retried once the socket is writable (cancelling then sends nothing). Would-block
        after part of the frame went out: the core holds the rest, and a drain task writes it."""
        if self._closed:
            raise self._closed_error()
        self._ready or self._bind()
        gate = self._send_gate
        if gate.busy:
            assert self._loop is not None
            await gate.wait(self._loop)
        else:
            gate.busy = True
        try:
            ch = self._channel
            if self._drain is not None or ch.unsent_bytes:
                await self._flush_queued()  # so that unsent_bytes == 0 tells "nothing sent"
            while True:
                try:
                    attempt(*args, timeout=0)
                    return
                except TimeoutError:
                    if ch.unsent_bytes:
                        break  # the frame started: its rest is queued in the core
                except BaseException:
                    self._after_error()
                    raise
                await self._socket_ready(writable=True)  # nothing went out: retry when room
            await self._flush_queued()
        finally:
            gate.release()

    def send_bytes(self, buf: Buffer, offset: int = 0,
                   size: Optional[int] = None) -> Coroutine[Any, Any, None]:
        """Coroutine: send the bytes of a buffer-protocol object (bytes, bytearray, memoryview,
        numpy) as one message; `offset` and `size` in bytes. Waits while the socket is full.
        Do not modify `buf` until the send has returned."""
        return self._send(self._channel.send_bytes, buf, offset, size)

    def send_bytes_many(self, buffers: Iterable[Buffer]) -> Coroutine[Any, Any, None]:
        """Coroutine: send every buffer as its own message, in as few writes as possible
        (Channel.send_bytes_many). Waits while the socket is full; the messages go out together:
        a cancelled call sent none of them, or all of them go out."""
        return self._send(self._channel.send_bytes_many, list(buffers))

    def send(self, obj: Any) -> Coroutine[Any, Any, None]:
        """Coroutine: send a picklable object as one message (pickle protocol 5 with out-of-band
        buffers, as Channel.send). If the socket is full at the first try, the object is pickled
        again once there is room."""
        return self._send(self._channel.send, obj)

    async def _flush_queued(self) -> None:
        """Wait until what the core holds queued (the rest of a started frame) is written. The
        writing is done by a task of this channel, so that it goes on if the caller is cancelled."""
        task = self._drain
        if task is None:
            loop = self._loop
            assert loop is not None
            task = self._drain = loop.create_task(self._drain_queued())
        await asyncio.shield(task)
        if self._closed or self._channel.closed:
            raise self._closed_error()

    async def _drain_queued(self) -> None:
        ch = self._channel
        try:
            while True:
                try:
                    ch.flush(timeout=0)
                    return
                except TimeoutError:
                    pass
                await self._socket_ready(writable=True)
        except asyncio.CancelledError:
            raise  # the loop is shutting down: the rest stays queued in the core
        except BaseException as exc:
            # The connection failed (or was closed) with part of a frame on the wire.
            if not self._closed:
                self._error = OSError(f"the connection failed while the rest of a started "
                                      f"message was being written ({exc!r})")
                self._error.__cause__ = exc
                self.close()
        finally:
            self._drain = None

    # ---- closing --------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the channel, once the rest of a started message (if any) has gone out.

        A receive or send waiting on this channel raises OSError. If aclose() itself is
        cancelled (or bounded with wait_for) before the rest is out, the channel is closed
        anyway and the peer sees the connection end in the middle of that message."""
        try:
            task = self._drain
            if task is not None and not self._closed:
                await asyncio.shield(task)
        finally:
            self.close()

    def close(self) -> None:
        """Close the channel now (without waiting for the rest of a started message: prefer
        aclose()). Coroutines waiting on it wake up and raise OSError."""
        if self._closed:
            return
        self._closed = True
        if self._ready is not None:
            self._ready.close()
        self._channel.close()

    @property
    def closed(self) -> bool:
        """True once the channel is closed (by this side, or by the core after a ProtocolError)."""
        return self._closed or self._channel.closed

    @property
    def channel(self) -> Channel:
        """The underlying sync `Channel` (do not use it while coroutines use this object)."""
        return self._channel

    def fileno(self) -> int:
        """The socket's file descriptor."""
        return self._channel.fileno()

    async def __aenter__(self: _SelfChannel) -> _SelfChannel:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<loopfast.aio.AsyncChannel {self._channel!r}>"


# ---- the handshake, driven from the event loop ---------------------------------------------------

async def _handshake(side: Handshake, achannel: AsyncChannel,
                     timeout: Optional[float]) -> None:
    """The loopfast handshake, the sync one's steps (_handshake.Handshake.advance: nonblocking,
    each read resumed where it stopped) run whenever the socket has something new, so that
    nothing blocks the loop."""

    async def steps() -> None:
        while not side.advance():
            await achannel._socket_ready()

    try:
        await _bounded(steps(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError("the peer did not complete the loopfast handshake in time") from None


async def _bounded(awaitable: Any, timeout: Optional[float]) -> Any:
    if timeout is None:
        return await awaitable
    return await asyncio.wait_for(awaitable, max(0.0, timeout))


# ---- connecting -------------------------------------------------------------------------------

async def open_channel(
    address: Address,
    *,
    authkey: Optional[bytes] = None,
    family: Optional[str] = None,
    max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
    handshake_timeout: Optional[float] = DEFAULT_HANDSHAKE_TIMEOUT,
    serializer: Optional[Serializer] = None,
    spin: Optional[float] = 0,
    allow_users: AllowUsers = None,
) -> AsyncChannel:
    """Connect to a loopfast Listener (sync or asyncio) at a loopback (host, port) and return an
    AsyncChannel. The connection and the handshake (authentication with `authkey`) run on the
    event loop, no thread; `handshake_timeout` bounds both (TimeoutError).

    Addresses are checked as by loopfast.Client: anything that is not loopback is refused
    (ValueError) before a socket is made. AuthenticationError if the keys differ, or if the
    listener's socket belongs to another user than this one (or `allow_users`: a collection of
    uids, or 'any').
    `spin` is the underlying channel's (unused by the asyncio calls, which never wait in the core;
    it matters only if you use `.channel` synchronously)."""
    check_authkey(authkey)
    allowed = allowed_users(allow_users)
    fam, sockaddr = resolve(address, family)
    loop = _running_loop()
    start = time.monotonic()
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            await _bounded(loop.sock_connect(sock, sockaddr), handshake_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"timed out connecting to {address!r}") from None
        channel = Channel(sock.fileno(), max_message_size=max_message_size,
                          serializer=serializer, spin=spin)
    except BaseException:
        sock.close()
        raise
    sock.detach()
    achannel = AsyncChannel(channel)
    remaining = (None if handshake_timeout is None
                 else handshake_timeout - (time.monotonic() - start))
    try:
        side = Handshake(channel, authkey, CONNECTOR, remaining, allowed)
        side.check_peer_user(wait=False)  # else when the listener's first bytes arrive
        await _handshake(side, achannel, remaining)
    except BaseException:
        achannel.close()
        raise
    return achannel


class Listener:
    """A listening socket on a loopback address that hands out AsyncChannels.

    ``Listener(address=None, family=None, backlog=100, authkey=None, *, max_message_size,
    handshake_timeout, serializer, spin)`` binds at once (as loopfast.Listener: loopback only;
    the default address is ('127.0.0.1', 0), or ('::1', 0) with family='AF_INET6'); the
    coroutine `start_listener()` does the same. ``await accept()`` waits for a client, runs the
    handshake (AuthenticationError if the keys differ, TimeoutError after `handshake_timeout`)
    on the event loop and returns its AsyncChannel. Use as ``async with`` (or ``with``), or
    call `close()`.
    """

    def __init__(
        self,
        address: Optional[Address] = None,
        family: Optional[str] = None,
        backlog: int = DEFAULT_BACKLOG,
        authkey: Optional[bytes] = None,
        *,
        max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
        handshake_timeout: Optional[float] = DEFAULT_HANDSHAKE_TIMEOUT,
        serializer: Optional[Serializer] = None,
        spin: Optional[float] = 0,
        allow_users: AllowUsers = None,
    ) -> None:
        check_authkey(authkey)
        self._allowed = allowed_users(allow_users)
        sock = listening_socket(address, family, backlog)
        self._address: Tuple[str, int] = sock.getsockname()[:2]
        self._sock: Optional[socket.socket] = sock
        self._authkey = authkey
        self._handshake_timeout = handshake_timeout
        self._options: Dict[str, Any] = {
            "max_message_size": max_message_size, "serializer": serializer, "spin": spin}
        self._ready: Optional[_Readiness] = None
        self._last_accepted: Optional[Tuple[str, int]] = None
        # Handshakes under way (see accept()): task (giving the channel and the peer's address)
        # -> the channel it handshakes.
        self._handshakes: Dict[asyncio.Future[Tuple[AsyncChannel, Tuple[str, int]]],
                               AsyncChannel] = {}
        # Handshake tasks that have ended, in order, not yet reported by accept(); the future
        # an accept() waiting is woken by; the end of a pause in accepting (EMFILE).
        self._finished: Deque[asyncio.Future[Tuple[AsyncChannel, Tuple[str, int]]]] = \
            collections.deque()
        self._wake: Optional[asyncio.Future[None]] = None
        self._paused_until: Optional[float] = None

    async def accept(self) -> AsyncChannel:
        """Wait for a client, run the handshake (and authentication) and return its channel.

        Handshakes run side by side, each in a task of this listener: while one client is
        silent or slow, the connections behind it are accepted and handshaken, and the first to
        finish is returned. A failed handshake raises here (AuthenticationError, ProtocolError,
        TimeoutError after `handshake_timeout`); the others carry on for the next call."""
        if self._sock is None:
            raise OSError("listener is closed")
        if self._ready is None:
            self._ready = _Readiness(_running_loop(), self._sock.fileno())
        loop = _running_loop()
        while True:
            if self._finished:
                task = self._finished.popleft()
                if self._handshakes.pop(task, None) is None:
                    continue  # closed meanwhile
                achannel, peer = task.result()  # raises what the handshake raised
                self._last_accepted = peer
                return achannel
            now = loop.time()
            if self._paused_until is not None and now >= self._paused_until:
                self._paused_until = None
            if self._paused_until is None:
                self._accept_waiting()
                if self._finished:
                    continue
            # Wait for a new connection (unless accepting is paused), a handshake that ends,
            # or the end of the pause: a wake-up costs the same however many are pending.
            wake = self._wake = loop.create_future()
            waiting: List[asyncio.Future[Any]] = [wake]
            readable = None
            if self._paused_until is None:
                readable = self._ready.reader()
                waiting.append(readable)
            try:
                await asyncio.wait(
                    waiting, return_when=asyncio.FIRST_COMPLETED,
                    timeout=None if self._paused_until is None else self._paused_until - now)
            finally:
                self._wake = None
                wake.cancel()
                if readable is not None:
                    self._ready.forget_reader(readable)
            if self._sock is None:
                raise OSError("listener is closed (while accept() waited)")

    def _handshake_ended(self, task: asyncio.Future[Any]) -> None:
        self._finished.append(task)
        self._paused_until = None  # a failed one freed a descriptor; a good one may follow
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _accept_waiting(self) -> None:
        """Accept the connections waiting in the backlog (ACCEPT_BURST at most); start a
        handshake task for each. Out of descriptors (EMFILE), accepting pauses for a moment,
        while the handshakes under way go on."""
        sock = self._sock
        assert sock is not None
        for _ in range(ACCEPT_BURST):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._paused_until = _running_loop().time() + ACCEPT_PAUSE
                    return
                raise
            try:
                check_peer(peer)
                channel = Channel(conn.fileno(), **self._options)
            except BaseException:
                conn.close()
                raise
            conn.detach()
            achannel = AsyncChannel(channel)
            side = Handshake(channel, self._authkey, LISTENER, self._handshake_timeout,
                             self._allowed)
            task = asyncio.ensure_future(self._handshake(side, achannel, peer[:2]))
            self._handshakes[task] = achannel
            task.add_done_callback(self._handshake_ended)

    async def _handshake(self, side: Handshake, achannel: AsyncChannel,
                         peer: Tuple[str, int]) -> Tuple[AsyncChannel, Tuple[str, int]]:
        try:
            side.check_peer_user()  # before anything the peer sent is read
            await _handshake(side, achannel, self._handshake_timeout)
        except BaseException:
            self._last_accepted = peer  # as multiprocessing: set for a failed client too
            achannel.close()
            raise
        return achannel, peer

    def close(self) -> None:
        """Stop listening; a pending accept() raises OSError. Accepted channels stay open;
        connections whose handshake had not finished are closed."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._ready is not None:
            self._ready.close()
        sock.close()
        handshakes, self._handshakes = self._handshakes, {}
        for task, achannel in handshakes.items():
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failed one is not reported as never retrieved
            else:
                try:
                    task.cancel()
                except RuntimeError:  # its event loop is closed already
                    pass
            achannel.close()  # handshaken and never handed out, or never to finish

    @property
    def address(self) -> Tuple[str, int]:
        """The (host, port) the listener is bound to."""
        return self._address

    @property
    def last_accepted(self) -> Optional[Tuple[str, int]]:
        """The (host, port) of the last accepted client, or None."""
        return self._last_accepted

    @property
    def closed(self) -> bool:
        """True once the listener is closed: it accepts no more connections."""
        return self._sock is None

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"address={self.address!r}"
        return f"<loopfast.aio.Listener {state}>"


async def start_listener(
    address: Optional[Address] = None,
    *,
    authkey: Optional[bytes] = None,
    family: Optional[str] = None,
    backlog: int = DEFAULT_BACKLOG,
    max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
    handshake_timeout: Optional[float] = DEFAULT_HANDSHAKE_TIMEOUT,
    serializer: Optional[Serializer] = None,
    spin: Optional[float] = 0,
    allow_users: AllowUsers = None,
) -> Listener:
    """Bind a `Listener` on a loopback address (default ('127.0.0.1', 0): read the port from
    `.address`) and return it; ``await listener.accept()`` for each client (of this user, or of
    `allow_users`, as loopfast.Listener)."""
    _running_loop()
    return Listener(address, family, backlog, authkey, max_message_size=max_message_size,
                    handshake_timeout=handshake_timeout, serializer=serializer, spin=spin,
                    allow_users=allow_users)
