"""The cases of ``python -m loopfast bench`` as pytest-benchmark tests, every peer of a case in
one group, so that ``pytest benchmarks/ --benchmark-only`` shows loopfast beside
multiprocessing.Pipe (and the other peers) in one table per case.

Each test times its peer alone (pytest-benchmark runs tests one after another), so on a noisy
machine compare peers with ``python -m loopfast bench`` (interleaved rounds, medians) or
benchmarks/check_targets.py, not from these tables.
"""

import itertools

import pytest

from loopfast import _bench

CASES = [case for case in _bench.CASES.values() if case.default]

# Round trips: pedantic rounds of ITERATIONS round trips each (the table shows one round trip).
RT_ROUNDS, RT_ITERATIONS, RT_WARMUP_ROUNDS = 40, 100, 2
# Streams: how many messages one timed call receives, and how many calls.
STREAM_BATCH = {64: 10_000, _bench.MiB: 100, 16 * _bench.MiB: 8}
STREAM_ROUNDS = 10


def _params(kind):
    return [pytest.param(case, peer, id=f"{case.name}-{peer}")
            for case in CASES if case.kind == kind for peer in case.peers]


@pytest.mark.parametrize("case, peer", _params("roundtrip"))
def test_round_trip(benchmark, peer_process, case, peer):
    benchmark.group = f"{case.title} (time per round trip)"
    pp = peer_process(peer, case.size)
    send, recv = pp.endpoint.send, _bench.receiver(pp.endpoint, case)
    payload = _bench.make_payload(case.size)
    # The peer process echoes a fixed count. pytest-benchmark calls the function a few times
    # more than rounds x iterations (once for the result, a round more with --benchmark-cprofile,
    # once only with --benchmark-disable): ask for enough, count the calls, echo the rest after.
    echoes = (RT_ROUNDS + RT_WARMUP_ROUNDS + 2) * RT_ITERATIONS + 1
    pp.request("echo" if case.receive == "recv" else "echo_into", echoes)
    calls = itertools.count(1)
    done = 0

    def round_trip():
        nonlocal done
        send(payload)
        reply = recv()
        done = next(calls)
        return reply

    reply = benchmark.pedantic(round_trip, rounds=RT_ROUNDS, iterations=RT_ITERATIONS,
                               warmup_rounds=RT_WARMUP_ROUNDS)
    assert _bench.received_size(reply) == case.size
    assert done <= echoes, "more round trips than the peer process echoes"
    for _ in range(echoes - done):
        round_trip()


@pytest.mark.parametrize("case, peer", _params("stream"))
def test_stream(benchmark, peer_process, case, peer):
    batch = STREAM_BATCH[case.size]
    benchmark.group = f"{case.title} (time per {batch:,} messages)"
    benchmark.extra_info.update(messages_per_call=batch, message_size=case.size)
    pp = peer_process(peer, case.size)
    recv = _bench.receiver(pp.endpoint, case)

    def receive_batch():
        pp.request("send", batch)
        last = None
        for _ in range(batch):
            last = recv()
        return last

    last = benchmark.pedantic(receive_batch, rounds=STREAM_ROUNDS, warmup_rounds=1)
    assert _bench.received_size(last) == case.size
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(msg_per_s=batch / seconds,
                                    gb_per_s=batch * case.size / seconds / 1e9)
