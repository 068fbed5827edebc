"""The opening handshake, driven from raw sockets: a peer that is not loopfast, a different
protocol version, or a silent peer fails at once with a clear error, or after the bounded
handshake timeout, never a hang. (A Client without an authkey checks the server's hello at its
first use: the error comes from there, the timeout is that call's.)

Raw peers are written from docs/protocol.md: a 48-byte hello "<8sHHI32s" = (b"LOOPFAST",
version, flags, reserved, nonce).
"""

import multiprocessing.connection
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import loopfast
from loopfast import ProtocolError

pytestmark = pytest.mark.timeout(60)

HELLO = struct.Struct("<8sHHI32s")
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def hello(version=1, flags=0, magic=b"LOOPFAST"):
    return HELLO.pack(magic, version, flags, 0, os.urandom(32))


def recv_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _connected_pair(listener, connect):
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(connect)
        server = listener.accept()
        return future.result(timeout=30), server


class RawServer:
    """A plain TCP server on 127.0.0.1 that runs `behave(sock)` on each accepted connection in
    a thread, then keeps the connection open until stopped (so a client only learns what
    `behave` sent, never an early EOF)."""

    def __init__(self, behave):
        self._behave = behave
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4)
        self._sock.settimeout(30)
        self.address = self._sock.getsockname()
        self._stop = threading.Event()
        self.received = b""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            self._behave(conn)
            conn.settimeout(0.05)
            while True:  # until EOF, or stopped and idle: never drop bytes already sent to us
                try:
                    data = conn.recv(4096)
                except socket.timeout:
                    if self._stop.is_set():
                        break
                    continue
                except OSError:
                    break
                if not data:
                    break
                self.received += data

    def close(self):
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# ---- a raw client against a Listener -------------------------------------------------------------


def test_listener_rejects_a_non_loopfast_peer_at_once():
    """The garbage is shorter than a hello and the connection stays open: an implementation that
    waited for 48 bytes would raise TimeoutError, not ProtocolError."""
    with loopfast.Listener(handshake_timeout=30) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw:
        raw.sendall(HTTP_REQUEST)
        with pytest.raises(ProtocolError, match="not a loopfast"):
            listener.accept()


def test_listener_rejects_a_single_wrong_first_byte():
    with loopfast.Listener(handshake_timeout=30) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw:
        raw.sendall(b"X")
        with pytest.raises(ProtocolError, match="not a loopfast"):
            listener.accept()


def test_listener_rejects_a_wrong_magic_in_a_full_hello():
    with loopfast.Listener(handshake_timeout=30) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw:
        raw.sendall(hello(magic=b"LOOPSLOW"))
        with pytest.raises(ProtocolError, match="not a loopfast"):
            listener.accept()


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_listener_rejects_another_protocol_version_naming_both(version):
    with loopfast.Listener(handshake_timeout=30) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw:
        raw.sendall(hello(version=version))
        with pytest.raises(ProtocolError) as info:
            listener.accept()
        message = str(info.value)
        assert f"version {version}" in message
        assert "version 1" in message


def test_listener_sends_its_hello_first():
    """The listener's hello is on the wire before the peer sent anything (docs: each side sends
    without waiting), so a non-loopfast client can see what it is talking to."""
    with loopfast.Listener(handshake_timeout=30) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw, \
            ThreadPoolExecutor(1) as pool:
        accepting = pool.submit(listener.accept)
        data = recv_exactly(raw, HELLO.size)
        magic, version, flags, reserved, _ = HELLO.unpack(data)
        assert (magic, version, flags, reserved) == (b"LOOPFAST", 1, 0, 0)
        raw.sendall(hello())
        with accepting.result(timeout=30) as server:
            raw.sendall(struct.pack("<BBHIQ", 1, 0, 0, 0, 2) + b"hi")
            assert server.recv_bytes(timeout=10) == b"hi"


def test_listener_nonces_differ_between_connections():
    nonces = []
    with loopfast.Listener(handshake_timeout=30) as listener:
        for _ in range(2):
            with socket.create_connection(listener.address, timeout=10) as raw:
                raw.sendall(hello())
                with listener.accept():
                    nonces.append(HELLO.unpack(recv_exactly(raw, HELLO.size))[4])
    assert nonces[0] != nonces[1]


@pytest.mark.timeout(20)
def test_silent_client_times_out_after_handshake_timeout():
    with loopfast.Listener(handshake_timeout=0.5) as listener, \
            socket.create_connection(listener.address, timeout=10), \
            pytest.raises(TimeoutError):
        listener.accept()


@pytest.mark.timeout(20)
def test_client_stalling_mid_hello_times_out():
    with loopfast.Listener(handshake_timeout=0.5) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw:
        raw.sendall(hello()[:20])
        with pytest.raises(TimeoutError):
            listener.accept()


def test_client_closing_mid_hello_is_a_protocol_error():
    with loopfast.Listener(handshake_timeout=30) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw:
        raw.sendall(b"LOOPF")
        raw.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError):
            listener.accept()


def reset(sock):
    """Close `sock` with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_client_resetting_mid_hello_is_a_protocol_error():
    with loopfast.Listener(handshake_timeout=30) as listener, ThreadPoolExecutor(1) as pool:
        raw = socket.create_connection(listener.address, timeout=10)
        accepting = pool.submit(listener.accept)
        assert recv_exactly(raw, HELLO.size)[:8] == b"LOOPFAST"
        raw.sendall(b"LOOPF")
        reset(raw)
        with pytest.raises(ProtocolError):
            accepting.result(timeout=30)


def test_client_resetting_before_accept_is_a_protocol_error():
    """A port scanner's connect-then-RST must not make accept() raise a bare OSError."""
    with loopfast.Listener(handshake_timeout=30) as listener:
        raw = socket.create_connection(listener.address, timeout=10)
        raw.sendall(b"LOOPF")
        reset(raw)
        with pytest.raises(ProtocolError):
            listener.accept()


def test_failed_handshake_closes_the_connection():
    with loopfast.Listener(handshake_timeout=30) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw:
        raw.sendall(HTTP_REQUEST)
        with pytest.raises(ProtocolError):
            listener.accept()
        data = recv_exactly(raw, HELLO.size + 1)  # the listener's hello, then EOF
        assert len(data) == HELLO.size


@pytest.mark.timeout(20)
def test_listener_serves_the_next_client_after_a_failed_handshake():
    with loopfast.Listener(handshake_timeout=0.5) as listener:
        with socket.create_connection(listener.address, timeout=10) as raw:
            raw.sendall(HTTP_REQUEST)
            with pytest.raises(ProtocolError):
                listener.accept()
        with socket.create_connection(listener.address, timeout=10), \
                pytest.raises(TimeoutError):
            listener.accept()
        client, server = _connected_pair(listener,
                                         lambda: loopfast.Client(listener.address, timeout=10))
        with client, server:
            client.send("after")
            assert server.recv(timeout=10) == "after"


# ---- a Client against a raw server ------------------------------------------------------------

CONNECTORS = {
    "Client": lambda address, timeout: loopfast.Client(address, timeout=timeout),
}


# Without an authkey, Client returns once the TCP connection is made (as
# multiprocessing's Client does): the server's hello is read and checked at the channel's first
# use, which raises what the handshake found and closes the channel.


@pytest.mark.parametrize("connector", CONNECTORS)
def test_client_rejects_a_non_loopfast_server(connector):
    with RawServer(lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")) as server, \
            CONNECTORS[connector](server.address, 30) as client:
        with pytest.raises(ProtocolError, match="not a loopfast"):
            client.recv(timeout=30)
        assert client.closed


@pytest.mark.parametrize("connector", CONNECTORS)
def test_client_rejects_another_protocol_version(connector):
    with RawServer(lambda conn: conn.sendall(hello(version=2))) as server, \
            CONNECTORS[connector](server.address, 30) as client:
        with pytest.raises(ProtocolError) as info:
            client.recv(timeout=30)
        assert "version 2" in str(info.value)
        assert "version 1" in str(info.value)
        assert client.closed


@pytest.mark.timeout(20)
@pytest.mark.parametrize("connector", CONNECTORS)
def test_client_times_out_on_a_silent_server(connector):
    with RawServer(lambda conn: None) as server, \
            CONNECTORS[connector](server.address, 0.5) as client:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="^timed out waiting for a message$"):
            client.recv(timeout=0.5)
        assert time.monotonic() - start < 10  # bounded by the receive's timeout, never a hang


@pytest.mark.timeout(20)
def test_client_times_out_on_a_server_that_never_accepts():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # the TCP connection completes in the backlog; nobody answers
        with loopfast.Client(sock.getsockname(), timeout=0.5) as client:
            with pytest.raises(TimeoutError, match="^timed out waiting for a message$"):
                client.recv(timeout=0.5)


def test_client_sends_a_version_1_hello():
    frame = struct.pack("<BBHIQ", 1, 0, 0, 0, 2) + b"hi"
    with RawServer(lambda conn: conn.sendall(hello() + frame)) as server, \
            loopfast.Client(server.address, timeout=30) as client:
        # The first use completes the handshake: the server has accepted and answered.
        assert client.recv_bytes(timeout=30) == b"hi"
    magic, version, flags, reserved, _ = HELLO.unpack(server.received[:HELLO.size])
    assert (magic, version, flags, reserved) == (b"LOOPFAST", 1, 0, 0)


# ---- multiprocessing.connection peers -----------------------------------------------------------


@pytest.mark.timeout(30)
def test_multiprocessing_client_does_not_hang_the_listener():
    """multiprocessing's Client without authkey connects and sends nothing."""
    with loopfast.Listener(handshake_timeout=0.5) as listener:
        mp_client = multiprocessing.connection.Client(listener.address)
        try:
            with pytest.raises(TimeoutError):
                listener.accept()
        finally:
            mp_client.close()


@pytest.mark.timeout(30)
def test_multiprocessing_client_with_authkey_does_not_hang_the_listener():
    """multiprocessing's Client with an authkey waits for its challenge and gets our hello."""
    with loopfast.Listener(handshake_timeout=0.5) as listener:

        def mp_connect():
            try:
                multiprocessing.connection.Client(listener.address, authkey=b"key")
            except Exception as exc:
                return type(exc)
            return None

        with ThreadPoolExecutor(1) as pool:
            mp_result = pool.submit(mp_connect)
            # It gives up and drops the connection (FIN or RST), or the handshake times out.
            with pytest.raises((ConnectionError, TimeoutError)):
                listener.accept()
            assert mp_result.result(timeout=20) is not None


def test_client_rejects_a_multiprocessing_listener():
    with multiprocessing.connection.Listener(("127.0.0.1", 0), authkey=b"key") as mp_listener:

        def mp_accept():
            try:
                mp_listener.accept().close()
            except Exception as exc:
                return type(exc)
            return None

        with ThreadPoolExecutor(1) as pool:
            mp_result = pool.submit(mp_accept)
            with loopfast.Client(mp_listener.address, timeout=30) as client:
                # multiprocessing's challenge is not a loopfast hello: the first use says so.
                with pytest.raises(ProtocolError, match="not a loopfast"):
                    client.recv(timeout=30)
            assert mp_result.result(timeout=20) is not None
