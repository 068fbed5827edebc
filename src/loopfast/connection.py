"""The public API: a drop-in superset of ``multiprocessing.connection``.

``Pipe``, ``Listener``, ``Client`` and ``wait`` have multiprocessing's names, signatures and
semantics; ``Channel`` plays the part of ``multiprocessing.connection.Connection`` (also exported
under that name). Differences are listed in README.md ("Migrating from multiprocessing").
"""

import multiprocessing.connection
import os
import select
import socket
import time
from types import TracebackType
from typing import Any, Dict, Iterable, List, Optional, Protocol, Tuple, Type, Union

from . import _reduction  # noqa: F401  (registers Channel with multiprocessing's pickler)
from ._address import check_peer, family_from_name, resolve
from ._errors import AuthenticationError, BufferTooShort, ProtocolError
from ._handshake import CONNECTOR, LISTENER, handshake, handshake_pair
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

    def accept(self) -> Channel:
        """Wait for a client, run the handshake (and authentication) and return its Channel."""
        if self._socket is None:
            raise OSError("listener is closed")
        sock, peer = self._socket.accept()
        try:
            check_peer(peer)
        except ValueError:
            sock.close()
            raise
        self._last_accepted = peer[:2]
        channel = Channel(sock.detach(), **self._options)
        handshake(channel, self._authkey, LISTENER, self._handshake_timeout)
        return channel

    def close(self) -> None:
        """Stop listening. Channels already accepted stay open."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

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

    `timeout` bounds the connection and the handshake (default: the handshake timeout).
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

    Accepts Channels, sockets, and anything with a fileno() (as multiprocessing.connection.wait).
    A Channel that already holds a whole message in its receive buffer is returned at once,
    without a syscall: use this wait, not multiprocessing's, with loopfast channels.
    """
    object_list = list(object_list)
    channels = [obj for obj in object_list if isinstance(obj, CHANNEL_TYPES)]
    ready = [obj for obj in channels if obj._has_message()]
    if ready:
        return ready
    budget = max((channel_spin(channel.spin) for channel in channels), default=0.0) / 1e6
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
