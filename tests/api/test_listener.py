"""Listener and Client: addresses, accept, last_accepted, close, backlog."""

import os
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import loopfast

pytestmark = pytest.mark.timeout(60)

HELLO = struct.Struct("<8sHHI32s")


def _ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback_available(), reason="::1 is not available")


def _connected_pair(listener, connect):
    """(client, server): run `connect` in a thread (it waits for the handshake) and accept."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(connect)
        server = listener.accept()
        return future.result(timeout=30), server


def _names(channel):
    """(sockname, peername) of a channel's socket, as (host, port)."""
    with socket.socket(fileno=os.dup(channel.fileno())) as sock:
        return sock.getsockname()[:2], sock.getpeername()[:2]


def _unused_port():
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_talks(a, b):
    a.send({"from": "a"})
    assert b.recv(timeout=10) == {"from": "a"}
    b.send_bytes(b"from b")
    assert a.recv_bytes(timeout=10) == b"from b"


# ---- addresses ------------------------------------------------------------------------------


def test_default_address_is_ipv4_loopback_with_assigned_port():
    with loopfast.Listener() as listener:
        host, port = listener.address
        assert host == "127.0.0.1"
        assert 0 < port < 65536


@needs_ipv6
def test_inet6_family_default_address_is_ipv6_loopback():
    with loopfast.Listener(family="AF_INET6") as listener:
        host, port = listener.address
        assert host == "::1"
        assert 0 < port < 65536


def test_address_is_a_two_tuple_for_ipv6_too():
    if not _ipv6_loopback_available():
        pytest.skip("::1 is not available")
    with loopfast.Listener(("::1", 0)) as listener:
        assert len(listener.address) == 2


def test_explicit_address_and_port_are_used():
    port = _unused_port()
    with loopfast.Listener(("127.0.0.1", port)) as listener:
        assert listener.address == ("127.0.0.1", port)


def test_explicit_address_with_port_zero_gets_a_port():
    with loopfast.Listener(("127.0.0.1", 0), family="AF_INET") as listener:
        assert listener.address[0] == "127.0.0.1"
        assert listener.address[1] > 0


def test_two_listeners_get_different_ports():
    with loopfast.Listener() as a, loopfast.Listener() as b:
        assert a.address[1] != b.address[1]


# ---- accept / last_accepted ---------------------------------------------------------------------


def test_accept_returns_channel_connected_to_the_client():
    with loopfast.Listener() as listener:
        client, server = _connected_pair(listener, lambda: loopfast.Client(listener.address))
        with client, server:
            assert isinstance(server, loopfast.Channel)
            assert server.readable and server.writable
            assert _names(server) == tuple(reversed(_names(client)))
            _assert_talks(client, server)


@needs_ipv6
def test_accept_over_ipv6():
    with loopfast.Listener(family="AF_INET6") as listener:
        client, server = _connected_pair(listener, lambda: loopfast.Client(listener.address))
        with client, server:
            assert _names(server)[0][0] == "::1"
            _assert_talks(client, server)


def test_last_accepted_is_none_before_any_accept():
    with loopfast.Listener() as listener:
        assert listener.last_accepted is None


def test_last_accepted_is_the_clients_loopback_address():
    with loopfast.Listener() as listener:
        client, server = _connected_pair(listener, lambda: loopfast.Client(listener.address))
        with client, server:
            host, port = listener.last_accepted
            assert host.startswith("127.")
            assert (host, port) == _names(client)[0]


def test_last_accepted_follows_each_accept():
    with loopfast.Listener() as listener:
        seen = []
        for _ in range(2):
            client, server = _connected_pair(listener, lambda: loopfast.Client(listener.address))
            with client, server:
                assert listener.last_accepted == _names(client)[0]
                seen.append(listener.last_accepted)
        assert seen[0] != seen[1]


@needs_ipv6
def test_last_accepted_over_ipv6_is_a_two_tuple():
    with loopfast.Listener(family="AF_INET6") as listener:
        client, server = _connected_pair(listener, lambda: loopfast.Client(listener.address))
        with client, server:
            assert listener.last_accepted == ("::1", _names(client)[0][1])


# ---- close / context manager --------------------------------------------------------------------


def test_accept_after_close_raises_oserror():
    listener = loopfast.Listener()
    listener.close()
    with pytest.raises(OSError):
        listener.accept()


def test_close_twice_is_harmless():
    listener = loopfast.Listener()
    listener.close()
    listener.close()


def test_close_stops_listening():
    listener = loopfast.Listener()
    address = listener.address
    listener.close()
    with pytest.raises(ConnectionRefusedError):
        loopfast.Client(address, timeout=5)


def test_context_manager_returns_listener_and_closes_it():
    with loopfast.Listener() as listener:
        assert isinstance(listener, loopfast.Listener)
        address = listener.address
    with pytest.raises(OSError):
        listener.accept()
    with pytest.raises(ConnectionRefusedError):
        loopfast.Client(address, timeout=5)


def test_accepted_channel_outlives_listener():
    listener = loopfast.Listener()
    client, server = _connected_pair(listener, lambda: loopfast.Client(listener.address))
    listener.close()
    with client, server:
        _assert_talks(client, server)


# ---- backlog ------------------------------------------------------------------------------------


def test_backlog_queues_several_clients_before_accept():
    """All clients are connected (TCP handshake done, hello sent) before the first accept()."""
    count = 4
    with loopfast.Listener(backlog=count) as listener:
        raw = []
        try:
            for _ in range(count):
                sock = socket.create_connection(listener.address, timeout=10)
                raw.append(sock)
                sock.sendall(HELLO.pack(b"LOOPFAST", 1, 0, 0, os.urandom(32)))
            servers = [listener.accept() for _ in range(count)]
            clients = []
            for sock in raw:
                hello = b""
                while len(hello) < HELLO.size:
                    chunk = sock.recv(HELLO.size - len(hello))
                    assert chunk
                    hello += chunk
                assert hello.startswith(b"LOOPFAST")
                clients.append(loopfast.Channel(sock.detach()))
            for i, client in enumerate(clients):
                client.send(i)
            assert sorted(server.recv(timeout=10) for server in servers) == list(range(count))
            for channel in clients + servers:
                channel.close()
        finally:
            for sock in raw:
                sock.close()


def test_several_clients_connecting_concurrently_are_all_served():
    count = 5
    with loopfast.Listener(backlog=count) as listener:

        def connect(i):
            channel = loopfast.Client(listener.address, timeout=30)
            channel.send(i)
            return channel

        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(connect, i) for i in range(count)]
            servers = [listener.accept() for _ in range(count)]
            clients = [f.result(timeout=30) for f in futures]
        assert sorted(s.recv(timeout=10) for s in servers) == list(range(count))
        for channel in clients + servers:
            channel.close()


# ---- Client --------------------------------------------------------------------------------------

CONNECTORS = {
    "Client": lambda address: loopfast.Client(address),
    "Client(timeout=10)": lambda address: loopfast.Client(address, timeout=10),
    "Client(family)": lambda address: loopfast.Client(address, family="AF_INET"),
}


@pytest.mark.parametrize("connector", CONNECTORS)
def test_connector_gets_a_working_channel(connector):
    with loopfast.Listener() as listener:
        client, server = _connected_pair(listener, lambda: CONNECTORS[connector](listener.address))
        with client, server:
            assert isinstance(client, loopfast.Channel)
            assert client.readable and client.writable
            _assert_talks(client, server)


@needs_ipv6
@pytest.mark.parametrize("connector", ["Client", "Client(timeout=10)"])
def test_connector_over_ipv6(connector):
    with loopfast.Listener(family="AF_INET6") as listener:
        client, server = _connected_pair(listener, lambda: CONNECTORS[connector](listener.address))
        with client, server:
            _assert_talks(client, server)


def test_connector_accepts_a_list_address():
    with loopfast.Listener() as listener:
        address = list(listener.address)
        client, server = _connected_pair(listener, lambda: loopfast.Client(address, timeout=10))
        with client, server:
            _assert_talks(client, server)


def test_max_message_size_keyword_reaches_the_channels():
    with loopfast.Listener(max_message_size=1000) as listener:
        client, server = _connected_pair(
            listener, lambda: loopfast.Client(listener.address, max_message_size=2000))
        with client, server:
            assert server.max_message_size == 1000
            assert client.max_message_size == 2000


@pytest.mark.parametrize("connector", CONNECTORS)
def test_connecting_where_nothing_listens_raises_connection_refused(connector):
    with pytest.raises(ConnectionRefusedError):
        CONNECTORS[connector](("127.0.0.1", _unused_port()))


# ---- handshakes side by side: a silent or slow client holds up no one ----------------------------

def _client_in_thread(pool, address, authkey=None):
    return pool.submit(loopfast.Client, address, authkey=authkey, timeout=30)


@pytest.mark.parametrize("stall", ["silent", "half-hello"])
def test_a_stalled_client_does_not_hold_up_the_next_one(stall):
    """With serial handshakes, accept() would wait out the stalled client's handshake_timeout
    and raise TimeoutError; instead it returns the good client that connected after it."""
    with loopfast.Listener(authkey=b"key", handshake_timeout=20) as listener, \
            socket.create_connection(listener.address, timeout=30) as stalled, \
            ThreadPoolExecutor(1) as pool:
        if stall == "half-hello":
            stalled.sendall(b"LOOPFAST\x01")
        good = _client_in_thread(pool, listener.address, b"key")
        with listener.accept() as server, good.result(timeout=30) as client:
            assert listener.last_accepted == client_address(client)
            client.send_bytes(b"through")
            assert server.recv_bytes(timeout=30) == b"through"


def client_address(channel):
    with socket.socket(fileno=os.dup(channel.fileno())) as sock:
        return sock.getsockname()[:2]


def test_a_stalled_client_times_out_at_a_later_accept_and_is_disconnected():
    with loopfast.Listener(handshake_timeout=0.5) as listener, \
            socket.create_connection(listener.address, timeout=30) as stalled, \
            ThreadPoolExecutor(1) as pool:
        good = _client_in_thread(pool, listener.address)
        with listener.accept(), good.result(timeout=30):
            pass
        with pytest.raises(TimeoutError, match="did not complete the loopfast handshake"):
            listener.accept()
        data = b""
        while True:  # the listener's hello, then the end of the connection
            chunk = stalled.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data[:8] == b"LOOPFAST" and len(data) == HELLO.size


def test_a_failed_handshake_raises_and_the_handshakes_under_way_carry_on():
    with loopfast.Listener(authkey=b"key", handshake_timeout=20) as listener, \
            socket.create_connection(listener.address, timeout=30) as stalled, \
            ThreadPoolExecutor(2) as pool:
        wrong = _client_in_thread(pool, listener.address, b"wrong")
        with pytest.raises(loopfast.AuthenticationError):
            listener.accept()
        with pytest.raises(loopfast.AuthenticationError):
            wrong.result(timeout=30)
        good = _client_in_thread(pool, listener.address, b"key")
        with listener.accept() as server, good.result(timeout=30) as client:
            client.send_bytes(b"ok")
            assert server.recv_bytes(timeout=30) == b"ok"
        assert stalled.recv(HELLO.size)[:8] == b"LOOPFAST"  # still connected, still waited on


def test_close_from_another_thread_wakes_a_blocked_accept():
    # accept() sleeps in a selector with no timeout: close() must wake it (OSError), and the
    # port must be free when close() returns (nothing left listening), as a Channel's close()
    # wakes its receiver.
    listener = loopfast.Listener()
    address = listener.address
    with ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(listener.accept)
        _wait_until_accepting(listener)
        listener.close()
        with pytest.raises(OSError, match="listener is closed"):
            blocked.result(timeout=30)
    with pytest.raises(ConnectionRefusedError):
        loopfast.Client(address, timeout=5)
    listener.close()  # again: harmless


def test_close_from_another_thread_while_handshakes_are_pending():
    # The accepting thread is waiting on a stalled handshake when another thread closes the
    # listener: accept() raises OSError, the stalled client is disconnected after its hello.
    listener = loopfast.Listener(handshake_timeout=20)
    with socket.create_connection(listener.address, timeout=30) as stalled, \
            ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(listener.accept)
        assert stalled.recv(HELLO.size)[:8] == b"LOOPFAST"  # its handshake has begun
        listener.close()
        with pytest.raises(OSError, match="listener is closed"):
            blocked.result(timeout=30)
        assert stalled.recv(4096) == b""


def _wait_until_accepting(listener, limit=30.0):
    """Return once an accept() has made the listener's selector (it is in, or about to enter,
    its wait)."""
    deadline = time.monotonic() + limit
    while listener._selector is None:
        assert time.monotonic() < deadline, "accept() did not start"
        time.sleep(0.01)
    time.sleep(0.05)  # from taking the lock to sleeping in the selector


def test_close_disconnects_the_clients_whose_handshake_had_not_finished():
    listener = loopfast.Listener(handshake_timeout=20)
    with socket.create_connection(listener.address, timeout=30) as stalled, \
            ThreadPoolExecutor(1) as pool:
        good = _client_in_thread(pool, listener.address)
        with listener.accept(), good.result(timeout=30):
            pass
        listener.close()
        data = b""
        while True:
            chunk = stalled.recv(4096)
            if not chunk:
                break
            data += chunk
        assert len(data) == HELLO.size  # the hello it got, then the end


def test_two_threads_accepting_at_once_each_get_a_client():
    with loopfast.Listener(backlog=4) as listener, ThreadPoolExecutor(4) as pool:
        accepts = [pool.submit(listener.accept) for _ in range(2)]
        clients = [_client_in_thread(pool, listener.address) for _ in range(2)]
        servers = [future.result(timeout=30) for future in accepts]
        connected = [future.result(timeout=30) for future in clients]
        try:
            for i, client in enumerate(connected):
                client.send_bytes(b"%d" % i)
            got = sorted(server.recv_bytes(timeout=30) for server in servers)
            assert got == [b"0", b"1"]
        finally:
            for channel in servers + connected:
                channel.close()


def test_a_peer_that_is_not_loopfast_is_refused_at_its_first_wrong_byte():
    """No wait for a whole hello (or for handshake_timeout): 4 bytes of HTTP are enough."""
    with loopfast.Listener(handshake_timeout=60) as listener, \
            socket.create_connection(listener.address, timeout=30) as raw:
        raw.sendall(b"GET ")
        with pytest.raises(loopfast.ProtocolError, match="not a loopfast channel"):
            listener.accept()


def test_both_listeners_default_to_a_backlog_that_holds_a_burst():
    # One default for the sync and the asyncio Listener (asyncio.start_server's 100): a burst of
    # connects fits in it instead of waiting for SYN retries.
    import inspect

    import loopfast.aio
    defaults = {inspect.signature(f).parameters["backlog"].default
                for f in (loopfast.Listener, loopfast.aio.Listener, loopfast.aio.start_listener)}
    assert defaults == {100}


def test_a_burst_of_connects_fits_in_the_default_backlog():
    # 64 connections made before anyone accepts: the kernel completes each one in the backlog
    # (with multiprocessing's backlog of 1 the second connect would wait for SYN retries that
    # never succeed while nobody accepts, and time out).
    with loopfast.Listener() as listener:
        raws = []
        try:
            for _ in range(64):
                raws.append(socket.create_connection(listener.address, timeout=30))
            assert all(raw.getpeername()[:2] == listener.address for raw in raws)
        finally:
            for raw in raws:
                raw.close()
