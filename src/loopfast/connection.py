"""The public API: a drop-in superset of ``multiprocessing.connection``.

``Pipe``, ``Listener``, ``Client`` and ``wait`` have multiprocessing's names, signatures and
semantics; ``Channel`` plays the part of ``multiprocessing.connection.Connection`` (also exported
under that name). Differences are listed in README.md ("Migrating from multiprocessing").
"""

import multiprocessing.connection
import os
import select
import selectors
import socket
import threading
import time
from types import TracebackType
from typing import Any, Dict, Iterable, List, Optional, Protocol, Tuple, Type, Union

from . import _reduction  # noqa: F401  (registers Channel with multiprocessing's pickler)
from ._address import check_peer, family_from_name, resolve
from ._errors import AuthenticationError, BufferTooShort, ProtocolError
from ._handshake import CONNECTOR, LISTENER, Handshake, handshake, handshake_pair
from ._implementation import CHANNEL_TYPES, Channel
from ._protocol import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_MESSAGE_SIZE
from ._spin import channel_spin

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

Connection = Channel
Address = Union[Tuple[str, int], Tuple[str, int, int, int]]


class Serializer(Protocol):
    """What `serializer=` takes: msgspec's msgpack module, cloudpickle, or an object of yours."""

    def dumps(self, obj: Any, /) -> Any: ...

    def loads(self, data: bytes, /) -> Any: ...


def _check_authkey(authkey: object) -> None:
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError("authkey should be a byte string")


class Listener:
    """A listening socket on a loopback address that hands out authenticated channels.

    ``Listener(address=None, family=None, backlog=1, authkey=None)``: the default address is
    ``('127.0.0.1', 0)``, or ``('::1', 0)`` with ``family='AF_INET6'`` (port 0: the system picks
    a free port; read it from ``.address``). With an `authkey`, every client must prove it knows
    the same key before any message is delivered.
    """

    def __init__(
        self,
        address: Optional[Address] = None,
        family: Optional[str] = None,
        backlog: int = 1,
        authkey: Optional[bytes] = None,
        *,
        max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
        handshake_timeout: Optional[float] = DEFAULT_HANDSHAKE_TIMEOUT,
        serializer: Optional[Serializer] = None,
        spin: Optional[float] = None,
    ) -> None:
        _check_authkey(authkey)
        fam = family_from_name(family)
        if address is None:
            address = ("::1", 0) if fam == socket.AF_INET6 else ("127.0.0.1", 0)
        fam, sockaddr = resolve(address, family)
        sock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            if os.name == "posix":
                # As multiprocessing does: a restarted service can rebind its port at once.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)  # accept() waits in a selector (see _next_handshaken)
        except BaseException:
            sock.close()
            raise
        self._socket: Optional[socket.socket] = sock
        self._family = fam
        self._address: Tuple[str, int] = sock.getsockname()[:2]
        self._authkey = authkey
        self._handshake_timeout = handshake_timeout
        self._options: Dict[str, Any] = {
            "max_message_size": max_message_size, "serializer": serializer, "spin": spin}
        self._last_accepted: Optional[Tuple[str, int]] = None
        # Connections accepted whose handshake is under way (see accept()), and their peers.
        self._handshakes: List[Handshake] = []
        self._peers: Dict[Handshake, Tuple[str, int]] = {}
        self._accepting = threading.Lock()  # one accept() at a time

    def accept(self) -> Channel:
        """Wait for a client, run the handshake (and authentication) and return its Channel.

        Handshakes run side by side: while one client is silent or slow, the connections behind
        it are accepted and their handshakes go on, and the first to finish is returned (a
        client that never sends a hello holds up no one; after `handshake_timeout` its
        connection is closed and accept() raises TimeoutError). A handshake that fails raises
        here (AuthenticationError, ProtocolError, TimeoutError), as multiprocessing's accept()
        does; the handshakes still under way wait for the next call."""
        with self._accepting:
            while True:
                if self._socket is None:
                    raise OSError("listener is closed")
                channel = self._next_handshaken()
                if channel is not None:
                    return channel

    def _next_handshaken(self) -> Optional[Channel]:
        """Wait for one event (a new connection, handshake bytes, a handshake deadline): the
        channel whose handshake it completed, or None."""
        assert self._socket is not None
        now = time.monotonic()
        timeout = None
        for side in self._handshakes:
            if side.deadline is not None:
                left = max(0.0, side.deadline - now)
                timeout = left if timeout is None else min(timeout, left)
        with selectors.DefaultSelector() as selector:
            selector.register(self._socket, selectors.EVENT_READ, None)
            for side in self._handshakes:
                selector.register(side.channel.fileno(), selectors.EVENT_READ, side)
            events = selector.select(timeout)
        sides: List[Handshake] = [key.data for key, _ in events if key.data is not None]
        if any(key.data is None for key, _ in events):
            new = self._accept_connection()
            if new is not None:
                sides.append(new)
        now = time.monotonic()
        sides += [side for side in self._handshakes
                  if side.deadline is not None and side.deadline <= now and side not in sides]
        for side in sides:
            try:
                done = side.advance()
            except BaseException:
                self._handshakes.remove(side)
                self._last_accepted = self._peers.pop(side)  # as multiprocessing: set on failure
                side.channel.close()
                raise
            if done:
                self._handshakes.remove(side)
                self._last_accepted = self._peers.pop(side)
                channel: Channel = side.channel
                return channel
        return None

    def _accept_connection(self) -> Optional[Handshake]:
        assert self._socket is not None
        try:
            sock, peer = self._socket.accept()
        except (BlockingIOError, InterruptedError):
            return None  # the connection went away before it was accepted
        try:
            check_peer(peer)
            channel = Channel(sock.fileno(), **self._options)
        except BaseException:
            sock.close()
            raise
        sock.detach()
        side = Handshake(channel, self._authkey, LISTENER, self._handshake_timeout)
        self._handshakes.append(side)
        self._peers[side] = peer[:2]
        return side

    def close(self) -> None:
        """Stop listening. Channels already accepted stay open; connections whose handshake had
        not finished are closed."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
        handshakes, self._handshakes = self._handshakes, []
        self._peers.clear()
        for side in handshakes:
            side.channel.close()

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
) -> Channel:
    """Connect to a loopfast Listener at a loopback `address` and return a Channel.

    `timeout` bounds the connection and, with an `authkey`, the handshake (default: the
    handshake timeout). Without an `authkey` this returns once connected, as multiprocessing's
    Client does: the listener's hello is checked at the channel's first use, which raises what
    the handshake found (ProtocolError, AuthenticationError) and delivers nothing before it
    succeeded. With an `authkey` the exchange needs both sides, so this waits for the
    listener's accept().
    """
    _check_authkey(authkey)
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
    if authkey is None:
        side = Handshake(channel, None, CONNECTOR, None)
        try:
            side.start_deferred()
        except BaseException:
            channel.close()
            raise
        channel._defer_handshake(side)
        return channel
    handshake(channel, authkey, CONNECTOR, max(0.0, limit - (time.monotonic() - start)))
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
) -> Channel:
    """Connect to a Listener at `address` and return a Channel (as multiprocessing's Client)."""
    return connect(address, family=family, authkey=authkey, timeout=timeout,
                   max_message_size=max_message_size, serializer=serializer, spin=spin)


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
    channels = [obj for obj in object_list if isinstance(obj, CHANNEL_TYPES)]
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
