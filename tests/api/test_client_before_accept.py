"""Client() before accept() in one thread (issue 11, "deferred handshake").

multiprocessing's Client returns once connected (without an authkey it exchanges nothing), so
programs and CPython's own tests call `c = Client(l.address)` and only then `d = l.accept()`,
in the same thread. loopfast's Client without an authkey does the same: it sends its hello and
returns; the listener's hello is read and checked at the channel's first use. Every failure of
the handshake is still raised, at that first use, with the same exception type as the eager
handshake (ProtocolError for a peer that is not loopfast or speaks another version,
AuthenticationError for a listener that requires an authkey), the channel is closed, and nothing
the peer sent is delivered before its hello was accepted.

With an authkey the proof exchange needs both sides, so Client still waits for it: accept() runs
in a thread there.

Raw servers are written from docs/protocol.md: a 48-byte hello "<8sHHI32s" = (b"LOOPFAST",
version, flags, reserved, nonce), then frames "<BBHIQ" + payload.
"""

import os
import pickle
import select
import socket
import threading

import pytest
from conftest import (
    HELLO,
    KIND_PICKLE,
    MAGIC,
    PROTOCOL_VERSION,
    RECV_TIMEOUT,
    Background,
    frame,
)

import loopfast
from loopfast import AuthenticationError, ProtocolError

pytestmark = pytest.mark.timeout(120)

HELLO_FLAG_AUTH = 0x0001
HTTP_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                 b"Connection: close\r\n\r\nok")


def hello(version=PROTOCOL_VERSION, flags=0, magic=MAGIC):
    return HELLO.pack(magic, version, flags, 0, os.urandom(32))


# ---- the pattern of multiprocessing programs and of CPython's tests ------------------------------

def test_client_then_accept_in_one_thread_then_messages_both_ways(family):
    with loopfast.Listener(family=family) as listener:
        with loopfast.Client(listener.address) as c, listener.accept() as d:
            c.send_bytes(b"client to listener", timeout=RECV_TIMEOUT)
            assert d.recv_bytes(timeout=RECV_TIMEOUT) == b"client to listener"
            d.send_bytes(b"listener to client", timeout=RECV_TIMEOUT)
            assert c.recv_bytes(timeout=RECV_TIMEOUT) == b"listener to client"
            d.send({"an": "object"}, timeout=RECV_TIMEOUT)
            assert c.recv(timeout=RECV_TIMEOUT) == {"an": "object"}
            c.send([1, 2, 3], timeout=RECV_TIMEOUT)
            assert d.recv(timeout=RECV_TIMEOUT) == [1, 2, 3]


def test_cpython_test_context_pattern():
    """Lib/test/_test_multiprocessing.py, _TestListenerClient.test_context."""
    with loopfast.Listener() as listener:
        with loopfast.Client(listener.address) as c:
            with listener.accept() as d:
                c.send(1729)
                assert d.recv() == 1729


def test_cpython_test_issue16955_pattern(family):
    """Lib/test/_test_multiprocessing.py, _TestListenerClient.test_issue16955: the client polls
    for what the accepted end sent."""
    listener = loopfast.Listener(family=family)
    c = loopfast.Client(listener.address)
    a = listener.accept()
    a.send_bytes(b"hello")
    assert c.poll(1)
    a.close()
    c.close()
    listener.close()


def test_client_send_poll_recv_after_accept_in_one_thread():
    """c.send, then d.poll / d.recv on the accepted end, all from one thread."""
    with loopfast.Listener() as listener:
        c = loopfast.Client(listener.address)
        d = listener.accept()
        with c, d:
            c.send("ping")
            assert d.poll(RECV_TIMEOUT)
            assert d.recv() == "ping"
            d.send("pong")
            assert c.poll(RECV_TIMEOUT)
            assert c.recv() == "pong"


def test_client_sends_before_accept_and_the_listener_gets_it_after():
    with loopfast.Listener() as listener:
        with loopfast.Client(listener.address) as c:
            c.send_bytes(b"sent before accept", timeout=RECV_TIMEOUT)
            c.send("and an object", timeout=RECV_TIMEOUT)
            with listener.accept() as d:
                assert d.recv_bytes(timeout=RECV_TIMEOUT) == b"sent before accept"
                assert d.recv(timeout=RECV_TIMEOUT) == "and an object"


def test_a_client_that_sent_and_closed_before_accept_is_still_received():
    """CPython's test_issue14725 pattern: the client has sent and gone before accept() runs."""
    with loopfast.Listener() as listener:
        c = loopfast.Client(listener.address)
        c.send("hello")
        c.close()
        with listener.accept() as d:
            assert d.recv(timeout=RECV_TIMEOUT) == "hello"


def test_poll_before_the_listener_accepted_returns_false():
    with loopfast.Listener() as listener:
        with loopfast.Client(listener.address) as c:
            assert c.poll(0) is False
            assert c.poll(0.1) is False
            with listener.accept() as d:
                d.send_bytes(b"now", timeout=RECV_TIMEOUT)
                assert c.poll(RECV_TIMEOUT) is True
                assert c.recv_bytes(timeout=RECV_TIMEOUT) == b"now"


def test_a_receive_timing_out_before_accept_leaves_the_channel_usable():
    with loopfast.Listener() as listener:
        with loopfast.Client(listener.address) as c:
            with pytest.raises(TimeoutError):
                c.recv_bytes(timeout=0.1)
            assert not c.closed
            with listener.accept() as d:
                d.send_bytes(b"after the timeout", timeout=RECV_TIMEOUT)
                assert c.recv_bytes(timeout=RECV_TIMEOUT) == b"after the timeout"
                c.send_bytes(b"and back", timeout=RECV_TIMEOUT)
                assert d.recv_bytes(timeout=RECV_TIMEOUT) == b"and back"


def test_a_receive_blocked_before_accept_completes_once_the_listener_sends():
    """A receive started before accept() waits for the listener's hello, then its message."""
    with loopfast.Listener() as listener:
        with loopfast.Client(listener.address) as c:
            receiving = Background(c.recv_bytes, timeout=RECV_TIMEOUT)
            with listener.accept() as d:
                d.send_bytes(b"for the waiting receive", timeout=RECV_TIMEOUT)
                assert receiving.result() == b"for the waiting receive"


def test_many_clients_connected_before_any_accept_each_get_their_own_end():
    with loopfast.Listener(backlog=8) as listener:
        clients = [loopfast.Client(listener.address) for _ in range(5)]
        try:
            for i, c in enumerate(clients):
                c.send(i, timeout=RECV_TIMEOUT)
            accepted = [listener.accept() for _ in clients]
            try:
                got = {}
                for d in accepted:
                    i = d.recv(timeout=RECV_TIMEOUT)
                    d.send(("for", i), timeout=RECV_TIMEOUT)
                    got[i] = d
                assert sorted(got) == list(range(5))
                for i, c in enumerate(clients):
                    assert c.recv(timeout=RECV_TIMEOUT) == ("for", i)
            finally:
                for d in accepted:
                    d.close()
        finally:
            for c in clients:
                c.close()


# ---- with an authkey the Client waits for the exchange -------------------------------------------

def test_client_with_an_authkey_waits_for_accept_in_another_thread():
    with loopfast.Listener(authkey=b"k") as listener:
        accepting = Background(listener.accept)
        with loopfast.Client(listener.address, authkey=b"k") as c, accepting.result() as d:
            c.send("authenticated", timeout=RECV_TIMEOUT)
            assert d.recv(timeout=RECV_TIMEOUT) == "authenticated"
            d.send_bytes(b"back", timeout=RECV_TIMEOUT)
            assert c.recv_bytes(timeout=RECV_TIMEOUT) == b"back"


def test_client_with_an_authkey_does_not_return_before_the_exchange():
    """Nobody accepts: the proof exchange cannot happen, so Client gives up after its timeout
    instead of returning a channel."""
    with loopfast.Listener(authkey=b"k") as listener, pytest.raises(TimeoutError):
        loopfast.Client(listener.address, authkey=b"k", timeout=0.5)


# ---- handshake failures, raised at the first use -------------------------------------------------

class RawServer:
    """A plain TCP server on 127.0.0.1: accepts one connection in a thread, sends `data` (None:
    closes at once), then reads until EOF or close() (so the client sees exactly `data`, not an
    early end of stream)."""

    def __init__(self, data):
        self._data = data
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1)
        self._sock.settimeout(RECV_TIMEOUT)
        self.address = self._sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            if self._data is None:
                return
            conn.sendall(self._data)
            conn.settimeout(0.05)
            while not self._stop.is_set():
                try:
                    if not conn.recv(65536):
                        break
                except socket.timeout:
                    continue
                except OSError:
                    break

    def close(self):
        self._stop.set()
        self._sock.close()
        self._thread.join(RECV_TIMEOUT)
        assert not self._thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _wait_readable(channel):
    """Until the peer's bytes (its hello) have arrived: the send below then finds them."""
    ready, _, _ = select.select([channel.fileno()], [], [], RECV_TIMEOUT)
    assert ready, "the server's bytes did not arrive"


FIRST_USES = {
    "recv_bytes": lambda c: c.recv_bytes(timeout=RECV_TIMEOUT),
    "recv": lambda c: c.recv(timeout=RECV_TIMEOUT),
    "recv_bytes_into": lambda c: c.recv_bytes_into(bytearray(100), timeout=RECV_TIMEOUT),
    "recv_bytes_many": lambda c: c.recv_bytes_many(timeout=RECV_TIMEOUT),
    "poll": lambda c: c.poll(RECV_TIMEOUT),
    # A send checks a hello that has arrived (without waiting for one).
    "send_bytes-after-the-hello-arrived": lambda c: (_wait_readable(c),
                                                     c.send_bytes(b"x", timeout=RECV_TIMEOUT)),
    "send-after-the-hello-arrived": lambda c: (_wait_readable(c),
                                               c.send("x", timeout=RECV_TIMEOUT)),
}

# What a raw server sends, the error the client's first use raises, and a regex its message
# must match (the eager handshake's messages).
BAD_SERVERS = {
    "http-server": (HTTP_RESPONSE, ProtocolError, r"not a loopfast channel"),
    "version-2": (hello(version=2), ProtocolError, r"version 2"),
    "closes-without-hello": (None, ProtocolError, r"closed the connection during the handshake"),
    "requires-an-authkey": (hello(flags=HELLO_FLAG_AUTH), AuthenticationError,
                            r"requires an authkey"),
}


@pytest.mark.parametrize("use", FIRST_USES)
@pytest.mark.parametrize("server", BAD_SERVERS)
def test_a_failed_handshake_is_raised_at_the_first_use(server, use):
    data, error, message = BAD_SERVERS[server]
    with RawServer(data) as raw:
        c = loopfast.Client(raw.address)  # returns once connected: nothing is checked yet
        try:
            with pytest.raises(error, match=message):
                FIRST_USES[use](c)
            assert c.closed, "a failed handshake must close the channel"
        finally:
            c.close()


def test_the_version_mismatch_error_names_both_versions():
    with RawServer(hello(version=2)) as raw:
        with loopfast.Client(raw.address) as c:
            with pytest.raises(ProtocolError) as info:
                c.recv_bytes(timeout=RECV_TIMEOUT)
    assert "version 2" in str(info.value)
    assert "version 1" in str(info.value)


@pytest.mark.parametrize("use", ["recv_bytes", "recv", "poll"])
def test_a_listener_requiring_an_authkey_fails_both_accept_and_the_clients_first_use(use):
    with loopfast.Listener(authkey=b"k") as listener:
        c = loopfast.Client(listener.address)  # no authkey: returns once connected
        try:
            with pytest.raises(AuthenticationError):
                listener.accept()
            with pytest.raises(AuthenticationError, match="requires an authkey"):
                FIRST_USES[use](c)
            assert c.closed
        finally:
            c.close()


def test_after_a_failed_first_use_every_call_says_the_channel_is_closed():
    with RawServer(hello(version=2)) as raw:
        with loopfast.Client(raw.address) as c:
            with pytest.raises(ProtocolError):
                c.recv_bytes(timeout=RECV_TIMEOUT)
            for call in (lambda: c.recv_bytes(timeout=RECV_TIMEOUT), lambda: c.poll(0),
                         lambda: c.send_bytes(b"x", timeout=RECV_TIMEOUT)):
                with pytest.raises(OSError, match="handle is closed"):
                    call()


# A message right behind a hello that is refused: it must never be delivered.
REFUSED_HELLOS = {
    "version-2": (hello(version=2), ProtocolError),
    "wrong-magic": (hello(magic=b"LOOPSLOW"), ProtocolError),
    "requires-an-authkey": (hello(flags=HELLO_FLAG_AUTH), AuthenticationError),
}


@pytest.mark.parametrize("use", ["recv_bytes", "recv", "recv_bytes_many"])
@pytest.mark.parametrize("refused", REFUSED_HELLOS)
def test_nothing_is_delivered_before_the_handshake_succeeded(refused, use):
    bad_hello, error = REFUSED_HELLOS[refused]
    smuggled = frame(b"smuggled") + frame(pickle.dumps("smuggled"), KIND_PICKLE)
    with RawServer(bad_hello + smuggled) as raw:
        c = loopfast.Client(raw.address)
        try:
            with pytest.raises(error):
                FIRST_USES[use](c)
            for _ in range(2):
                with pytest.raises(OSError, match="handle is closed"):
                    FIRST_USES[use](c)
        finally:
            c.close()


def test_a_valid_hello_then_a_frame_from_a_raw_server_is_delivered():
    """The control for the refusals above: the same bytes behind a valid hello arrive."""
    with RawServer(hello() + frame(b"delivered")) as raw:
        with loopfast.Client(raw.address) as c:
            assert c.recv_bytes(timeout=RECV_TIMEOUT) == b"delivered"
