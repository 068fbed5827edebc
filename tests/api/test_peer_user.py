"""Same user only, by default: the user at the other end of a loopback connection is found out
(Linux: a NETLINK_SOCK_DIAG query for the connection's 4-tuple) and a peer of another user is
refused with AuthenticationError, naming both users, before any byte it sent is read.

The other user is real: a forked child that drops to `nobody` (uid 65534) before it makes its
socket, as a hostile local process would be. Everything talks to 127.0.0.1 or ::1 only.
"""

import asyncio
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys

import pytest
from conftest import HELLO, IPV6_AVAILABLE, MAGIC, PROTOCOL_VERSION

import loopfast
import loopfast.aio
from loopfast import AuthenticationError, _peer

NOBODY = 65534
ME = os.geteuid() if hasattr(os, "geteuid") else None
TIMEOUT = 30

pytestmark = pytest.mark.timeout(120)

needs_identity = pytest.mark.skipif(_peer.mechanism() is None,
                                    reason="this platform cannot tell a TCP peer's user")
needs_root = pytest.mark.skipif(ME != 0 or "fork" not in multiprocessing.get_all_start_methods(),
                                reason="dropping a child to another user needs root and fork")

FAMILIES = ["AF_INET"] + (["AF_INET6"] if IPV6_AVAILABLE else [])
HOSTS = {"AF_INET": "127.0.0.1", "AF_INET6": "::1"}
GARBAGE = b"\xff" * 64  # not a hello: a refusal must come before it is looked at


def _hello():
    return HELLO.pack(MAGIC, PROTOCOL_VERSION, 0, 0, os.urandom(32))


def _as_nobody(target, *args):
    """Run target(results, *args) in a forked child that is user `nobody` before it does
    anything; return (process, results queue)."""
    results = multiprocessing.get_context("fork").SimpleQueue()

    def child():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        try:
            target(results, *args)
        except BaseException as exc:
            results.put(("error", type(exc).__name__, str(exc)))

    process = multiprocessing.get_context("fork").Process(target=child, daemon=True)
    process.start()
    return process, results


def _get(results, process):
    """The next result from the child (bounded)."""
    import select
    reader = results._reader
    ready, _, _ = select.select([reader], [], [], TIMEOUT)
    assert ready, f"no answer from the child (alive: {process.is_alive()})"
    return results.get()


# ---- children (they run as nobody) ------------------------------------------------------------

def _raw_client(results, address, family, payload):
    sock = socket.socket(getattr(socket, family), socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(address)
    sock.sendall(payload)
    results.put(("sent", len(payload)))
    try:
        data = sock.recv(1)  # wait until the server hangs up
    except OSError as exc:
        data = repr(exc).encode()
    results.put(("closed", data))


def _loopfast_client(results, address, family):
    channel = loopfast.Client(address, family, allow_users="any", timeout=TIMEOUT)
    channel.send(("hello from", os.getuid()))
    results.put(("reply", channel.recv(timeout=TIMEOUT), channel.peer_uid))
    channel.close()


def _loopfast_listener(results, family, authkey):
    with loopfast.Listener(family=family, authkey=authkey, allow_users="any") as listener:
        results.put(("address", listener.address))
        try:
            with listener.accept() as channel:
                channel.send("secret from nobody")
                results.put(("served", channel.peer_uid))
        except Exception as exc:
            results.put(("accept failed", type(exc).__name__, str(exc)))


# ---- listeners refuse another user's client ------------------------------------------------------

@needs_identity
@needs_root
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("authkey", [None, b"key"], ids=["no-authkey", "authkey"])
@pytest.mark.parametrize("payload", [b"", GARBAGE, None], ids=["silent", "garbage", "hello"])
def test_listener_refuses_another_users_client_before_reading(family, authkey, payload):
    with loopfast.Listener(family=family, authkey=authkey) as listener:
        process, results = _as_nobody(_raw_client, listener.address, family,
                                      _hello() if payload is None else payload)
        assert _get(results, process)[0] == "sent"
        with pytest.raises(AuthenticationError) as info:
            listener.accept()
        message = str(info.value)
        assert f"uid {NOBODY}" in message and f"uid {ME}" in message
        assert "allow_users" in message
        assert listener.last_accepted[0] == HOSTS[family]
        closed = _get(results, process)
        if payload == b"":
            assert closed == ("closed", b"")  # hung up on, nothing sent back
        else:  # closed with the bytes it sent still unread: the kernel resets the connection
            assert closed[0] == "closed" and b"ConnectionResetError" in closed[1], closed
        process.join(TIMEOUT)


@needs_identity
@needs_root
@pytest.mark.parametrize("allow", [{NOBODY}, [NOBODY, 12345], "any"], ids=str)
def test_listener_accepts_another_user_when_allowed(allow):
    with loopfast.Listener(allow_users=allow) as listener:
        process, results = _as_nobody(_loopfast_client, listener.address, "AF_INET")
        with listener.accept() as channel:
            assert channel.recv(timeout=TIMEOUT) == ("hello from", NOBODY)
            assert channel.peer_uid == NOBODY
            # let in without an authkey: its frames get memory only as their bytes arrive
            assert not channel._trusted
            channel.send("hi nobody")
            assert _get(results, process) == ("reply", "hi nobody", ME)
        process.join(TIMEOUT)
        assert process.exitcode == 0


@needs_identity
@needs_root
def test_listener_is_usable_after_refusing():
    with loopfast.Listener() as listener:
        process, results = _as_nobody(_raw_client, listener.address, "AF_INET", _hello())
        _get(results, process)
        with pytest.raises(AuthenticationError):
            listener.accept()
        process.join(TIMEOUT)
        with loopfast.Client(listener.address, timeout=TIMEOUT) as client:
            with listener.accept() as server:
                client.send_bytes(b"same user")
                assert server.recv_bytes(timeout=TIMEOUT) == b"same user"
                assert server.peer_uid == ME and client.peer_uid == ME


# ---- clients refuse another user's listener ------------------------------------------------------

@needs_identity
@needs_root
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("authkey", [None, b"key"], ids=["no-authkey", "authkey"])
def test_client_refuses_another_users_listener(family, authkey):
    process, results = _as_nobody(_loopfast_listener, family, authkey)
    kind, address = _get(results, process)
    assert kind == "address"
    with pytest.raises(AuthenticationError) as info:
        # Without an authkey Client returns once connected and the listener's hello is checked
        # at first use: the refusal comes there, before anything is delivered.
        channel = loopfast.Client(address, family, authkey=authkey, timeout=TIMEOUT)
        with channel:
            channel.recv(timeout=TIMEOUT)
    message = str(info.value)
    assert f"uid {NOBODY}" in message and f"uid {ME}" in message
    outcome = _get(results, process)
    assert outcome[0] in ("served", "accept failed")
    process.join(TIMEOUT)


@needs_identity
@needs_root
def test_client_accepts_another_users_listener_when_allowed():
    process, results = _as_nobody(_loopfast_listener, "AF_INET", None)
    _, address = _get(results, process)
    with loopfast.Client(address, allow_users={NOBODY}, timeout=TIMEOUT) as channel:
        assert channel.recv(timeout=TIMEOUT) == "secret from nobody"
        assert channel.peer_uid == NOBODY
    assert _get(results, process) == ("served", ME)
    process.join(TIMEOUT)


# ---- asyncio ------------------------------------------------------------------------------------

@needs_identity
@needs_root
def test_aio_listener_refuses_another_users_client():
    async def main():
        async with await loopfast.aio.start_listener() as listener:
            process, results = _as_nobody(_raw_client, listener.address, "AF_INET", _hello())
            with pytest.raises(AuthenticationError, match=f"uid {NOBODY}"):
                await asyncio.wait_for(listener.accept(), TIMEOUT)
            return process, results

    process, results = asyncio.run(main())
    assert _get(results, process)[0] == "sent"
    process.join(TIMEOUT)


@needs_identity
@needs_root
def test_aio_open_channel_refuses_another_users_listener():
    process, results = _as_nobody(_loopfast_listener, "AF_INET", None)
    _, address = _get(results, process)

    async def main():
        with pytest.raises(AuthenticationError, match=f"uid {NOBODY}"):
            await loopfast.aio.open_channel(address, handshake_timeout=TIMEOUT)

    asyncio.run(main())
    process.join(TIMEOUT)


@needs_identity
def test_aio_same_user_has_peer_uid():
    async def main():
        async with await loopfast.aio.start_listener() as listener:
            client_task = asyncio.ensure_future(loopfast.aio.open_channel(listener.address))
            server = await asyncio.wait_for(listener.accept(), TIMEOUT)
            client = await asyncio.wait_for(client_task, TIMEOUT)
            async with client, server:
                assert server.channel.peer_uid == ME == client.channel.peer_uid

    asyncio.run(main())


# ---- the same user -------------------------------------------------------------------------------

@needs_identity
@pytest.mark.parametrize("family", FAMILIES)
def test_same_user_peer_uid_and_pid(family):
    with loopfast.Listener(family=family) as listener:
        with loopfast.Client(listener.address, family, timeout=TIMEOUT) as client:
            with listener.accept() as server:
                client.send_bytes(b"x")
                assert server.recv_bytes(timeout=TIMEOUT) == b"x"
                assert server.peer_uid == ME and client.peer_uid == ME
                assert server.peer_pid == os.getpid() == client.peer_pid
    assert client.peer_pid is None  # closed


def _report_peer(channel, results):
    results.put((channel.peer_uid, os.getpid()))
    channel.send_bytes(b"ok")


def test_pipe_ends_have_this_user_and_keep_it_in_a_child():
    a, b = loopfast.Pipe()
    with a, b:
        assert a.peer_uid == ME == b.peer_uid
        results = multiprocessing.get_context("spawn").SimpleQueue()
        process = multiprocessing.get_context("spawn").Process(target=_report_peer,
                                                               args=(b, results))
        process.start()
        assert a.recv_bytes(timeout=TIMEOUT) == b"ok"
        uid, pid = results.get()
        process.join(TIMEOUT)
        assert uid == ME and pid == process.pid


@needs_identity
def test_peer_pid_names_the_child_process():
    with loopfast.Listener() as listener:
        results = multiprocessing.get_context("spawn").SimpleQueue()
        process = multiprocessing.get_context("spawn").Process(
            target=_client_reports_pid, args=(listener.address, results))
        process.start()
        with listener.accept() as server:
            # Until accept() a connection is held by no process: the client asks only after
            # this message, and this end stays open until it has answered.
            server.send("accepted")
            assert server.recv(timeout=TIMEOUT) == process.pid
            assert server.peer_pid == process.pid
            assert results.get() == os.getpid()
            server.send("done")
        process.join(TIMEOUT)


def _client_reports_pid(address, results):
    with loopfast.Client(address, timeout=TIMEOUT) as channel:
        assert channel.recv(timeout=TIMEOUT) == "accepted"
        channel.send(os.getpid())
        results.put(channel.peer_pid)
        channel.recv(timeout=TIMEOUT)


# ---- allow_users ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["anyone", "", [-1], [1.5], [True]], ids=repr)
def test_allow_users_values_are_checked(bad):
    with pytest.raises(ValueError, match="allow_users"):
        loopfast.Listener(allow_users=bad)


@pytest.mark.parametrize("bad", [5, object()], ids=repr)
def test_allow_users_must_be_a_collection(bad):
    with pytest.raises(TypeError, match="allow_users"):
        loopfast.Client(("127.0.0.1", 1), allow_users=bad)


def test_allowed_users_always_include_this_user():
    assert _peer.allowed_users(None) == {_peer.local_user()}
    assert _peer.allowed_users([7]) == {7, _peer.local_user()}
    assert _peer.allowed_users("any") is None


def test_a_platform_that_cannot_tell_fails_closed(monkeypatch):
    # As on a platform without a mechanism (the seam says None): refused unless any is allowed.
    monkeypatch.setattr(_peer, "mechanism", lambda: None)
    with loopfast.Listener() as listener:
        with loopfast.Client(listener.address, allow_users="any", timeout=TIMEOUT):
            with pytest.raises(AuthenticationError, match="cannot tell.*allow_users='any'"):
                listener.accept()
    with loopfast.Listener(allow_users="any") as listener:
        with loopfast.Client(listener.address, allow_users="any", timeout=TIMEOUT) as client:
            with listener.accept() as server:
                client.send_bytes(b"any")
                assert server.recv_bytes(timeout=TIMEOUT) == b"any"
                assert server.peer_uid is None and client.peer_uid is None


# ---- the query itself ----------------------------------------------------------------------------

@needs_identity
def test_sock_diag_finds_both_ends_and_their_inodes():
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname(), timeout=TIMEOUT) as client:
            accepted, _ = server.accept()
            with accepted:
                of_client = _peer.peer_identity(accepted.fileno())
                of_server = _peer.peer_identity(client.fileno())
                assert of_client.uid == ME == of_server.uid
                assert of_client.inode == os.fstat(client.fileno()).st_ino
                assert of_server.inode == os.fstat(accepted.fileno()).st_ino


@needs_identity
def test_sock_diag_says_gone_for_a_closed_peer():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=TIMEOUT)
        accepted, _ = server.accept()
        with accepted:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # reset: the peer's socket is gone at once
            assert _peer.peer_identity(accepted.fileno()) is None
            with pytest.raises(loopfast.ProtocolError, match="before its user could be checked"):
                _peer.check_peer_user(accepted.fileno(), frozenset({ME}))


if sys.platform.startswith("linux"):
    def test_mechanism_on_linux():
        assert _peer.mechanism() == "sock_diag"


_FIRST_QUERY_AT_THE_LIMIT = """
import errno, json, os, resource, sys
import loopfast
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
filler = []
while True:
    try:
        filler.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
os.close(filler.pop())  # one descriptor free: the client's socket, none for the query
try:
    loopfast.Client(tuple(json.loads(sys.argv[1])), timeout=30)
except Exception as exc:
    print(type(exc).__name__, getattr(exc, "errno", None) == errno.EMFILE)
"""


@needs_identity
@pytest.mark.skipif(not hasattr(os, "fork"), reason="RLIMIT_NOFILE is POSIX")
def test_no_descriptor_for_the_first_query_is_an_oserror_not_a_refusal():
    with loopfast.Listener() as listener:
        child = subprocess.run([sys.executable, "-c", _FIRST_QUERY_AT_THE_LIMIT,
                                json.dumps(listener.address)],
                               capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["OSError", "True"]
