"""authkey: mutual HMAC-SHA256 challenge-response before any message is delivered; and Pipe(),
whose ends authenticate each other and never pair with a foreign connector.

Raw peers follow docs/protocol.md: hello "<8sHHI32s" = (b"LOOPFAST", 1, flags, 0, nonce), flag
bit 0 = has authkey; then proof = HMAC-SHA256(SHA-256(key), label + sender_hello + receiver_hello).
"""

import asyncio
import hashlib
import hmac
import multiprocessing
import os
import pickle
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import loopfast
import loopfast.aio
from loopfast import AuthenticationError

pytestmark = pytest.mark.timeout(60)

KEY = b"the right key"
HELLO = struct.Struct("<8sHHI32s")
FRAME_HEADER = struct.Struct("<BBHIQ")
FLAG_AUTH = 1
LISTENER_LABEL = b"loopfast-1 listener proof"
CONNECTOR_LABEL = b"loopfast-1 connector proof"


def hello(flags=FLAG_AUTH):
    return HELLO.pack(b"LOOPFAST", 1, flags, 0, os.urandom(32))


def proof(key, label, sender_hello, receiver_hello):
    """docs/protocol.md: HMAC-SHA256 keyed with SHA-256(authkey)."""
    return hmac.new(hashlib.sha256(key).digest(), label + sender_hello + receiver_hello,
                    "sha256").digest()


def frame(payload, kind=1):
    return FRAME_HEADER.pack(kind, 0, 0, 0, len(payload)) + payload


def recv_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def reset(sock):
    """Close `sock` with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _connected_pair(listener, connect):
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(connect)
        server = listener.accept()
        return future.result(timeout=30), server


def _both_sides(listener, connect):
    """Run `connect` in a thread and accept(); return (client outcome, server outcome), each the
    channel or the exception raised."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(connect)
        try:
            server = listener.accept()
        except Exception as exc:
            server = exc
        try:
            client = future.result(timeout=30)
        except Exception as exc:
            client = exc
    return client, server


def _unused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DELIVERED = []


def _mark_delivered(what):
    DELIVERED.append(what)
    return what


class _Evil:
    """Unpickling this records that a message was delivered (and would run code)."""

    def __reduce__(self):
        return _mark_delivered, ("evil pickle",)


@pytest.fixture
def nothing_delivered():
    DELIVERED.clear()
    yield
    assert DELIVERED == []


# ---- keys that match, keys that do not --------------------------------------------------------


def test_matching_authkey_messages_flow_both_ways():
    with loopfast.Listener(authkey=KEY) as listener:
        client, server = _connected_pair(
            listener, lambda: loopfast.Client(listener.address, authkey=KEY, timeout=30))
        with client, server:
            client.send("to server")
            assert server.recv(timeout=10) == "to server"
            server.send_bytes(b"to client")
            assert client.recv_bytes(timeout=10) == b"to client"


def test_matching_authkey_with_a_client_timeout():
    with loopfast.Listener(authkey=KEY) as listener:
        client, server = _connected_pair(
            listener, lambda: loopfast.Client(listener.address, authkey=KEY, timeout=30))
        with client, server:
            server.send(1)
            assert client.recv(timeout=10) == 1


def test_wrong_authkey_fails_on_both_sides():
    with loopfast.Listener(authkey=KEY) as listener:
        client, server = _both_sides(
            listener, lambda: loopfast.Client(listener.address, authkey=b"wrong", timeout=30))
    assert isinstance(client, AuthenticationError)
    assert isinstance(server, AuthenticationError)


@pytest.mark.parametrize("listener_key,client_key", [(KEY, None), (None, KEY)],
                         ids=["listener-only", "client-only"])
def test_authkey_on_one_side_only_fails_on_both_sides(listener_key, client_key):
    with loopfast.Listener(authkey=listener_key) as listener:
        client, server = _both_sides(
            listener, lambda: loopfast.Client(listener.address, authkey=client_key, timeout=30))
    if client_key is None:
        # Without an authkey Client returns once connected (as multiprocessing's does): the
        # listener's hello is checked at the channel's first use, which raises what it found.
        assert isinstance(client, loopfast.Channel)
        with pytest.raises(AuthenticationError,
                           match="^the peer requires an authkey, and none was given$"):
            client.recv(timeout=30)
        assert client.closed
        client.close()
    else:
        assert isinstance(client, AuthenticationError)
    assert isinstance(server, AuthenticationError)


@pytest.mark.parametrize("opener", ["Listener", "Client", "aio.open_channel",
                                    "aio.start_listener"])
def test_empty_authkey_is_refused_up_front(opener):
    # An empty key would authenticate any peer: refused before any socket, with ValueError.
    port = _unused_port()
    openers = {
        "Listener": lambda: loopfast.Listener(authkey=b""),
        "Client": lambda: loopfast.Client(("127.0.0.1", port), authkey=b"", timeout=5),
        "aio.open_channel": lambda: asyncio.run(
            loopfast.aio.open_channel(("127.0.0.1", port), authkey=b"")),
        "aio.start_listener": lambda: asyncio.run(loopfast.aio.start_listener(authkey=b"")),
    }
    with pytest.raises(ValueError, match="authkey is empty"):
        openers[opener]()


@pytest.mark.parametrize("authkey", ["secret", bytearray(b"secret"), memoryview(b"secret"), 1])
def test_listener_authkey_must_be_bytes(authkey):
    with pytest.raises(TypeError):
        loopfast.Listener(authkey=authkey)


@pytest.mark.parametrize("authkey", ["secret", bytearray(b"secret"), 1])
def test_client_authkey_must_be_bytes(authkey):
    # The port has no listener: the TypeError must come before any connection attempt.
    with pytest.raises(TypeError):
        loopfast.Client(("127.0.0.1", _unused_port()), authkey=authkey, timeout=5)


def test_failed_authentication_leaves_the_listener_usable():
    with loopfast.Listener(authkey=KEY) as listener:
        client, server = _both_sides(
            listener, lambda: loopfast.Client(listener.address, authkey=b"wrong", timeout=30))
        assert isinstance(server, AuthenticationError)
        client, server = _connected_pair(
            listener, lambda: loopfast.Client(listener.address, authkey=KEY, timeout=30))
        with client, server:
            client.send("ok")
            assert server.recv(timeout=10) == "ok"


# ---- nothing is delivered before authentication (raw clients) ---------------------------------


def _raw_attack(listener, build):
    """Connect a raw socket, start accept() in a thread, read the listener's hello and send
    `build(listener_hello)` at once. Returns accept()'s outcome (channel or exception)."""
    with socket.create_connection(listener.address, timeout=10) as raw, \
            ThreadPoolExecutor(1) as pool:
        accepting = pool.submit(listener.accept)
        listener_hello = recv_exactly(raw, HELLO.size)
        assert listener_hello[:8] == b"LOOPFAST"
        raw.sendall(build(listener_hello))
        try:
            return accepting.result(timeout=30)
        except Exception as exc:
            return exc


def test_frames_after_a_wrong_proof_are_never_delivered(nothing_delivered):
    def build(listener_hello):
        own = hello()
        return (own + proof(b"wrong", CONNECTOR_LABEL, own, listener_hello)
                + frame(b"evil bytes") + frame(pickle.dumps(_Evil()), kind=2))

    with loopfast.Listener(authkey=KEY, handshake_timeout=30) as listener:
        outcome = _raw_attack(listener, build)
        assert isinstance(outcome, AuthenticationError)
        # The next, honest client's first message is its own.
        client, server = _connected_pair(
            listener, lambda: loopfast.Client(listener.address, authkey=KEY, timeout=30))
        with client, server:
            client.send("honest")
            assert server.recv(timeout=10) == "honest"


def test_frames_from_a_client_without_authkey_are_never_delivered(nothing_delivered):
    def build(listener_hello):
        return hello(flags=0) + frame(b"evil bytes") + frame(pickle.dumps(_Evil()), kind=2)

    with loopfast.Listener(authkey=KEY, handshake_timeout=30) as listener:
        assert isinstance(_raw_attack(listener, build), AuthenticationError)


def test_frames_in_place_of_a_proof_are_not_delivered(nothing_delivered):
    """A frame sent where the proof belongs is read as a (wrong) proof, never parsed."""
    def build(listener_hello):
        return hello() + frame(pickle.dumps(_Evil()), kind=2) * 4

    with loopfast.Listener(authkey=KEY, handshake_timeout=30) as listener:
        assert isinstance(_raw_attack(listener, build), AuthenticationError)


def test_raw_client_with_the_right_key_is_accepted():
    """Checks the raw helpers above against the listener, so the attacks test what they claim."""
    own = hello()

    def build(listener_hello):
        return own + proof(KEY, CONNECTOR_LABEL, own, listener_hello) + frame(b"first")

    with loopfast.Listener(authkey=KEY, handshake_timeout=30) as listener:
        server = _raw_attack(listener, build)
        with server:
            assert server.recv_bytes(timeout=10) == b"first"


def _record_session(listener):
    """One successful raw session with the right key: returns (client hello, client proof,
    listener hello, listener proof)."""
    with socket.create_connection(listener.address, timeout=10) as raw, \
            ThreadPoolExecutor(1) as pool:
        accepting = pool.submit(listener.accept)
        own = hello()
        raw.sendall(own)
        listener_hello = recv_exactly(raw, HELLO.size)
        own_proof = proof(KEY, CONNECTOR_LABEL, own, listener_hello)
        raw.sendall(own_proof + frame(b"recorded"))
        listener_proof = recv_exactly(raw, 32)
        assert listener_proof == proof(KEY, LISTENER_LABEL, listener_hello, own)
        with accepting.result(timeout=30) as server:
            assert server.recv_bytes(timeout=10) == b"recorded"
    return own, own_proof, listener_hello, listener_proof


def test_replayed_client_proof_is_rejected(nothing_delivered):
    with loopfast.Listener(authkey=KEY, handshake_timeout=30) as listener:
        old_hello, old_proof, old_listener_hello, _ = _record_session(listener)

        def build(listener_hello):
            assert listener_hello != old_listener_hello  # a fresh nonce
            return old_hello + old_proof + frame(pickle.dumps(_Evil()), kind=2)

        assert isinstance(_raw_attack(listener, build), AuthenticationError)


def test_replayed_listener_proof_is_rejected_by_the_client():
    with loopfast.Listener(authkey=KEY, handshake_timeout=30) as listener:
        _, _, old_listener_hello, old_listener_proof = _record_session(listener)

    with socket.socket() as fake:
        fake.bind(("127.0.0.1", 0))
        fake.listen(1)
        fake.settimeout(30)

        def replay():
            conn, _ = fake.accept()
            with conn:
                conn.sendall(old_listener_hello)
                recv_exactly(conn, HELLO.size)
                conn.sendall(old_listener_proof)
                recv_exactly(conn, 32)  # the client's proof, then EOF once it gives up
                conn.recv(1)

        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(replay)
            with pytest.raises(AuthenticationError):
                loopfast.Client(fake.getsockname(), authkey=KEY, timeout=30)
            done.result(timeout=30)


def test_reflected_listener_proof_is_rejected(nothing_delivered):
    """Echo the listener's own hello and proof back: the role labels make it worthless."""
    with loopfast.Listener(authkey=KEY, handshake_timeout=30) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw, \
            ThreadPoolExecutor(1) as pool:
        accepting = pool.submit(listener.accept)
        listener_hello = recv_exactly(raw, HELLO.size)
        raw.sendall(listener_hello)
        listener_proof = recv_exactly(raw, 32)
        raw.sendall(listener_proof + frame(pickle.dumps(_Evil()), kind=2))
        with pytest.raises(AuthenticationError):
            accepting.result(timeout=30)


def test_truncated_proof_then_close_is_an_authentication_error():
    with loopfast.Listener(authkey=KEY, handshake_timeout=30) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw, \
            ThreadPoolExecutor(1) as pool:
        accepting = pool.submit(listener.accept)
        own = hello()
        raw.sendall(own)
        listener_hello = recv_exactly(raw, HELLO.size)
        raw.sendall(proof(KEY, CONNECTOR_LABEL, own, listener_hello)[:10])
        recv_exactly(raw, 32)  # the listener's proof
        raw.shutdown(socket.SHUT_WR)
        with pytest.raises(AuthenticationError):
            accepting.result(timeout=30)


def test_truncated_proof_then_reset_is_an_authentication_error():
    with loopfast.Listener(authkey=KEY, handshake_timeout=30) as listener, \
            ThreadPoolExecutor(1) as pool:
        raw = socket.create_connection(listener.address, timeout=10)
        accepting = pool.submit(listener.accept)
        own = hello()
        raw.sendall(own)
        listener_hello = recv_exactly(raw, HELLO.size)
        raw.sendall(proof(KEY, CONNECTOR_LABEL, own, listener_hello)[:10])
        recv_exactly(raw, 32)
        reset(raw)
        with pytest.raises(AuthenticationError):
            accepting.result(timeout=30)


@pytest.mark.timeout(20)
def test_client_that_never_sends_its_proof_times_out():
    with loopfast.Listener(authkey=KEY, handshake_timeout=0.5) as listener, \
            socket.create_connection(listener.address, timeout=10) as raw:
        raw.sendall(hello())
        with pytest.raises(TimeoutError):
            listener.accept()


# ---- across processes: a Listener in a spawn child ----------------------------------------------


def _serve_once(authkey, report):
    """Child: listen with `authkey`, report the address, accept one client, echo one message,
    and report the outcome."""
    with loopfast.Listener(authkey=authkey, handshake_timeout=30) as listener:
        report.send(listener.address)
        try:
            with listener.accept() as channel:
                message = channel.recv(timeout=30)
                channel.send(("echo", message))
                report.send(("ok", message))
        except Exception as exc:
            report.send(("error", type(exc).__name__))
    report.close()


def _with_child_listener(listener_key, client_key):
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_serve_once, args=(listener_key, writer))
    child.start()
    writer.close()
    try:
        assert reader.poll(60), "the child did not report its address"
        address = reader.recv()
        try:
            with loopfast.Client(address, authkey=client_key, timeout=30) as channel:
                channel.send("hello")
                client = channel.recv(timeout=30)
        except Exception as exc:
            client = exc
        assert reader.poll(60), "the child did not report the outcome"
        server = reader.recv()
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)
    assert child.exitcode == 0
    return client, server


def test_matching_authkey_across_processes():
    client, server = _with_child_listener(KEY, KEY)
    assert client == ("echo", "hello")
    assert server == ("ok", "hello")


def test_wrong_authkey_across_processes_fails_on_both_sides():
    client, server = _with_child_listener(KEY, b"wrong")
    assert isinstance(client, AuthenticationError)
    assert server == ("error", "AuthenticationError")


def test_authkey_on_client_only_across_processes_fails_on_both_sides():
    client, server = _with_child_listener(None, KEY)
    assert isinstance(client, AuthenticationError)
    assert server == ("error", "AuthenticationError")


# ---- Pipe(): the two ends belong to each other --------------------------------------------------


def _names(channel):
    with socket.socket(fileno=os.dup(channel.fileno())) as sock:
        return sock.getsockname()[:2], sock.getpeername()[:2]


def _ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("family,host", [("AF_INET", "127.0.0.1"), ("AF_INET6", "::1")])
@pytest.mark.parametrize("duplex", [True, False])
def test_pipe_ends_are_connected_to_each_other(family, host, duplex):
    if family == "AF_INET6" and not _ipv6_loopback_available():
        pytest.skip("::1 is not available")
    a, b = loopfast.Pipe(duplex, family=family)
    with a, b:
        (a_name, a_peer), (b_name, b_peer) = _names(a), _names(b)
        assert a_peer == b_name
        assert b_peer == a_name
        assert a_name[0] == host


def _listening_ports(pid):
    """Ports of the sockets of process `pid` listening on 127.0.0.1 (Linux /proc)."""
    with open("/proc/net/tcp") as f:
        lines = f.readlines()[1:]
    candidates = {}
    for line in lines:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and local.startswith("0100007F:"):
            candidates[inode] = int(local.split(":")[1], 16)
    if not candidates:
        return []
    ports = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in candidates:
            ports.append(candidates[link[8:-1]])
    return ports


def _race_pipes(pid, ignore, ready, stop, counts):
    """Another process: connect, as fast as it can, to every port that process `pid` starts
    listening on, and pretend to be a loopfast peer (hello and a made-up proof). Stops on
    `stop`, after 10 s or after 100000 scans. counts = [connect attempts, connections made]."""
    held = []
    deadline = time.monotonic() + 10
    ready.set()
    try:
        for _ in range(100000):
            if stop.is_set() or time.monotonic() > deadline:
                break
            for port in _listening_ports(pid):
                if port in ignore:
                    continue
                sock = socket.socket()
                sock.settimeout(1)
                counts[0] += 1
                try:
                    sock.connect(("127.0.0.1", port))
                    sock.sendall(hello() + os.urandom(32))
                    counts[1] += 1
                except OSError:
                    pass
                held.append(sock)
                if len(held) > 64:
                    held.pop(0).close()
    finally:
        for sock in held:
            sock.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")
def test_pipe_never_pairs_with_a_racing_connector():
    """Bounded attempt at the race the issue describes: while this process creates Pipes, a
    second process watches for its listening ports and connects to each at once. Whether the
    racer ever lands in a Pipe's backlog is up to the scheduler (rarely: a /proc scan takes
    milliseconds, a Pipe listens for tens of microseconds); every Pipe must still pair its own
    two ends, and Pipe() must not fail. 300 Pipes at most: each leaves TIME_WAIT entries that
    occupy ephemeral ports."""
    ctx = multiprocessing.get_context("fork")
    ignore = set(_listening_ports(os.getpid()))
    ready, stop = ctx.Event(), ctx.Event()
    counts = ctx.Array("l", 2)
    racer = ctx.Process(target=_race_pipes, args=(os.getpid(), ignore, ready, stop, counts))
    racer.start()
    pairs = 0
    try:
        assert ready.wait(30)
        deadline = time.monotonic() + 3
        while pairs < 300 and time.monotonic() < deadline and racer.is_alive():
            a, b = loopfast.Pipe()
            with a, b:
                (a_name, a_peer), (b_name, b_peer) = _names(a), _names(b)
                assert (a_peer, b_peer) == (b_name, a_name)
                a.send_bytes(b"%d" % pairs)
                assert b.recv_bytes(timeout=10) == b"%d" % pairs
                b.send_bytes(b"back")
                assert a.recv_bytes(timeout=10) == b"back"
            pairs += 1
    finally:
        stop.set()
        racer.join(timeout=15)
        if racer.is_alive():
            racer.kill()
            racer.join(10)
    assert racer.exitcode == 0
    assert pairs > 0
    print(f"{pairs} pipes; racer attempts, connections: {counts[:]}")
