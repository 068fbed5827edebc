"""Fixtures for the pytest-benchmark files: a peer process serving the far end of a connection.

The peer processes are those of ``python -m loopfast bench`` (loopfast/_bench.py): started once
per test (fork on Linux), running fixed-count loops on command, under a watchdog.
"""

import pytest

from loopfast import _bench


@pytest.fixture
def peer_process():
    """``peer_process(peer_name, size)``: a started `_bench.PeerProcess`, closed after the test."""
    started = []

    def start(peer, size):
        pp = _bench.PeerProcess(peer, size)
        pp.__enter__()
        started.append(pp)
        return pp

    yield start
    for pp in started:
        pp.close()
