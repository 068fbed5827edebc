"""Fixtures for the pytest-benchmark files: a peer process serving the far end of a connection.

The peer processes are those of ``python -m loopfast bench`` (loopfast/tools/bench/children.py):
started once per test (fork on Linux), running fixed-count loops on command, under a watchdog.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from loopfast.tools.bench import runner as _bench

StartPeer = Callable[[_bench.Case, str], _bench.PeerProcess]


@pytest.fixture
def peer_process() -> Iterator[StartPeer]:
    """``peer_process(case, peer_name)``: a started `_bench.PeerProcess` serving `case`'s
    payload, closed after the test. Skips the test if the case or the peer cannot run here (numpy
    or pyzmq missing)."""
    started = []

    def start(case: _bench.Case, peer: str) -> _bench.PeerProcess:
        reason = case.unavailable() or _bench.PEERS[peer].unavailable()
        if reason:
            pytest.skip(reason)
        pp = _bench.PeerProcess(peer, case.size, payload=case.payload)
        pp.__enter__()
        started.append(pp)
        return pp

    yield start
    for pp in started:
        pp.close()
