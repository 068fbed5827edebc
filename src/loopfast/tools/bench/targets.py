"""The speed and memory targets that loopfast's issues set, judged on one bench report: what
``python -m loopfast bench`` ends with (its verdict) and what benchmarks/check_targets.py prints
and exits with. Every target is a ratio to a peer measured in the same run (absolute figures
swing by ±50% on a shared machine), except two absolute message rates of the batched paths.

The issue-2 targets (loopfast without busy-polling against multiprocessing and the socket loop)
are judged on the ``loopfast.Pipe(spin=0)`` row; the issue-5 ones on the default
``loopfast.Pipe()`` and the batched rows; the issue-11 ones (every win kept once a receive takes
only what it returns) on the default ``loopfast.Pipe()`` row, with no spin= and no batching
unless the row says so.
"""

from __future__ import annotations

from typing import Optional

from .report import Report, format_value

__all__ = ["MISS", "PASS", "SKIP", "UNKNOWN", "judge"]

MiB = 1024 * 1024

# (what the issue asks, case, peer, reference peer, comparison, bound): the ratio is
# median(peer) / median(reference) from the same run.
RATIO_TARGETS = [
    # issue 2: bytes, judged without busy-polling (spin=0)
    ("64 B round trip, spin=0: median ≤ 1.1 × multiprocessing.Pipe",
     "rt64", "loopfast_spin0", "mp_pipe", "<=", 1.1),
    ("64 B stream, spin=0: ≥ 1.0 × multiprocessing.Pipe",
     "stream64", "loopfast_spin0", "mp_pipe", ">=", 1.0),
    ("64 B stream, spin=0: ≥ 1.0 × plain socket loop",
     "stream64", "loopfast_spin0", "socket", ">=", 1.0),
    ("1 MiB stream, spin=0: ≥ 1.0 × plain socket loop",
     "stream1m", "loopfast_spin0", "socket", ">=", 1.0),
    ("1 MiB stream, spin=0: ≥ 2 × multiprocessing.Pipe(duplex=False)",
     "stream1m", "loopfast_spin0", "mp_pipe_simplex", ">=", 2.0),
    ("16 MiB stream, spin=0: ≥ 1.0 × plain socket loop",
     "stream16m", "loopfast_spin0", "socket", ">=", 1.0),
    ("16 MiB stream, spin=0: ≥ 2 × multiprocessing.Pipe(duplex=False)",
     "stream16m", "loopfast_spin0", "mp_pipe_simplex", ">=", 2.0),
    # issue 4: objects
    ("256 MiB numpy object, send/recv: ≥ 0.8 × loopfast send_bytes/recv_bytes of the same size",
     "numpy_object", "loopfast", "loopfast_bytes", ">=", 0.8),
    ("256 MiB numpy object, send/recv: ≥ 5 × multiprocessing.Pipe send/recv",
     "numpy_object", "loopfast", "mp_pipe", ">=", 5.0),
    ("small object round trip (a dict of 10 short fields): ≤ 1.0 × multiprocessing.Pipe",
     "small_object_rt", "loopfast", "mp_pipe", "<=", 1.0),
    # issue 5: busy-polling and batching (default spin)
    ("64 B round trip: median ≤ 0.25 × multiprocessing.Pipe",
     "rt64", "loopfast", "mp_pipe", "<=", 0.25),
    ("4 KiB round trip: median ≤ 0.3 × multiprocessing.Pipe",
     "rt4k", "loopfast", "mp_pipe", "<=", 0.3),
    ("64 B stream, batch() + send_bytes / recv_bytes: ≥ 5 × multiprocessing.Pipe(duplex=False)",
     "stream64", "loopfast_batch", "mp_pipe_simplex", ">=", 5.0),
    # "no regression of the core's 1 MiB stream": the issue-2 targets hold with busy-polling on
    ("1 MiB stream (default spin): ≥ 1.0 × plain socket loop",
     "stream1m", "loopfast", "socket", ">=", 1.0),
    ("1 MiB stream (default spin): ≥ 2 × multiprocessing.Pipe(duplex=False)",
     "stream1m", "loopfast", "mp_pipe_simplex", ">=", 2.0),
    # issue 11: default settings, a receive takes only what it returns
    ("64 B round trip (default settings): median ≤ 0.2 × multiprocessing.Pipe",
     "rt64", "loopfast", "mp_pipe", "<=", 0.2),
    ("64 B stream, plain send_bytes/recv_bytes (default settings): ≥ 1.2 × multiprocessing.Pipe",
     "stream64", "loopfast", "mp_pipe", ">=", 1.2),
    ("64 B stream, plain send_bytes/recv_bytes (default settings): ≥ 1.0 × plain socket loop",
     "stream64", "loopfast", "socket", ">=", 1.0),
    ("16 MiB stream (default spin): ≥ 1.0 × plain socket loop",
     "stream16m", "loopfast", "socket", ">=", 1.0),
    ("16 MiB stream (default spin): ≥ 2 × multiprocessing.Pipe(duplex=False)",
     "stream16m", "loopfast", "mp_pipe_simplex", ">=", 2.0),
]

# (what the issue asks, case, peer, op, bound): an absolute median of the run.
ABSOLUTE_TARGETS = [
    ("64 B stream, send_bytes_many / recv_bytes_many: ≥ 10 million msg/s",
     "stream64", "loopfast_many", ">=", 10e6),
    ("64 B stream, batch() + send_bytes / recv_bytes: ≥ 3 million msg/s",
     "stream64", "loopfast_batch", ">=", 3e6),
]

# (what the issue asks, loopfast row of the 64 B round trip, floor, op, bound): the row's median
# ÷ the C floor's median, both from the run (bench --floors DIR).
FLOOR_TARGETS = [
    ("64 B round trip: median ≤ 1.5 × the busy-polling C floor",
     "loopfast", "rt64_spin", "<=", 1.5),
    ("64 B round trip (default settings, issue 11): median ≤ 1.3 × the busy-polling C floor",
     "loopfast", "rt64_spin", "<=", 1.3),
]

# (what the issue asks, memory row's api, compared: "ratio" (to the payload) or "bytes", op, bound)
MEMORY_TARGETS = [
    # issue 2: bytes
    ("receiving one big message (recv_bytes) peaks at ≤ 1.05 × its size in extra memory",
     "recv_bytes", "ratio", "<=", 1.05),
    ("sending one big message (send_bytes) adds under 1 MiB",
     "send_bytes", "bytes", "<", 1 * MiB),
    # issue 4: a numpy array through send/recv
    ("receiving a big numpy array (recv) peaks at ≤ 1.1 × its size in extra memory",
     "recv", "ratio", "<=", 1.1),
    ("sending a big numpy array (send) peaks at ≤ 0.05 × its size in extra memory",
     "send", "ratio", "<=", 0.05),
]

# issue 7: (what the issue asks, ratio name in the report's "aio" section, op, bound)
AIO_TARGETS = [
    ("asyncio 64 B round trip (loopfast.aio) ≤ 1.5 × the sync channel with spin=0",
     "aio / sync_spin0", "<=", 1.5),
    ("asyncio 64 B round trip faster than asyncio streams with a 4-byte length prefix",
     "aio / streams", "<", 1.0),
]

# issue 12: (what the issue asks, row of the report's "pools" section, compared: "ratio" (loopfast
# context ÷ stock) or a memory side of loopfast's queue_numpy row, op, bound)
POOL_TARGETS = [
    ("ProcessPoolExecutor.submit(f).result(), tiny task: ≤ 0.7 × stock latency",
     "ppe_submit", "ratio", "<=", 0.7),
    ("ProcessPoolExecutor.map, tiny tasks: ≥ 1.5 × stock tasks/s", "ppe_map", "ratio", ">=", 1.5),
    ("Pool.map, chunksize=1: ≥ 1.5 × stock tasks/s", "pool_map", "ratio", ">=", 1.5),
    ("Queue 64 B put → get: ≥ 1.5 × stock msg/s", "queue64", "ratio", ">=", 1.5),
    ("Queue of 64 MiB numpy arrays: ≥ 5 × stock GB/s", "queue_numpy", "ratio", ">=", 5.0),
    ("Queue of 64 MiB numpy arrays: receiver's extra memory ≤ 1.1 × one array",
     "queue_numpy", "receiver_peak", "<=", 1.1),
    ("Queue of 64 MiB numpy arrays: sender's extra memory ≤ 0.05 × one array",
     "queue_numpy", "sender_peak", "<=", 0.05),
]

PASS, MISS, UNKNOWN, SKIP = "PASS", "MISS", "????", "SKIP"


def _compare(value: float, op: str, bound: float) -> bool:
    return value <= bound if op == "<=" else value >= bound if op == ">=" else value < bound


def _judge_ratios(report: Report) -> list[tuple[str, str, str]]:
    verdicts = []
    cases = {case["name"]: case for case in report["cases"]}
    skipped_cases = report.get("skipped_cases", {})
    for text, case_name, peer, ref, op, bound in RATIO_TARGETS:
        case = cases.get(case_name)
        ratio = None if case is None else case["ratios"].get(peer, {}).get(ref)
        if case is None or ratio is None:
            why = skipped_cases.get(case_name) or f"not measured ({case_name}: {peer} vs {ref})"
            verdicts.append((UNKNOWN, text, why))
            continue
        value = ratio["of_medians"]
        ours, theirs = (format_value(case["results"][name]["median"], case["unit"])
                        for name in (peer, ref))
        measured = (f"{value:.2f}× (loopfast {ours} vs {theirs} {case['unit']}; "
                    f"paired per-round median {ratio['median_of_paired']:.2f}×)")
        if case["title"] not in text:  # judged at another size (--quick)
            measured += f" [measured: {case['title']}]"
        verdicts.append((PASS if _compare(value, op, bound) else MISS, text, measured))
    return verdicts


def _judge_memory(report: Report) -> list[tuple[str, str, str]]:
    verdicts = []
    memory = report.get("memory")
    rows = {(row["peer"], row["api"]): row for row in memory["rows"]} if memory else {}
    for text, api, what, op, bound in MEMORY_TARGETS:
        row = rows.get(("loopfast", api))
        if memory is None or row is None:
            reason: Optional[str] = None
            if memory is not None:
                reason = memory.get("skipped") or memory.get("objects_skipped")
            verdicts.append((UNKNOWN, text, reason or "memory was not measured"))
            continue
        message = f"{memory['size'] // MiB} MiB message ({row.get('message', 'bytes')})"
        value = row["worst_ratio"] if what == "ratio" else row["worst"]
        measured = (f"{row['worst_ratio']:.3f}× ({row['worst'] / MiB:.2f} MiB for a {message}, "
                    f"worst of {len(row['samples'])})")
        theirs = rows.get(("mp_pipe", api))
        if theirs is not None:
            measured += f"; multiprocessing.Pipe: {theirs['worst_ratio']:.3f}×"
        verdicts.append((PASS if _compare(value, op, bound) else MISS, text, measured))
    return verdicts


def _judge_absolute(report: Report) -> list[tuple[str, str, str]]:
    verdicts = []
    cases = {case["name"]: case for case in report["cases"]}
    for text, case_name, peer, op, bound in ABSOLUTE_TARGETS:
        case = cases.get(case_name)
        result = None if case is None else case["results"].get(peer)
        if case is None or result is None:
            why = (report.get("skipped_cases", {}).get(case_name)
                   or f"not measured ({case_name}: {peer})")
            verdicts.append((UNKNOWN, text, why))
            continue
        value = result["median"]
        measured = (f"{format_value(value, case['unit'])} {case['unit']} (min–max "
                    f"{format_value(result['min'], case['unit'])}–"
                    f"{format_value(result['max'], case['unit'])}; CPU "
                    f"{result.get('cpu_us_per_msg', float('nan')):.3f} µs per message)")
        verdicts.append((PASS if _compare(value, op, bound) else MISS, text, measured))
    return verdicts


def _judge_floors(report: Report) -> list[tuple[str, str, str]]:
    verdicts = []
    floors = report.get("floors")
    for text, row, floor, op, bound in FLOOR_TARGETS:
        if not floors:
            verdicts.append((SKIP, text, "the C floors were not run (bench --floors DIR)"))
            continue
        ratio = floors["ratios"].get(row, {}).get(floor)
        if ratio is None:
            verdicts.append((UNKNOWN, text, f"not measured ({row} vs {floor})"))
            continue
        rt64 = next(case for case in report["cases"] if case["name"] == "rt64")
        measured = (f"{ratio:.2f}× (loopfast {rt64['results'][row]['median']:.1f} µs vs C "
                    f"{floors['results'][floor]['median']:.1f} µs)")
        verdicts.append((PASS if _compare(ratio, op, bound) else MISS, text, measured))
    return verdicts


def _judge_aio(report: Report) -> list[tuple[str, str, str]]:
    verdicts = []
    aio = report.get("aio")
    for text, name, op, bound in AIO_TARGETS:
        value = None if not aio else aio["ratios"].get(name)
        if aio is None or value is None:
            verdicts.append((SKIP, text, "the asyncio round trip was not run"))
            continue
        top, bottom = name.split(" / ")
        measured = (f"{value:.2f}× ({aio['medians'][top] * 1e6:.1f} vs "
                    f"{aio['medians'][bottom] * 1e6:.1f} µs, pin: {aio['pin']})")
        verdicts.append((PASS if _compare(value, op, bound) else MISS, text, measured))
    return verdicts


THREADS_TARGET = ("8 threads on 8 pairs ≥ 1.6 × one thread's message rate, GIL off (issue 15)",
                  ">=", 1.6)


def _judge_threads(report: Report) -> list[tuple[str, str, str]]:
    text, op, bound = THREADS_TARGET
    threads = report.get("threads")
    if not threads:
        return [(SKIP, text, "the parallel threads were not run")]
    from .threads import RATIO, ROWS
    bottom, top = ROWS
    value = threads["ratios"][RATIO]
    measured = (f"{value:.2f}× ({threads['medians'][top] / 1e3:.1f}k vs "
                f"{threads['medians'][bottom] / 1e3:.1f}k msg/s)")
    if threads["gil_enabled"]:
        return [(SKIP, text, f"{measured}, but the GIL was on: judged only without it")]
    return [(PASS if _compare(value, op, bound) else MISS, text, measured)]


def _judge_pools(report: Report) -> list[tuple[str, str, str]]:
    verdicts = []
    pools = report.get("pools")
    for text, row, what, op, bound in POOL_TARGETS:
        entry = None if not pools else pools["rows"].get(row)
        if entry is None:
            why = "the pools were not run" if not pools else pools["skipped"].get(row, "no row")
            verdicts.append((SKIP, text, why))
            continue
        if what == "ratio":
            value = entry["ratio"]
            measured = (f"{value:.2f}× (loopfast {entry['medians']['loopfast']:,.4g} vs stock "
                        f"{entry['medians']['stock']:,.4g})")
        else:
            memory = entry.get("memory")
            if not memory:
                verdicts.append((SKIP, text, "memory was not measured (Linux only)"))
                continue
            value = memory["loopfast"][what]
            measured = f"{value:.3f}× (stock {memory['stock'][what]:.3f}×)"
        verdicts.append((PASS if _compare(value, op, bound) else MISS, text, measured))
    return verdicts


def judge(report: Report) -> list[tuple[str, str, str]]:
    """[(verdict, target text, measured text)] for every target."""
    return (_judge_ratios(report) + _judge_absolute(report) + _judge_floors(report)
            + _judge_memory(report) + _judge_aio(report) + _judge_pools(report)
            + _judge_threads(report))
