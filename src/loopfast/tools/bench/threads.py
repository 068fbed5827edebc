"""Parallel threads: one thread's message rate beside eight threads' on eight channel pairs.

Each thread owns one ``loopfast.Pipe()`` pair and moves 64 B messages through it, alone:
``a.send_bytes(m)`` then ``b.recv_bytes()``, ``count`` times. The rows, in one process,
interleaved round by round (the order swapped each round):

- ``1 thread``: one such thread;
- ``8 threads``: eight at once, each on its own pair, started together behind a barrier; the
  figure is their messages over the time from the barrier to the last one's end.

A row's figure is the median rate over the rounds; ``8 threads / 1 thread`` is their ratio. With
the GIL, the eight take turns and the ratio stays near 1. Free-threaded with the GIL off
(``PYTHON_GIL=0``, or a module that declares it needs none, as loopfast's core does), they run
on every core: the target is at least 1.6 on two cores (issue 15). The ratio is judged only
there. Run it alone: ``python -m loopfast.tools.bench.threads [--rounds N] [--count N]
[--json]``; ``run()`` is what the bench command calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypedDict

from loopfast.connection import Pipe

__all__ = ["ThreadsReport", "format_report", "gil_enabled", "main", "run"]

PAYLOAD = b"m" * 64
THREADS = 8
ROWS = ("1 thread", f"{THREADS} threads")
RATIO = f"{THREADS} threads / 1 thread"
JOIN_LIMIT = 300.0  # s: a thread that takes longer is a bug, not a slow machine


class ThreadsReport(TypedDict):
    threads: int
    count: int                   # messages per thread per measurement
    rounds: int
    gil_enabled: bool            # whether the GIL was on while this ran
    free_threaded_build: bool    # an interpreter built with --disable-gil
    rows: Dict[str, List[float]]   # per row, each round's rate (messages/s)
    medians: Dict[str, float]      # per row, the median over the rounds (messages/s)
    ratios: Dict[str, float]


def gil_enabled() -> bool:
    """Whether the GIL is on (always, before 3.13 and in a default build)."""
    check = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def free_threaded_build() -> bool:
    import sysconfig
    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def _move(a: Any, b: Any, count: int) -> None:
    send, recv = a.send_bytes, b.recv_bytes
    for _ in range(count):
        send(PAYLOAD)
        recv()


def _rate(pairs: List[Tuple[Any, Any]], count: int) -> float:
    """Messages per second of len(pairs) threads, one per pair, started together."""
    barrier = threading.Barrier(len(pairs) + 1)
    errors: List[BaseException] = []

    def work(a: Any, b: Any) -> None:
        try:
            barrier.wait(JOIN_LIMIT)
            _move(a, b, count)
        except BaseException as exc:  # reported below, in the measuring thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=pair, daemon=True) for pair in pairs]
    for thread in threads:
        thread.start()
    barrier.wait(JOIN_LIMIT)
    started = time.perf_counter()
    for thread in threads:
        thread.join(JOIN_LIMIT)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"a bench thread did not finish within {JOIN_LIMIT:g} s")
    return len(pairs) * count / elapsed


def run(rounds: int = 5, count: int = 20_000,
        progress: Optional[Callable[[str], None]] = None) -> ThreadsReport:
    pairs = [Pipe() for _ in range(THREADS)]
    samples: Dict[str, List[float]] = {row: [] for row in ROWS}
    try:
        for a, b in pairs:  # warm up every pair (and the handshakes' deferred ends)
            _move(a, b, 100)
        for r in range(rounds):
            order = ROWS if r % 2 == 0 else ROWS[::-1]
            for row in order:
                if progress:
                    progress(f"round {r + 1}/{rounds}: {row}")
                samples[row].append(_rate(pairs[:1] if row == ROWS[0] else pairs, count))
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    medians = {row: statistics.median(values) for row, values in samples.items()}
    return {"threads": THREADS, "count": count, "rounds": rounds, "gil_enabled": gil_enabled(),
            "free_threaded_build": free_threaded_build(), "rows": samples, "medians": medians,
            "ratios": {RATIO: medians[ROWS[1]] / medians[ROWS[0]]}}


def format_report(report: ThreadsReport) -> str:
    gil = "on" if report["gil_enabled"] else "off"
    build = "free-threaded build" if report["free_threaded_build"] else "default build"
    lines = ["parallel threads: 64 B send_bytes + recv_bytes, each thread on its own Pipe()",
             f"(median of {report['rounds']} rounds × {report['count']:,} messages per thread)",
             f"({build}, GIL {gil})"]
    for row, median in report["medians"].items():
        spread = report["rows"][row]
        lines.append(f"  {row:<12} {median / 1e3:9.1f} k msg/s   "
                     f"(min {min(spread) / 1e3:.1f}, max {max(spread) / 1e3:.1f})")
    for name, value in report["ratios"].items():
        lines.append(f"  {name}: {value:.2f}× (target ≥ 1.6× with the GIL off)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loopfast.tools.bench.threads",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run(args.rounds, args.count, progress=lambda message: print(message, file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
