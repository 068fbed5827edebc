"""The public API: a drop-in superset of ``multiprocessing.connection``.

``Pipe``, ``Listener``, ``Client`` and ``wait`` have multiprocessing's names, signatures and
semantics; ``Channel`` plays the part of ``multiprocessing.connection.Connection`` (also exported
under that name). Differences are listed in README.md ("Migrating from multiprocessing").
"""

import collections
import multiprocessing.connection
import os
import select
import selectors
import socket
import threading
import time
from types import TracebackType
from typing import Any, Deque, Dict, Iterable, List, Optional, Protocol, Tuple, Type, Union

from ._address import check_peer, family_from_name, listening_socket, resolve
from ._backend import CHANNEL_TYPES, Channel
from ._errors import AuthenticationError, BufferTooShort, ProtocolError
from ._handshake import (
    CONNECTOR,
    LISTENER,
    Handshake,
    check_authkey,
    handshake_pair,
    run_handshake,
)
from ._peer import AllowUsers, allowed_users
from ._spin import channel_spin
from ._wire import (
    ACCEPT_BURST,
    ACCEPT_PAUSE,
    DEFAULT_BACKLOG,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    OUT_OF_RESOURCES,
)

__all__ = [
    "AuthenticationError",
    "BufferTooShort",
    "Channel",
    "Client",
    "Connection",
    "Listener",
    "Pipe",
    "ProtocolError",
    "wait",
]

# multiprocessing.connection's name for what its Pipe, Client and Listener.accept() return.
Connection = Channel

EXPIRY_BATCH = 0.01  # handshakes that expire this close together are closed (and reported) as one
_WAKE_UP = object()  # a Listener's selector key for the socket that close() writes to
Address = Union[Tuple[str, int], Tuple[str, int, int, int]]


class Serializer(Protocol):
    """What `serializer=` takes: msgspec's msgpack module, cloudpickle, or an object of yours."""

    def dumps(self, obj: Any, /) -> Any: ...

    def loads(self, data: bytes, /) -> Any: ...


def _drain(sock: socket.socket) -> None:
    """Read a nonblocking socket's queued bytes (a listener's wake-ups)."""
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


class Listener:
    """A listening socket on a loopback address that hands out channels to clients of the same
    user (and, with an `authkey`, only to clients that prove they know it).

    ``Listener(address=None, family=None, backlog=100, authkey=None)``: the default address is
    ``('127.0.0.1', 0)``, or ``('::1', 0)`` with ``family='AF_INET6'`` (port 0: the system picks
    a free port; read it from ``.address``). The backlog is the asyncio Listener's too, and
    asyncio's: room for a burst of connects (multiprocessing's is 1, which makes a burst wait
    for the kernel's SYN retries, a second each).

    Any local process can connect to a loopback port, so each connection's peer is identified
    at accept(), before a byte it sent is read: by default a client whose socket belongs to
    another user is refused (AuthenticationError naming both users), which is the guarantee
    multiprocessing's default Listener (a Unix socket in a private directory) gives.
    `allow_users` widens it: a collection of uids (this user is always allowed), or ``'any'``
    for any local user (then only an `authkey` keeps other users out). With an `authkey`, every
    client must also prove it knows the same key before any message is delivered: only then is
    the channel authenticated.
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
        spin: Optional[float] = None,
        allow_users: AllowUsers = None,
    ) -> None:
        check_authkey(authkey)
        self._allowed = allowed_users(allow_users)
        sock = listening_socket(address, family, backlog)
        self._socket: Optional[socket.socket] = sock
        self._family = sock.family
        self._address: Tuple[str, int] = sock.getsockname()[:2]
        self._authkey = authkey
        self._handshake_timeout = handshake_timeout
        self._options: Dict[str, Any] = {
            "max_message_size": max_message_size, "serializer": serializer, "spin": spin}
        self._last_accepted: Optional[Tuple[str, int]] = None
        # Connections accepted whose handshake is under way -> their peers' addresses, in the
        # order they were accepted, which is the order of their deadlines (one timeout for all).
        self._handshakes: Dict[Handshake, Tuple[str, int]] = {}
        # Handshakes finished, and failed, not yet reported by accept(): (channel or exception,
        # peer). A completed handshake is returned before a failure is raised.
        self._done: Deque[Tuple[Channel, Tuple[str, int]]] = collections.deque()
        self._failed: Deque[Tuple[BaseException, Tuple[str, int]]] = collections.deque()
        # One selector for the listener's life (made at the first accept()): the listening
        # socket and every handshake's socket stay registered, so a wake-up costs what happened,
        # not how many connections are pending.
        self._selector: Optional[selectors.BaseSelector] = None
        self._paused_until: Optional[float] = None  # out of descriptors: accepting waits
        # One accept() at a time, and close() waits for it to leave. Reentrant: a signal handler
        # may close the listener its own thread is accepting on (accept() then raises).
        self._accepting = threading.RLock()
        # close() from another thread: it sets _closed, then writes a byte to the second socket
        # of this pair (made with the selector, the first registered in it) to wake the accept()
        # asleep in select(); accept() makes the pair, then checks _closed, so one of them sees
        # the other.
        self._closed = False
        self._wake_up: Optional[Tuple[socket.socket, socket.socket]] = None

    def accept(self) -> Channel:
        """Wait for a client, run the handshake (and authentication) and return its Channel.

        Handshakes run side by side: while one client is silent or slow, the connections behind
        it are accepted and their handshakes go on, and the first to finish is returned (a
        client that never sends a hello holds up no one; after `handshake_timeout` its
        connection is closed and accept() raises TimeoutError). A handshake that fails raises
        here (AuthenticationError, ProtocolError, TimeoutError), as multiprocessing's accept()
        does; the handshakes still under way wait for the next call.

        Expired handshakes are closed whatever else happens, and when the process runs out of
        descriptors (EMFILE) accepting pauses for a moment (or until a descriptor is freed)
        instead of retrying at once: the handshakes under way go on meanwhile."""
        with self._accepting:
            while True:
                if self._done:
                    channel, self._last_accepted = self._done.popleft()
                    return channel
                if self._failed:
                    # As multiprocessing: last_accepted is set for a failed client too.
                    error, self._last_accepted = self._failed.popleft()
                    raise error
                if self._closed or self._socket is None:
                    raise OSError("listener is closed")
                try:
                    self._wait_and_handle()
                except (OSError, ValueError):
                    if self._socket is None:  # closed by another thread while this one waited
                        raise OSError("listener is closed") from None
                    raise

    def _wait_and_handle(self) -> None:
        """Wait for events (a new connection, handshake bytes, a deadline, the end of a pause)
        and handle them: finished or failed handshakes go to _done and _failed."""
        assert self._socket is not None
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._socket, selectors.EVENT_READ, None)
            self._wake_up = socket.socketpair()
            for sock in self._wake_up:
                sock.setblocking(False)
            self._selector.register(self._wake_up[0], selectors.EVENT_READ, _WAKE_UP)
            if self._closed:  # close() came before the pair: it wrote to nothing
                return
        now = time.monotonic()
        self._expire(now + EXPIRY_BATCH)
        if self._paused_until is not None and now >= self._paused_until:
            self._resume_accepting()
        if self._done or self._failed:
            return
        timeout: Optional[float] = None
        first = next(iter(self._handshakes), None)  # the earliest deadline
        if first is not None and first.deadline is not None:
            timeout = max(0.0, first.deadline - now)
        if self._paused_until is not None:
            pause = max(0.0, self._paused_until - now)
            timeout = pause if timeout is None else min(timeout, pause)
        for key, _ in self._selector.select(timeout):
            if key.data is _WAKE_UP:
                _drain(key.fileobj)  # type: ignore[arg-type]
            elif key.data is None:
                self._accept_waiting()
            elif key.data in self._handshakes:
                self._advance(key.data)

    def _expire(self, now: float) -> None:
        expired = []
        for side in self._handshakes:  # in deadline order: stop at the first still running
            if side.deadline is None or side.deadline > now:
                break
            expired.append(side)
        for side in expired:
            peer = self._drop(side)
        if expired:
            what = ("the peer did not" if len(expired) == 1
                    else f"{len(expired)} peers did not")
            self._failed.append((TimeoutError(
                f"{what} complete the loopfast handshake in time "
                f"({self._handshake_timeout:g} s): disconnected"), peer))

    def _drop(self, side: Handshake) -> Tuple[str, int]:
        """Stop waiting on a handshake and close its connection; its peer's address."""
        assert self._selector is not None
        self._selector.unregister(side.channel.fileno())
        side.channel.close()
        self._resume_accepting()  # a descriptor is free again
        return self._handshakes.pop(side)

    def _advance(self, side: Handshake) -> None:
        try:
            done = side.advance()
        except BaseException as exc:
            peer = self._drop(side)
            if not isinstance(exc, Exception):  # KeyboardInterrupt and the like: at once
                self._last_accepted = peer
                raise
            self._failed.append((exc, peer))
            return
        if done:
            assert self._selector is not None
            self._selector.unregister(side.channel.fileno())
            self._done.append((side.channel, self._handshakes.pop(side)))

    def _accept_waiting(self) -> None:
        """Accept the connections waiting in the backlog (ACCEPT_BURST at most) and start
        their handshakes."""
        assert self._socket is not None and self._selector is not None
        for _ in range(ACCEPT_BURST):
            try:
                sock, peer = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._pause_accepting()
                    return
                raise
            try:
                check_peer(peer)
                channel = Channel(sock.fileno(), **self._options)
            except Exception as exc:
                sock.close()
                self._failed.append((exc, peer[:2]))
                continue
            sock.detach()
            side = Handshake(channel, self._authkey, LISTENER, self._handshake_timeout,
                             self._allowed)
            try:
                side.check_peer_user()  # before anything the peer sent is read
            except Exception as exc:
                channel.close()
                self._failed.append((exc, peer[:2]))
                continue
            self._handshakes[side] = peer[:2]
            self._selector.register(channel.fileno(), selectors.EVENT_READ, side)
            self._advance(side)  # send the hello; its own may be here already

    def _pause_accepting(self) -> None:
        if self._paused_until is None:
            assert self._selector is not None and self._socket is not None
            self._selector.unregister(self._socket)
        self._paused_until = time.monotonic() + ACCEPT_PAUSE

    def _resume_accepting(self) -> None:
        if self._paused_until is not None:
            self._paused_until = None
            if self._selector is not None and self._socket is not None:
                self._selector.register(self._socket, selectors.EVENT_READ, None)

    def close(self) -> None:
        """Stop listening. Channels already accepted stay open; connections whose handshake had
        not finished are closed. From another thread, it wakes an accept() under way, which
        raises OSError, and returns once that accept() has left."""
        self._closed = True
        wake_up = self._wake_up
        if wake_up is not None:
            try:
                wake_up[1].send(b"\0")
            except OSError:  # full (woken already), or closed by an earlier close()
                pass
        with self._accepting:
            self._close_now()

    def _close_now(self) -> None:
        sock, self._socket = self._socket, None
        selector, self._selector = self._selector, None
        wake_up, self._wake_up = self._wake_up, None
        if selector is not None:
            selector.close()
        if sock is not None:
            sock.close()
        for end in wake_up or ():
            end.close()
        handshakes, self._handshakes = self._handshakes, {}
        for side in handshakes:
            side.channel.close()
        while self._done:
            self._done.popleft()[0].close()
        self._failed.clear()

    @property
    def address(self) -> Tuple[str, int]:
        """The (host, port) the listener is bound to."""
        return self._address

    @property
    def last_accepted(self) -> Optional[Tuple[str, int]]:
        """The (host, port) of the last accepted client, or None."""
        return self._last_accepted

    def __enter__(self) -> "Listener":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._socket is None else f"address={self._address!r}"
        return f"<loopfast.Listener {state}>"


def connect(
    address: Address,
    *,
    family: Optional[str] = None,
    authkey: Optional[bytes] = None,
    timeout: Optional[float] = None,
    max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
    serializer: Optional[Serializer] = None,
    spin: Optional[float] = None,
    allow_users: AllowUsers = None,
) -> Channel:
    """Connect to a loopfast Listener at a loopback `address` and return a Channel.

    The listener's socket must belong to this user (or to one of `allow_users`; ``'any'``: any
    user), checked when its first bytes arrive, before they are read (AuthenticationError).

    `timeout` bounds the connection and, with an `authkey`, the handshake (default: the
    handshake timeout). Without an `authkey` this returns once connected, as multiprocessing's
    Client does: the listener's hello is checked at the channel's first use, which raises what
    the handshake found (ProtocolError, AuthenticationError) and delivers nothing before it
    succeeded. With an `authkey` the exchange needs both sides, so this waits for the
    listener's accept().
    """
    check_authkey(authkey)
    allowed = allowed_users(allow_users)
    fam, sockaddr = resolve(address, family)
    limit = DEFAULT_HANDSHAKE_TIMEOUT if timeout is None else timeout
    start = time.monotonic()
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.settimeout(limit)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    channel = Channel(sock.detach(), max_message_size=max_message_size, serializer=serializer,
                      spin=spin)
    remaining = max(0.0, limit - (time.monotonic() - start))
    side = Handshake(channel, authkey, CONNECTOR, None if authkey is None else remaining,
                     allowed)
    try:
        side.check_peer_user(wait=False)
        if authkey is None:
            side.start_deferred()
    except BaseException:
        channel.close()
        raise
    if authkey is None:
        channel._defer_handshake(side)
        return channel
    run_handshake(side)
    return channel


def Client(
    address: Address,
    family: Optional[str] = None,
    authkey: Optional[bytes] = None,
    *,
    max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
    timeout: Optional[float] = None,
    serializer: Optional[Serializer] = None,
    spin: Optional[float] = None,
    allow_users: AllowUsers = None,
) -> Channel:
    """Connect to a Listener at `address` and return a Channel (as multiprocessing's Client).
    The listener must run as this user, or as one of `allow_users` (``'any'``: any user)."""
    return connect(address, family=family, authkey=authkey, timeout=timeout,
                   max_message_size=max_message_size, serializer=serializer, spin=spin,
                   allow_users=allow_users)


def Pipe(
    duplex: bool = True,
    *,
    family: str = "AF_INET",
    max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
    serializer: Optional[Serializer] = None,
    spin: Optional[float] = None,
) -> Tuple[Channel, Channel]:
    """Return two connected Channels over loopback TCP (127.0.0.1, or ::1 with family='AF_INET6').

    With duplex=False the first is read-only and the second write-only. The two ends are
    authenticated to each other with a fresh random key, and the listening side only accepts the
    connection whose source port is the one this call opened, so another local process racing to
    connect to the short-lived port can never take the place of an end.
    """
    fam = family_from_name(family) or socket.AF_INET
    host = "::1" if fam == socket.AF_INET6 else "127.0.0.1"
    deadline = time.monotonic() + DEFAULT_HANDSHAKE_TIMEOUT
    with socket.socket(fam, socket.SOCK_STREAM) as listening:
        listening.bind((host, 0))
        listening.listen(8)
        accepted, connecting = _connect_own_pair(listening, deadline)
    first = Channel(accepted.detach(), True, duplex, max_message_size=max_message_size,
                    serializer=serializer, spin=spin)
    second = Channel(connecting.detach(), duplex, True, max_message_size=max_message_size,
                     serializer=serializer, spin=spin)
    handshake_pair(first, second, os.urandom(32), max(0.0, deadline - time.monotonic()))
    return first, second


def _connect_own_pair(
    listening: socket.socket, deadline: float
) -> Tuple[socket.socket, socket.socket]:
    """Connect a new socket to `listening` and accept that connection; any other connection that
    got into the backlog first (a local process racing for the port) is closed, never paired."""
    connecting = socket.socket(listening.family, socket.SOCK_STREAM)
    try:
        connecting.setblocking(False)
        connecting.connect_ex(listening.getsockname())
        expected = connecting.getsockname()[:2]
        while True:
            listening.settimeout(max(0.0, deadline - time.monotonic()))
            accepted, peer = listening.accept()
            if peer[:2] == expected:
                break
            accepted.close()  # somebody else raced to our port: not our other end
        error = connecting.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            accepted.close()
            raise OSError(error, os.strerror(error))
    except BaseException:
        connecting.close()
        raise
    return accepted, connecting


def wait(object_list: Iterable[Any], timeout: Optional[float] = None) -> List[Any]:
    """Wait until one or more objects in `object_list` are ready; return the ready ones.

    Accepts Channels, sockets, and anything with a fileno() (as multiprocessing.connection.wait,
    which works on loopfast channels too: their sockets hold every message not yet received).
    A channel awaiting a reply busy-polls first, for up to its spin budget.
    """
    object_list = list(object_list)
    known = tuple(CHANNEL_TYPES)
    channels: List[Channel] = [obj for obj in object_list if isinstance(obj, known)]
    ready = [obj for obj in channels if obj._has_message()]
    if ready:
        return ready
    budget = max((channel_spin(channel.spin) for channel in channels
                  if channel._awaits_reply()), default=0.0) / 1e6
    if budget > 0 and timeout != 0 and hasattr(select, "poll"):
        start = time.monotonic()
        ready = _spin_wait(object_list, budget if timeout is None else min(budget, timeout))
        if ready:
            return ready
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - start))
    return multiprocessing.connection.wait(object_list, timeout)


def _spin_wait(object_list: List[Any], budget: float) -> List[Any]:
    """Check readiness without sleeping for up to `budget` seconds (the spin of loopfast.wait)."""
    poller = select.poll()
    by_fd: Dict[int, List[Any]] = {}
    for obj in object_list:
        fd = obj if isinstance(obj, int) else obj.fileno()
        by_fd.setdefault(fd, []).append(obj)
        poller.register(fd, select.POLLIN)
    end = time.monotonic() + budget
    while True:
        events = poller.poll(0)
        if events:
            return [obj for fd, _ in events for obj in by_fd[fd]]
        if time.monotonic() >= end:
            return []
