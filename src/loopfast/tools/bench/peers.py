"""The peers of ``python -m loopfast bench``: the ways of moving messages between two processes
that the bench compares (see runner.py for the vocabulary).

Each peer makes a connected pair of ends (`Peer.make_pair`) and builds, in the process that uses
an end, the `Endpoint` the cases drive (`Peer.endpoint`). Registered here: loopfast.Pipe() with
the default busy-polling budget and with ``spin=0``, the same with send_bytes_many /
recv_bytes_many and with batch() (64 B streams), multiprocessing.Pipe() (duplex and not),
multiprocessing.connection Listener/Client over TCP 127.0.0.1, a plain Python socket loop, and
pyzmq PAIR sockets over tcp://127.0.0.1 when pyzmq is installed.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import socket
import struct
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Protocol, Union

if TYPE_CHECKING:
    from multiprocessing.connection import _ConnectionBase

    from typing_extensions import Buffer, TypeAlias

    from loopfast import Channel

    class SizedBuffer(Buffer, Protocol):
        """A bytes-like payload: bytes, bytearray, memoryview (a numpy array's ``.data``)."""

        def __len__(self) -> int: ...

    # One end of a connection, as a peer's make_pair() returns it.
    End: TypeAlias = Union[Channel, "_ConnectionBase[object, object]", socket.socket, "ZmqEnd"]

__all__ = [
    "PEERS",
    "BenchError",
    "Endpoint",
    "Peer",
    "ZmqEnd",
    "as_buffer",
    "register_peer",
]

KiB = 1024
# How many messages one send_bytes_many / recv_bytes_many call moves in the batched 64 B stream.
MANY_PER_CALL = 1000
# The longest a pyzmq receive or send may block (pyzmq sees no EOF when the peer process dies).
ZMQ_LIMIT_MS = 70_000


class BenchError(RuntimeError):
    """A measurement could not be completed (a peer process failed, hung or exited early)."""


class Endpoint(NamedTuple):
    """The operations the cases need on one end of a connection.

    `send_n(buffer, n)` and `recv_n(n)`, when a peer gives them, move n messages its own way (in
    batches); without them the stream loops call `send` / `recv` once per message.
    """

    send: Callable[[SizedBuffer], None]  # send one message of bytes
    recv: Callable[[], Union[bytes, memoryview]]  # new bytes, or a view of a reused buffer
    recv_into: Callable[[Buffer], int]  # the size of the message written at the buffer's start
    send_obj: Callable[[object], None]  # send one object
    recv_obj: Callable[[], object]  # receive one object
    send_n: Optional[Callable[[SizedBuffer, int], None]] = None  # send n copies of a message
    recv_n: Optional[Callable[[int], object]] = None  # receive n messages, return the last


@dataclasses.dataclass(frozen=True)
class Peer:
    """One way of connecting two processes.

    `make_pair()` returns (first, second): the first end stays in this process and must be
    readable; the second goes to the peer process and must be writable (for a one-way peer, data
    flows only from second to first). `endpoint(end, max_size)` builds the Endpoint of one end in
    the process that uses it; `max_size` is the largest message it will receive. `unavailable()`
    returns why the peer cannot run here (a missing module...), or None.
    """

    name: str
    label: str
    make_pair: Callable[[], tuple[End, End]]
    endpoint: Callable[[End, int], Endpoint]
    duplex: bool = True
    unavailable: Callable[[], Optional[str]] = lambda: None


PEERS: dict[str, Peer] = {}


def register_peer(peer: Peer) -> Peer:
    """Add (or replace) a peer in the registry; returns it."""
    PEERS[peer.name] = peer
    return peer


def as_buffer(obj: object) -> SizedBuffer:
    """The bytes of a payload for send_bytes: bytes-like objects as they are, a numpy array as its
    memory (``.data``, a memoryview: no copy)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return obj
    data = getattr(obj, "data", None)
    if isinstance(data, memoryview):
        return data
    raise BenchError(f"cannot send a {type(obj).__name__} with send_bytes")


# ---- loopfast and multiprocessing ------------------------------------------------------------

def _connection_endpoint(conn: End, max_size: int) -> Endpoint:
    """loopfast Channels and multiprocessing Connections share the API the cases use."""
    if isinstance(conn, (socket.socket, ZmqEnd)):
        raise TypeError(f"a {type(conn).__name__} has no message API of its own")
    return Endpoint(conn.send_bytes, conn.recv_bytes, conn.recv_bytes_into, conn.send, conn.recv)


def _bytes_reference_endpoint(conn: End, max_size: int) -> Endpoint:
    """A loopfast channel whose "objects" travel with send_bytes/recv_bytes: the bytes of the
    object case's payload (a numpy array's memory), received as one new bytes object. The
    reference the object cases are held to: the same bytes, without pickling."""
    ep = _connection_endpoint(conn, max_size)
    send = ep.send

    def send_obj(obj: object) -> None:
        send(as_buffer(obj))

    return ep._replace(send_obj=send_obj, recv_obj=ep.recv)


def _channel(conn: End) -> Channel:
    import loopfast
    if not isinstance(conn, loopfast.Channel):
        raise TypeError(f"a loopfast Channel was expected, not a {type(conn).__name__}")
    return conn


def _many_endpoint(conn: End, max_size: int) -> Endpoint:
    """loopfast with explicit batching: send_bytes_many of MANY_PER_CALL messages per call, and
    recv_bytes_many(max_messages=MANY_PER_CALL) on the receiving side."""
    channel = _channel(conn)
    send_many, recv_many = channel.send_bytes_many, channel.recv_bytes_many

    def send_n(data: SizedBuffer, n: int) -> None:
        full = [data] * MANY_PER_CALL
        for _ in range(n // MANY_PER_CALL):
            send_many(full)
        if n % MANY_PER_CALL:
            send_many(full[:n % MANY_PER_CALL])

    def recv_n(n: int) -> object:
        last: object = None
        while n > 0:
            got = recv_many(min(n, MANY_PER_CALL))
            n -= len(got)
            last = got[-1]
        return last

    return _connection_endpoint(conn, max_size)._replace(send_n=send_n, recv_n=recv_n)


def _batch_endpoint(conn: End, max_size: int) -> Endpoint:
    """loopfast with `with channel.batch():` around plain send_bytes calls (MANY_PER_CALL sends
    per block); the receiving side uses plain recv_bytes, one call per message."""
    channel = _channel(conn)
    send, batch = channel.send_bytes, channel.batch

    def send_n(data: SizedBuffer, n: int) -> None:
        while n > 0:
            k = min(n, MANY_PER_CALL)
            with batch():
                for _ in range(k):
                    send(data)
            n -= k

    return _connection_endpoint(conn, max_size)._replace(send_n=send_n)


def _loopfast_pair() -> tuple[End, End]:
    import loopfast
    return loopfast.Pipe()


def _loopfast_spin0_pair() -> tuple[End, End]:
    import loopfast
    return loopfast.Pipe(spin=0)


def _mp_pair() -> tuple[End, End]:
    return multiprocessing.Pipe()


def _mp_simplex_pair() -> tuple[End, End]:
    return multiprocessing.Pipe(duplex=False)  # (read-only end, write-only end)


def _mp_tcp_pair() -> tuple[End, End]:
    """multiprocessing.connection.Listener / Client over TCP 127.0.0.1 (AF_INET), no authkey.
    The client connects (the kernel completes the handshake) before the listener accepts."""
    from multiprocessing.connection import Client, Listener
    with Listener(("127.0.0.1", 0), family="AF_INET") as listener:
        client = Client(listener.address, family="AF_INET")
        accepted = listener.accept()
    return accepted, client


# ---- the plain socket loop -------------------------------------------------------------------

def _tcp_socket_pair() -> tuple[End, End]:
    """Two connected TCP sockets over 127.0.0.1 with TCP_NODELAY, as a plain program would make."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        connecting = socket.create_connection(listening.getsockname(), timeout=10.0)
        listening.settimeout(10.0)
        accepted, _ = listening.accept()
    for sock in (accepted, connecting):
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return accepted, connecting


_LENGTH = struct.Struct("<Q")
# The plain loop sends header and payload in one sendall() up to this size (one syscall, as any
# careful socket program does for small messages), and in two above it (no copy of a big payload).
_SOCKET_JOIN_LIMIT = 16 * KiB


def _socket_endpoint(sock: End, max_size: int) -> Endpoint:
    """The plain Python socket loop the issue compares against: an 8-byte length header,
    ``sendall`` to send, ``recv_into`` a preallocated buffer to receive. Bytes only."""
    if not isinstance(sock, socket.socket):
        raise TypeError(f"the socket loop needs a socket, not a {type(sock).__name__}")
    sendall = sock.sendall
    sock_recv_into = sock.recv_into
    pack = _LENGTH.pack
    unpack_from = _LENGTH.unpack_from
    header = bytearray(_LENGTH.size)
    header_view = memoryview(header)
    own = bytearray(max(max_size, 1))
    own_view = memoryview(own)

    def read_exact(view: memoryview, n: int) -> None:
        got = 0
        while got < n:
            k = sock_recv_into(view[got:n], n - got)
            if not k:
                raise EOFError("the peer closed the socket")
            got += k

    def send(payload: SizedBuffer) -> None:
        n = len(payload)
        if n <= _SOCKET_JOIN_LIMIT:
            sendall(pack(n) + payload)
        else:
            sendall(pack(n))
            sendall(payload)

    def recv_into(target: Buffer) -> int:
        read_exact(header_view, _LENGTH.size)
        n: int = unpack_from(header)[0]
        view = memoryview(target).cast("B")
        if n > len(view):
            raise ValueError(f"a {n}-byte message does not fit in a {len(view)}-byte buffer")
        read_exact(view, n)
        return n

    def recv() -> memoryview:
        return own_view[:recv_into(own_view)]

    def no_objects(*_: object) -> None:
        raise BenchError("the plain socket loop moves bytes only: it has no send/recv of objects")

    return Endpoint(send, recv, recv_into, no_objects, no_objects)


# ---- pyzmq -----------------------------------------------------------------------------------

def _zmq_missing() -> Optional[str]:
    try:
        import zmq  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return "pyzmq is not installed (optional: pip install pyzmq)"
    return None


class ZmqEnd:
    """One end of a pyzmq PAIR connection over tcp://127.0.0.1, opened lazily in the process that
    uses it (a zmq context must not cross a fork): the first end binds, the second connects (zmq
    connects in the background, so the order does not matter)."""

    def __init__(self, port: int, bind: bool) -> None:
        self.address = f"tcp://127.0.0.1:{port}"
        self.bind = bind
        self._context: object = None
        self._socket: object = None

    def open(self) -> object:
        import zmq  # type: ignore[import-not-found,unused-ignore]
        context = zmq.Context()
        sock = context.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RCVTIMEO, ZMQ_LIMIT_MS)
        sock.setsockopt(zmq.SNDTIMEO, ZMQ_LIMIT_MS)
        if self.bind:
            sock.bind(self.address)
        else:
            sock.connect(self.address)
        self._context, self._socket = context, sock
        return sock

    def close(self) -> None:
        import zmq  # type: ignore[import-not-found,unused-ignore]
        sock, context, self._socket, self._context = self._socket, self._context, None, None
        if isinstance(sock, zmq.Socket):
            sock.close()
        if isinstance(context, zmq.Context):
            context.term()


def _zmq_pair() -> tuple[End, End]:
    # A free port on 127.0.0.1, chosen by the kernel (zmq's own "bind to *" would need the
    # context here, in the process that forks).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ZmqEnd(port, bind=True), ZmqEnd(port, bind=False)


# Messages up to this size are copied in and out of zmq (faster for small ones); bigger ones are
# sent from their own memory and received as zmq frames.
_ZMQ_COPY_LIMIT = 64 * KiB


def _zmq_endpoint(end: End, max_size: int) -> Endpoint:
    """pyzmq PAIR sockets: send / recv of bytes (zero-copy above 64 KiB), send_pyobj/recv_pyobj.
    Receives give up with TimeoutError after ZMQ_LIMIT_MS (a dead peer is no EOF to zmq)."""
    import zmq  # type: ignore[import-not-found,unused-ignore]
    if not isinstance(end, ZmqEnd):
        raise TypeError(f"the pyzmq peer needs a ZmqEnd, not a {type(end).__name__}")
    sock = end.open()
    assert isinstance(sock, zmq.Socket)
    zsend, zrecv = sock.send, sock.recv
    copy_in = max_size <= _ZMQ_COPY_LIMIT

    def send(payload: SizedBuffer) -> None:
        if len(payload) <= _ZMQ_COPY_LIMIT:
            zsend(payload)
        else:
            zsend(payload, copy=False)

    def recv() -> Union[bytes, memoryview]:
        try:
            if copy_in:
                got: bytes = zrecv()
                return got
            frame: zmq.Frame = zrecv(copy=False)
            buffer: memoryview = frame.buffer  # typed here: without pyzmq installed it is Any
            return buffer
        except zmq.Again:
            raise TimeoutError("pyzmq: no message within the limit") from None

    def recv_into(target: Buffer) -> int:
        data = recv()
        view = memoryview(target).cast("B")
        n = len(data)
        view[:n] = data
        return n

    def send_obj(obj: object) -> None:
        sock.send_pyobj(obj, protocol=5)

    def recv_obj() -> object:
        try:
            return sock.recv_pyobj()
        except zmq.Again:
            raise TimeoutError("pyzmq: no message within the limit") from None

    return Endpoint(send, recv, recv_into, send_obj, recv_obj)


register_peer(Peer("loopfast", "loopfast.Pipe()", _loopfast_pair, _connection_endpoint))
register_peer(Peer("loopfast_spin0", "loopfast.Pipe(spin=0)", _loopfast_spin0_pair,
                   _connection_endpoint))
register_peer(Peer("loopfast_many", f"loopfast send_bytes_many/recv_bytes_many ×{MANY_PER_CALL}",
                   _loopfast_pair, _many_endpoint))
register_peer(Peer("loopfast_batch", "loopfast batch()+send_bytes / recv_bytes", _loopfast_pair,
                   _batch_endpoint))
register_peer(Peer("mp_pipe", "multiprocessing.Pipe()", _mp_pair, _connection_endpoint))
register_peer(Peer("mp_pipe_simplex", "multiprocessing.Pipe(duplex=False)", _mp_simplex_pair,
                   _connection_endpoint, duplex=False))
register_peer(Peer("mp_tcp", "multiprocessing.connection TCP", _mp_tcp_pair,
                   _connection_endpoint))
register_peer(Peer("socket", "plain socket loop (TCP 127.0.0.1)", _tcp_socket_pair,
                   _socket_endpoint))
register_peer(Peer("zmq", "pyzmq PAIR tcp://127.0.0.1", _zmq_pair, _zmq_endpoint,
                   unavailable=_zmq_missing))
# Only for the object cases: the same bytes through send_bytes/recv_bytes, no pickling.
register_peer(Peer("loopfast_bytes", "loopfast.Pipe() send_bytes/recv_bytes", _loopfast_pair,
                   _bytes_reference_endpoint))

