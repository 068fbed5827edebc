"""The cases of ``python -m loopfast bench`` as pytest-benchmark tests, every peer of a case in
one group, so that ``pytest benchmarks/ --benchmark-only`` shows loopfast beside
multiprocessing.Pipe (and the other peers) in one table per case.

Each test times its peer alone (pytest-benchmark runs tests one after another), so on a noisy
machine compare peers with ``python -m loopfast bench`` (interleaved rounds, medians) or
benchmarks/check_targets.py, not from these tables.

The object cases (issue 4): ``numpy_object`` moves one 256 MiB float64 array per message with
send/recv (loopfast and multiprocessing.Pipe) beside loopfast send_bytes/recv_bytes of the same
bytes (``loopfast_bytes``); skipped when numpy is missing. ``small_object_rt`` round-trips a dict
of 10 short fields with send/recv.

Issue 5: round trips at 64 B, 4 KiB and 1 MiB and streams at 64 B, 4 KiB, 1 MiB and 16 MiB, each
with loopfast.Pipe() (default busy-polling) and Pipe(spin=0), multiprocessing.connection over
TCP and pyzmq (skipped when not installed) beside the older peers; the 64 B stream also with
send_bytes_many/recv_bytes_many (1000 per call) and with batch() + send_bytes / recv_bytes.

Peak memory is not a pytest-benchmark figure: see benchmarks/check_targets.py.
"""

import itertools

import pytest

from loopfast.tools.bench import runner as _bench

CASES = [case for case in _bench.CASES.values() if case.default]

# Round trips: pedantic rounds of ITERATIONS round trips each (the table shows one round trip).
RT_ROUNDS, RT_ITERATIONS, RT_WARMUP_ROUNDS = 40, 100, 2
# Streams: how many messages one timed call receives, and how many calls, by case.
# multiprocessing.Pipe moves a 256 MiB array in about a second: few of those.
STREAM_BATCH = {"stream64": (10_000, 10), "stream4k": (5000, 10), "stream1m": (100, 10),
                "stream16m": (8, 10), "numpy_object": (1, 5)}


def _params(kind):
    return [pytest.param(case, peer, id=f"{case.name}-{peer}")
            for case in CASES if case.kind == kind for peer in case.peers]


@pytest.mark.parametrize("case, peer", _params("roundtrip"))
def test_round_trip(benchmark, peer_process, case, peer):
    benchmark.group = f"{case.title} (time per round trip)"
    pp = peer_process(case, peer)
    send = _bench.send_call(pp.endpoint, case, _bench.PAYLOADS[case.payload].make(case.size))
    recv = _bench.receiver(pp.endpoint, case)
    # The peer process echoes a fixed count. pytest-benchmark calls the function a few times
    # more than rounds x iterations (once for the result, a round more with --benchmark-cprofile,
    # once only with --benchmark-disable): ask for enough, count the calls, echo the rest after.
    echoes = (RT_ROUNDS + RT_WARMUP_ROUNDS + 2) * RT_ITERATIONS + 1
    pp.request(_bench.echo_op(case), echoes)
    calls = itertools.count(1)
    done = 0

    def round_trip():
        nonlocal done
        send()
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
    batch, rounds = STREAM_BATCH[case.name]
    benchmark.group = f"{case.title} (time per {batch:,} message{'s' if batch > 1 else ''})"
    benchmark.extra_info.update(messages_per_call=batch, message_size=case.size)
    pp = peer_process(case, peer)
    op = _bench.send_op(case)

    def receive_batch():
        pp.request(op, batch)
        # recv_bytes_many for the send_bytes_many peer, one receive per message otherwise
        return _bench.drain(pp.endpoint, case, batch)

    last = benchmark.pedantic(receive_batch, rounds=rounds, warmup_rounds=1)
    assert _bench.received_size(last) == case.size
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(msg_per_s=batch / seconds,
                                    gb_per_s=batch * case.size / seconds / 1e9)
