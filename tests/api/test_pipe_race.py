"""Pipe() pairs its own two ends, even when another local process connects to its port first."""

import socket
import time

import pytest

import loopfast
from loopfast.connection import _connect_own_pair


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_a_connection_that_wins_the_race_is_closed_not_paired(family, host):
    try:
        listening = socket.socket(family, socket.SOCK_STREAM)
        listening.bind((host, 0))
    except OSError as exc:
        pytest.skip(f"{host} unavailable: {exc}")
    with listening:
        listening.listen(8)
        # The racer connects before Pipe's own end: it is first in the accept queue.
        racers = [socket.create_connection(listening.getsockname()[:2], timeout=10)
                  for _ in range(3)]
        accepted, connecting = _connect_own_pair(listening, time.monotonic() + 10)
        with accepted, connecting:
            assert accepted.getpeername()[:2] == connecting.getsockname()[:2]
            connecting.setblocking(True)
            connecting.sendall(b"mine")
            assert accepted.recv(4) == b"mine"
        for racer in racers:
            with racer:
                racer.settimeout(10)
                try:
                    assert racer.recv(1) == b""  # its connection was closed: EOF...
                except ConnectionResetError:
                    pass  # ...or reset


def test_pipe_ends_are_connected_to_each_other():
    a, b = loopfast.Pipe()
    with a, b:
        sa = socket.socket(fileno=a.fileno())
        sb = socket.socket(fileno=b.fileno())
        try:
            assert sa.getpeername() == sb.getsockname()
            assert sb.getpeername() == sa.getsockname()
        finally:
            sa.detach()
            sb.detach()
