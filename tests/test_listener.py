"""Listener, Client and Channel.connect: addresses, accept, last_accepted, close, backlog."""

import os
import socket
import struct
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


# ---- Client and Channel.connect -----------------------------------------------------------------

CONNECTORS = {
    "Client": lambda address: loopfast.Client(address),
    "Client(timeout=10)": lambda address: loopfast.Client(address, timeout=10),
    "Client(family)": lambda address: loopfast.Client(address, family="AF_INET"),
    "Channel.connect": lambda address: loopfast.Channel.connect(address),
    "Channel.connect(timeout=10)": lambda address: loopfast.Channel.connect(address, timeout=10),
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
@pytest.mark.parametrize("connector", ["Client(timeout=10)", "Channel.connect"])
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
