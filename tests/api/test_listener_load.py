"""A Listener under a flood of silent connections: it runs out of descriptors (RLIMIT_NOFILE in
the server process), expired handshakes are dropped whatever accept(2) says, good clients get in,
and it recovers once the flood has gone. The server is a process of its own
(loopfast.tools.bench.accept's server); everything talks to 127.0.0.1 only. No outcome depends
on timing:
the figures (a good client's wait, the server's CPU) are the bench's (benchmarks/)."""

import json
import re
import socket
import subprocess
import sys

import pytest

import loopfast

pytestmark = pytest.mark.timeout(180)


class Server:
    def __init__(self, nofile, handshake_timeout, mode="sync"):
        args = [sys.executable, "-m", "loopfast.tools.bench.accept", "--serve", str(nofile),
                str(handshake_timeout)] + (["--aio"] if mode == "aio" else [])
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.address = ("127.0.0.1", int(self.process.stdout.readline()))

    def echo(self, payload=b"ping", timeout=60):
        with loopfast.Client(self.address, timeout=timeout) as client:
            client.send_bytes(payload)
            return client.recv_bytes(timeout=timeout)

    def stop(self):
        report = json.loads(self.echo(b"stop"))
        self.process.wait(timeout=30)
        return report

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process.stdout.close()


def _silent(address, count):
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(address, timeout=30)
        sockets.append(sock)
    return sockets


def _drained(sock):
    """All the server sent on a silent connection, up to its end (or a reset)."""
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data, "closed"
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    except socket.timeout:
        return data, "open"


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_out_of_descriptors_good_clients_get_in_and_it_recovers(mode):
    server = Server(nofile=128, handshake_timeout=1.0, mode=mode)
    flood = []
    try:
        flood = _silent(server.address, 300)  # far more than the server has descriptors for
        # Good clients wait in the backlog behind the flood: each gets in once expired
        # handshakes have freed descriptors (1 s each), never refused, never stuck.
        for i in range(5):
            assert server.echo(b"good %d" % i) == b"good %d" % i
        # Expired handshakes were dropped even while accept() said EMFILE: the first silent
        # connections got the listener's hello and then the end of the connection.
        for sock in flood[:50]:
            sock.settimeout(30)
            data, end = _drained(sock)
            assert end in ("closed", "reset") and data[:8] in (b"LOOPFAST", b""), (data, end)
        # The flood leaves; what it left in the accept queue is closed connections: the server
        # gets through them and serves at once.
        for sock in flood:
            sock.close()
        flood = []
        for i in range(5):
            assert server.echo(b"after %d" % i) == b"after %d" % i
        report = server.stop()
        assert report["served"] == 10
        assert set(report["errors"]) <= {"TimeoutError", "ProtocolError"}, report
    finally:
        for sock in flood:
            sock.close()
        server.kill()


def _expired_count(error):
    """How many handshakes one TimeoutError of accept() reports."""
    match = re.match(r"(\d+) peers did not|the peer did not", str(error))
    assert match, error
    return int(match.group(1) or 1)


def test_expired_handshakes_are_dropped_and_reported_in_batches():
    with loopfast.Listener(backlog=64, handshake_timeout=0.5) as listener:
        flood = _silent(listener.address, 20)
        try:
            reported = 0
            for _ in range(20):  # one TimeoutError per batch of deadlines, until all 20 are
                with pytest.raises(TimeoutError, match="complete the loopfast handshake") as info:
                    listener.accept()
                reported += _expired_count(info.value)
                if reported >= 20:
                    break
            assert reported == 20
            for sock in flood:  # each was disconnected: the listener's hello, then the end
                sock.settimeout(30)
                data, end = _drained(sock)
                assert end in ("closed", "reset") and len(data) in (0, 48)
            with loopfast.Client(listener.address, timeout=30) as client:
                with listener.accept() as server:
                    client.send_bytes(b"next")
                    assert server.recv_bytes(timeout=30) == b"next"
        finally:
            for sock in flood:
                sock.close()


def test_many_pending_handshakes_and_good_clients_between_them():
    server = Server(nofile=0, handshake_timeout=60)
    flood = []
    try:
        for _ in range(4):
            flood += _silent(server.address, 250)
            assert server.echo(b"between") == b"between"
        assert server.stop()["served"] == 4
        for sock in flood[:10]:  # still waited on, not dropped: their deadline is far
            sock.settimeout(30)
            assert sock.recv(48)[:8] == b"LOOPFAST"
    finally:
        for sock in flood:
            sock.close()
        server.kill()
