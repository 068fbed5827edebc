"""Loopback-only addressing: every address that is not loopback is refused with ValueError before
any socket is created, and no name is ever resolved ('localhost' means 127.0.0.1, or ::1 with
family='AF_INET6', without a lookup: no DNS query can leave the machine).

The refusal tests install a spy (not a replacement) on socket creation and name resolution: if
loopfast reached either, the spy fails the test. No test here ever sends a packet to a
non-loopback address.
"""

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

import loopfast
from loopfast import _address

pytestmark = pytest.mark.timeout(60)

REFUSED_HOSTS = [
    "0.0.0.0",
    "::",
    "192.168.1.10",
    "10.0.0.1",
    "8.8.8.8",
    "2001:db8::1",
    "example.com",
    "",
    "::ffff:192.168.1.10",  # an IPv4-mapped LAN address is still a LAN address
    "fe80::1",
    "224.0.0.1",
]


def _listener(address, **kw):
    return loopfast.Listener(address, **kw)


def _client(address, **kw):
    return loopfast.Client(address, timeout=5, **kw)


OPENERS = {
    "Listener": _listener,
    "Client": _client,
}


class _NoTraffic:
    """Fails the test if a socket is created or a name is resolved while it is installed."""

    def __init__(self, monkeypatch, resolver=None):
        self.sockets = []
        self.lookups = []
        real_socket = socket.socket
        spy = self

        class SpySocket(real_socket):
            def __init__(self, *args, **kwargs):
                spy.sockets.append(args)
                raise AssertionError(f"loopfast created a socket {args!r} for a refused address")

        def spy_getaddrinfo(host, *args, **kwargs):
            self.lookups.append(host)
            if resolver is not None:
                return resolver(host, *args, **kwargs)
            raise AssertionError(f"loopfast resolved {host!r}")

        monkeypatch.setattr(socket, "socket", SpySocket)
        monkeypatch.setattr(socket, "getaddrinfo", spy_getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", SpySocket)


@pytest.fixture
def no_traffic(monkeypatch):
    return _NoTraffic(monkeypatch)


def _connected_pair(listener, connect):
    """(client, server): run `connect` in a thread (it waits for the handshake) and accept."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(connect)
        server = listener.accept()
        return future.result(timeout=30), server


def _ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# ---- non-loopback hosts -------------------------------------------------------------------------


@pytest.mark.parametrize("opener", OPENERS, ids=str)
@pytest.mark.parametrize("host", REFUSED_HOSTS, ids=repr)
def test_non_loopback_host_is_refused_before_any_socket(no_traffic, opener, host):
    with pytest.raises(ValueError, match="loopback"):
        OPENERS[opener]((host, 5000))
    assert no_traffic.sockets == []
    assert no_traffic.lookups == []


@pytest.mark.parametrize("opener", OPENERS, ids=str)
def test_host_name_is_not_resolved(no_traffic, opener):
    with pytest.raises(ValueError, match="example.com"):
        OPENERS[opener](("example.com", 80))
    assert no_traffic.lookups == []


def test_refused_listener_with_port_zero(no_traffic):
    with pytest.raises(ValueError, match="loopback"):
        loopfast.Listener(("0.0.0.0", 0))


@pytest.mark.parametrize("host", [b"0.0.0.0", b"192.168.1.10"], ids=repr)
def test_non_loopback_bytes_host_is_refused(no_traffic, host):
    with pytest.raises(ValueError, match="loopback"):
        loopfast.Client((host, 5000), timeout=5)


# ---- AF_UNIX / AF_PIPE ------------------------------------------------------------------------


@pytest.mark.parametrize("opener", OPENERS, ids=str)
@pytest.mark.parametrize("address", ["/tmp/loopfast-test.sock", "\0abstract", r"\\.\pipe\loopfast"],
                         ids=repr)
def test_string_address_is_refused_as_not_loopback_tcp(no_traffic, opener, address):
    with pytest.raises(ValueError, match="TCP over loopback"):
        OPENERS[opener](address)
    assert no_traffic.sockets == []


@pytest.mark.parametrize("family", ["AF_UNIX", "AF_PIPE"])
def test_unix_and_pipe_family_refused_by_listener(no_traffic, family):
    with pytest.raises(ValueError, match="TCP over loopback"):
        loopfast.Listener(family=family)


@pytest.mark.parametrize("family", ["AF_UNIX", "AF_PIPE"])
def test_unix_and_pipe_family_refused_by_client(no_traffic, family):
    with pytest.raises(ValueError, match="TCP over loopback"):
        loopfast.Client(("127.0.0.1", 5000), family=family, timeout=5)


@pytest.mark.parametrize("family", ["AF_UNIX", "AF_PIPE"])
def test_unix_and_pipe_family_refused_by_a_client_with_a_timeout(no_traffic, family):
    with pytest.raises(ValueError, match="TCP over loopback"):
        loopfast.Client(("127.0.0.1", 5000), family=family, timeout=5)


@pytest.mark.parametrize("family", ["AF_UNIX", "AF_PIPE", "AF_INET7"])
def test_unsupported_family_refused_by_pipe(no_traffic, family):
    with pytest.raises(ValueError, match="TCP over loopback"):
        loopfast.Pipe(family=family)


# ---- malformed addresses ------------------------------------------------------------------------


@pytest.mark.parametrize("opener", OPENERS, ids=str)
@pytest.mark.parametrize("port", [-1, 65536, 1 << 40, "80", 1.5, None, True], ids=repr)
def test_bad_port_is_refused(no_traffic, opener, port):
    with pytest.raises(ValueError, match="port"):
        OPENERS[opener](("127.0.0.1", port))
    assert no_traffic.sockets == []


@pytest.mark.parametrize("address", [("127.0.0.1",), (), 5000, None], ids=repr)
def test_address_that_is_not_host_port_pair_is_refused(no_traffic, address):
    with pytest.raises(ValueError):
        loopfast.Client(address, timeout=5)


@pytest.mark.parametrize("opener", OPENERS, ids=str)
@pytest.mark.parametrize("host,family", [("::1", "AF_INET"), ("127.0.0.1", "AF_INET6")])
def test_family_mismatch_is_refused(no_traffic, opener, host, family):
    with pytest.raises(ValueError, match="family"):
        OPENERS[opener]((host, 5000), family=family)
    assert no_traffic.sockets == []


# ---- loopback addresses that are accepted -------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.2", "127.255.255.254"])
def test_any_127_8_address_is_accepted(host):
    with loopfast.Listener((host, 0)) as listener:
        assert listener.address[0] == host
        assert listener.address[1] > 0
        client, server = _connected_pair(
            listener, lambda: loopfast.Client(listener.address, timeout=10))
        with client, server:
            client.send_bytes(b"ping")
            assert server.recv_bytes(timeout=10) == b"ping"
            server.send_bytes(b"pong")
            assert client.recv_bytes(timeout=10) == b"pong"


def test_ipv6_loopback_is_accepted():
    if not _ipv6_loopback_available():
        pytest.skip("::1 is not available")
    with loopfast.Listener(("::1", 0)) as listener:
        assert listener.address[0] == "::1"
        client, server = _connected_pair(
            listener, lambda: loopfast.Client(("::1", listener.address[1]), timeout=10))
        with client, server:
            client.send(("v6", 1))
            assert server.recv(timeout=10) == ("v6", 1)


@pytest.mark.parametrize("host", ["localhost", "localhost.", "LocalHost"])
@pytest.mark.parametrize("family, expected", [(None, "127.0.0.1"), ("AF_INET", "127.0.0.1"),
                                              ("AF_INET6", "::1")])
def test_localhost_is_loopback_without_a_lookup(monkeypatch, host, family, expected):
    def refuse(name, *args, **kwargs):
        raise AssertionError(f"loopfast resolved {name!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # a tampered /etc/hosts or DNS: unused
    fam, sockaddr = _address.resolve((host, 5000), family)
    assert sockaddr[:2] == (expected, 5000)
    assert fam == (socket.AF_INET6 if expected == "::1" else socket.AF_INET)


@pytest.mark.parametrize("family", [None, "AF_INET6"])
def test_localhost_listener_and_client_never_resolve(monkeypatch, family):
    if family == "AF_INET6" and not _ipv6_loopback_available():
        pytest.skip("::1 is not available")
    lookups = []
    real = socket.getaddrinfo

    def spy(name, *args, **kwargs):
        lookups.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    with loopfast.Listener(("localhost.", 0), family) as listener:
        host, port = listener.address
        assert host == ("::1" if family else "127.0.0.1")
        client, server = _connected_pair(
            listener, lambda: loopfast.Client(("localhost", port), family, timeout=10))
        with client, server:
            client.send_bytes(b"hi")
            assert server.recv_bytes(timeout=10) == b"hi"
    assert not [name for name in lookups if "localhost" in str(name).lower()], lookups


@pytest.mark.parametrize("opener", OPENERS, ids=str)
@pytest.mark.parametrize("host", ["::1%lo", "::1%1", "fe80::1%lo", "127.0.0.1%lo"])
def test_scope_id_is_refused_up_front(no_traffic, opener, host):
    with pytest.raises(ValueError, match="scope|loopback"):
        OPENERS[opener]((host, 5000))
    assert no_traffic.sockets == [] and no_traffic.lookups == []


def test_scope_id_message_names_the_fix():
    with pytest.raises(ValueError, match=r"scope \(zone\) id.*'::1'"):
        _address.resolve(("::1%lo", 1))


# ---- check_peer (defence in depth on accepted connections) --------------------------------------


@pytest.mark.parametrize("sockaddr", [
    ("192.168.1.10", 40000),
    ("10.0.0.1", 1),
    ("0.0.0.0", 1),
    ("2001:db8::1", 40000, 0, 0),
    ("::ffff:192.168.1.10", 40000, 0, 0),
    ("fe80::1%eth0", 40000, 0, 2),
    ("", 0),
], ids=lambda s: repr(s[0]))
def test_check_peer_refuses_non_loopback_peer(sockaddr):
    with pytest.raises(ValueError, match="loopback"):
        _address.check_peer(sockaddr)


@pytest.mark.parametrize("sockaddr", [
    ("127.0.0.1", 40000),
    ("127.1.2.3", 40000),
    ("::1", 40000, 0, 0),
    ("::ffff:127.0.0.1", 40000, 0, 0),
], ids=lambda s: repr(s[0]))
def test_check_peer_accepts_loopback_peer(sockaddr):
    assert _address.check_peer(sockaddr) is None

