"""pytest-benchmark: the 64 B asyncio round trip of loopfast.aio beside the sync channel
(``spin=0``) and asyncio streams with a 4-byte length prefix, under the default event loop and
uvloop (skipped when not installed). The echo peer is another process (loopfast/_bench_aio.py).

Each test times its row alone, one after another; on a noisy machine judge the ratios from
``python -m loopfast.tools.bench.aio`` (interleaved rounds, medians), not from these tables.
"""

import pytest

from loopfast.tools.bench import aio as _bench_aio

ROUNDS, ROUND_TRIPS, WARMUP_ROUNDS = 20, 1000, 2
PAYLOAD = bytes(range(64))


@pytest.fixture(scope="module")
def echo_peer():
    peer = _bench_aio.EchoPeer()
    yield peer
    peer.close()


@pytest.mark.parametrize("row", _bench_aio.ROWS)
def test_round_trip_64b(benchmark, echo_peer, row):
    if row.endswith("uvloop"):
        reason = _bench_aio.uvloop_unavailable()
        if reason:
            pytest.skip(reason)
    benchmark.group = f"64 B asyncio round trip (time per {ROUND_TRIPS} round trips)"
    benchmark.extra_info["label"] = _bench_aio.LABELS[row]
    times = benchmark.pedantic(_bench_aio.round_trips, args=(row, echo_peer, PAYLOAD, ROUND_TRIPS),
                               rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    assert len(times) == ROUND_TRIPS
