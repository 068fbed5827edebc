"""multiprocessing's pools and queues, stock and on loopfast, side by side in one run.

Each row runs the same workload on two multiprocessing contexts of one start method (fork where
the platform has it, spawn elsewhere): ``stock`` (``multiprocessing.get_context(method)``) and
``loopfast`` (``loopfast.get_context(method)``, whose Pipe, queues and pools are on loopfast
channels). Rows, each measured every round, the two contexts in alternating order:

- ``ppe_submit``: ``ProcessPoolExecutor(1).submit(f).result()`` of a task that returns at once,
  each call timed alone; the median call (µs; lower is better);
- ``ppe_map``: ``list(ProcessPoolExecutor(2).map(f, range(n)))``, tiny tasks (tasks/s);
- ``pool_map``: ``Pool(2).map(f, range(n), chunksize=1)`` (tasks/s);
- ``queue64``: ``Queue.put`` of n 64-byte bytes objects, ``get`` by another process (msg/s,
  from the first put until that process has got them all);
- ``queue_numpy``: ``Queue.put`` of a 64 MiB float64 array k times, ``get`` by another process
  (GB/s), and the memory each side needed for it (Linux): the rise of the peak RSS (VmHWM, reset
  through /proc/self/clear_refs) of the receiving process while it gets the arrays, and of this
  process while it puts them and they go out, in multiples of one array's size;
  the worst of the rounds.

Pools and executors are made (and their workers started) before the clock starts; processes are
left to the scheduler (the pools use both CPUs). A row's figure is the median over the rounds,
its ratio that median ÷ the stock median of the same run. Run it alone:
``python -m loopfast.tools.bench.pools [--rounds N] [--quick] [--json]``; ``run()`` is what
the bench
command calls.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

from .memory import memory_unsupported_reason, peak_rss, reset_peak

__all__ = ["CONTEXTS", "ROWS", "format_report", "main", "run"]

MiB = 1024 * 1024
ARRAY_SIZE = 64 * MiB

CONTEXTS = ("stock", "loopfast")
# name: (title, unit, higher is better)
ROWS: Dict[str, Tuple[str, str, bool]] = {
    "ppe_submit": ("ProcessPoolExecutor(1).submit(f).result()", "µs", False),
    "ppe_map": ("ProcessPoolExecutor(2).map, tiny tasks", "tasks/s", True),
    "pool_map": ("Pool(2).map, chunksize=1", "tasks/s", True),
    "queue64": ("Queue, 64 B put → get in another process", "msg/s", True),
    "queue_numpy": ("Queue, 64 MiB float64 arrays", "GB/s", True),
}
# Per measurement: (full run, quick run).
COUNTS = {"ppe_submit": (1000, 200), "ppe_map": (20000, 4000), "pool_map": (50000, 10000),
          "queue64": (100000, 20000), "queue_numpy": (6, 2)}
TIMEOUT = 300.0


def _task(x: Any = None) -> Any:
    return x


def _default_method() -> str:
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _context(name: str, method: str) -> Any:
    if name == "loopfast":
        from loopfast.context import get_context
        return get_context(method)
    return multiprocessing.get_context(method)


# ---- the rows ----------------------------------------------------------------------------

def _ppe_submit(ctx: Any, n: int) -> Dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=ctx) as ex:
        for _ in range(min(50, n)):
            ex.submit(_task).result(TIMEOUT)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            ex.submit(_task).result(TIMEOUT)
            times.append(time.perf_counter() - t0)
    return {"value": statistics.median(times) * 1e6}


def _ppe_map(ctx: Any, n: int) -> Dict[str, Any]:
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        list(ex.map(_task, range(200)))  # both workers started and warm
        t0 = time.perf_counter()
        result = list(ex.map(_task, range(n), timeout=TIMEOUT))
        elapsed = time.perf_counter() - t0
    assert len(result) == n
    return {"value": n / elapsed}


def _pool_map(ctx: Any, n: int) -> Dict[str, Any]:
    with ctx.Pool(2) as pool:
        pool.map(_task, range(200), chunksize=1)
        t0 = time.perf_counter()
        result = pool.map_async(_task, range(n), chunksize=1).get(TIMEOUT)
        elapsed = time.perf_counter() - t0
    assert len(result) == n
    return {"value": n / elapsed}


def _consume(queue: Any, done: Any, n: int, measure: bool) -> None:
    queue.get(timeout=TIMEOUT)  # the warm-up item: both ends are up
    done.put("ready")
    base = 0
    if measure:
        reset_peak()
        base = peak_rss()
    total = 0
    for _ in range(n):
        item = queue.get(timeout=TIMEOUT)
        total += getattr(item, "nbytes", len(item))
        del item
    done.put((total, peak_rss() - base if measure else None))


def _queue_run(ctx: Any, item: Any, n: int, measure: bool) -> Tuple[float, int, Any, Any]:
    queue, done = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_consume, args=(queue, done, n, measure), daemon=True)
    child.start()
    try:
        queue.put(item[:0])  # warm-up: the child and the feeder thread are running
        done.get(timeout=TIMEOUT)
        base = 0
        if measure:
            reset_peak()
            base = peak_rss()
        t0 = time.perf_counter()
        for _ in range(n):
            queue.put(item)
        total, received_rise = done.get(timeout=TIMEOUT)
        elapsed = time.perf_counter() - t0
        sent_rise = peak_rss() - base if measure else None
    finally:
        child.join(TIMEOUT)
        if child.is_alive():
            child.kill()
        queue.close()
        done.close()
    return elapsed, total, received_rise, sent_rise


def _queue64(ctx: Any, n: int) -> Dict[str, Any]:
    elapsed, _, _, _ = _queue_run(ctx, b"q" * 64, n, False)
    return {"value": n / elapsed}


def _queue_numpy(ctx: Any, n: int) -> Dict[str, Any]:
    import numpy
    array = numpy.ones(ARRAY_SIZE // 8, dtype=numpy.float64)
    measure = memory_unsupported_reason() is None
    elapsed, total, received_rise, sent_rise = _queue_run(ctx, array, n, measure)
    result: Dict[str, Any] = {"value": total / elapsed / 1e9}
    if measure:
        result["receiver_peak"] = received_rise / ARRAY_SIZE
        result["sender_peak"] = sent_rise / ARRAY_SIZE
    return result


_MEASURE: Dict[str, Callable[[Any, int], Dict[str, Any]]] = {
    "ppe_submit": _ppe_submit, "ppe_map": _ppe_map, "pool_map": _pool_map,
    "queue64": _queue64, "queue_numpy": _queue_numpy}


# ---- the run -------------------------------------------------------------------------------

def run(rounds: int = 5, quick: bool = False, method: Optional[str] = None,
        progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    method = method or _default_method()
    rows = list(ROWS)
    skipped: Dict[str, str] = {}
    try:
        import numpy  # noqa: F401
    except ImportError:
        rows.remove("queue_numpy")
        skipped["queue_numpy"] = "numpy is not installed (pip install numpy)"
    samples: Dict[str, Dict[str, List[Dict[str, Any]]]] = {
        row: {name: [] for name in CONTEXTS} for row in rows}
    for r in range(rounds):
        for row in rows:
            order = CONTEXTS if (r + rows.index(row)) % 2 == 0 else CONTEXTS[::-1]
            for name in order:
                n = COUNTS[row][1 if quick else 0]
                if progress:
                    progress(f"pools round {r + 1}/{rounds}: {row} {name}")
                samples[row][name].append(_MEASURE[row](_context(name, method), n))
    results: Dict[str, Any] = {}
    for row in rows:
        medians = {name: statistics.median(s["value"] for s in samples[row][name])
                   for name in CONTEXTS}
        entry: Dict[str, Any] = {
            "medians": medians,
            "samples": {name: [s["value"] for s in samples[row][name]] for name in CONTEXTS},
            "ratio": medians["loopfast"] / medians["stock"],
        }
        if row == "queue_numpy" and "receiver_peak" in samples[row]["stock"][0]:
            entry["memory"] = {name: {side: max(s[side] for s in samples[row][name])
                                      for side in ("receiver_peak", "sender_peak")}
                               for name in CONTEXTS}
        results[row] = entry
    return {"method": method, "rounds": rounds, "quick": quick,
            "counts": {row: COUNTS[row][1 if quick else 0] for row in rows},
            "rows": results, "skipped": skipped}


def _figure(value: float, unit: str) -> str:
    if unit == "GB/s":
        return f"{value:.2f} {unit}"
    if unit == "µs":
        return f"{value:.1f} {unit}"
    return f"{value:,.0f} {unit}"


def format_report(report: Dict[str, Any]) -> str:
    lines = [f"multiprocessing's pools and queues, start method {report['method']}: stock "
             f"context vs loopfast.get_context(),",
             f"{report['rounds']} rounds, medians, placement left to the scheduler"]
    lines.append(f"  {'case':<44} {'stock':>16} {'loopfast':>16}  {'loopfast ÷ stock':>16}")
    for row, entry in report["rows"].items():
        title, unit, _ = ROWS[row]
        med = entry["medians"]
        lines.append(f"  {title:<44} {_figure(med['stock'], unit):>16} "
                     f"{_figure(med['loopfast'], unit):>16}  {entry['ratio']:>15.2f}×")
        memory = entry.get("memory")
        if memory:
            for side in ("receiver_peak", "sender_peak"):
                label = ("    receiver's extra memory, × one array" if side == "receiver_peak"
                         else "    sender's extra memory, × one array")
                lines.append(f"  {label:<44} {memory['stock'][side]:>15.3f}× "
                             f"{memory['loopfast'][side]:>15.3f}×")
    for row, why in report["skipped"].items():
        lines.append(f"  {ROWS[row][0]:<44} skipped: {why}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loopfast.tools.bench.pools",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer tasks and messages")
    parser.add_argument("--method", choices=("fork", "spawn", "forkserver"))
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run(args.rounds, args.quick, args.method,
                 progress=lambda message: print(message, file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
