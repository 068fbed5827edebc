"""pytest-benchmark: multiprocessing's pools and queues on a stock context beside
``loopfast.get_context()`` (the rows of loopfast/_bench_pools.py: ProcessPoolExecutor submit and
map, Pool.map with chunksize=1, Queue of 64 B messages, Queue of 64 MiB numpy arrays).

Each benchmark round is one measurement of the row (pools started before the clock starts, as
in the bench); the figure the row reports (µs, tasks/s, msg/s, GB/s) is kept in extra_info. On a
noisy machine judge the ratios from ``python -m loopfast bench`` or
``python -m loopfast.tools.bench.pools`` (interleaved rounds, medians), not from these tables.
"""

import pytest

from loopfast.tools.bench import pools as _bench_pools

ROUNDS = 3
COUNTS = {"ppe_submit": 300, "ppe_map": 5000, "pool_map": 10000, "queue64": 20000,
          "queue_numpy": 2}
METHOD = _bench_pools._default_method()


@pytest.mark.parametrize("context", _bench_pools.CONTEXTS)
@pytest.mark.parametrize("row", list(_bench_pools.ROWS))
def test_pools_and_queues(benchmark, row, context):
    if row == "queue_numpy":
        pytest.importorskip("numpy")
    title, unit, _ = _bench_pools.ROWS[row]
    benchmark.group = f"{title} ({COUNTS[row]} per round, {METHOD})"
    figures = []

    def measure():
        result = _bench_pools._MEASURE[row](_bench_pools._context(context, METHOD), COUNTS[row])
        figures.append(result["value"])
        return result

    result = benchmark.pedantic(measure, rounds=ROUNDS, warmup_rounds=0)
    benchmark.extra_info["context"] = context
    benchmark.extra_info[unit] = figures
    assert result["value"] > 0
