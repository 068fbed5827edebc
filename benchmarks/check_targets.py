#!/usr/bin/env python3
"""Check the speed and memory targets of issues 2 and 4 from ONE run of the loopfast bench; print
PASS/MISS.

    python benchmarks/check_targets.py                  # the full bench (about 2.5 minutes)
    python benchmarks/check_targets.py --quick          # fewer rounds, smaller messages
    python benchmarks/check_targets.py --from-json F    # judge a saved bench --json F

Every target is a ratio to a peer measured in the same run (absolute figures swing by ±50% on a
shared machine). Exit status: 0 if every target passes, 1 if any misses, 2 if one could not be
judged (a case or the memory figures missing from the run, or numpy not installed).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from loopfast import _bench
from loopfast.__main__ import format_report

MiB = 1024 * 1024

# (what the issue asks, case, peer, reference peer, comparison, bound): the ratio is
# median(peer) / median(reference) from the same run.
RATIO_TARGETS = [
    # issue 2: bytes
    ("64 B round trip: median ≤ 1.1 × multiprocessing.Pipe",
     "rt64", "loopfast", "mp_pipe", "<=", 1.1),
    ("64 B stream: ≥ 1.0 × multiprocessing.Pipe",
     "stream64", "loopfast", "mp_pipe", ">=", 1.0),
    ("64 B stream: ≥ 1.0 × plain socket loop",
     "stream64", "loopfast", "socket", ">=", 1.0),
    ("1 MiB stream: ≥ 1.0 × plain socket loop",
     "stream1m", "loopfast", "socket", ">=", 1.0),
    ("1 MiB stream: ≥ 2 × multiprocessing.Pipe(duplex=False)",
     "stream1m", "loopfast", "mp_pipe_simplex", ">=", 2.0),
    ("16 MiB stream: ≥ 1.0 × plain socket loop",
     "stream16m", "loopfast", "socket", ">=", 1.0),
    ("16 MiB stream: ≥ 2 × multiprocessing.Pipe(duplex=False)",
     "stream16m", "loopfast", "mp_pipe_simplex", ">=", 2.0),
    # issue 4: objects
    ("256 MiB numpy object, send/recv: ≥ 0.8 × loopfast send_bytes/recv_bytes of the same size",
     "numpy_object", "loopfast", "loopfast_bytes", ">=", 0.8),
    ("256 MiB numpy object, send/recv: ≥ 5 × multiprocessing.Pipe send/recv",
     "numpy_object", "loopfast", "mp_pipe", ">=", 5.0),
    ("small object round trip (a dict of 10 short fields): ≤ 1.0 × multiprocessing.Pipe",
     "small_object_rt", "loopfast", "mp_pipe", "<=", 1.0),
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

PASS, MISS, UNKNOWN = "PASS", "MISS", "????"


def _compare(value: float, op: str, bound: float) -> bool:
    return value <= bound if op == "<=" else value >= bound if op == ">=" else value < bound


def _judge_ratios(report: _bench.Report) -> list[tuple[str, str, str]]:
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
        ours, theirs = (_bench.format_value(case["results"][name]["median"], case["unit"])
                        for name in (peer, ref))
        measured = (f"{value:.2f}× (loopfast {ours} vs {theirs} {case['unit']}; "
                    f"paired per-round median {ratio['median_of_paired']:.2f}×)")
        if case["title"] not in text:  # judged at another size (--quick)
            measured += f" [measured: {case['title']}]"
        verdicts.append((PASS if _compare(value, op, bound) else MISS, text, measured))
    return verdicts


def _judge_memory(report: _bench.Report) -> list[tuple[str, str, str]]:
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


def judge(report: _bench.Report) -> list[tuple[str, str, str]]:
    """[(verdict, target text, measured text)] for every target."""
    return _judge_ratios(report) + _judge_memory(report)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quick (noisier) run")
    parser.add_argument("--pin", choices=_bench.PIN_MODES, default="none",
                        help="CPU placement of the two processes (see python -m loopfast bench -h)")
    parser.add_argument("--json", metavar="FILE", help="save the run's report to FILE")
    parser.add_argument("--from-json", metavar="FILE",
                        help="judge a report saved by `python -m loopfast bench --json FILE`")
    args = parser.parse_args(argv)

    report: _bench.Report
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            report = json.load(f)
    else:
        report = _bench.run(quick=args.quick, pin=args.pin)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1, ensure_ascii=False)
    print(format_report(report))
    print()
    print("Targets (issues 2 and 4), from this one run:")
    verdicts = judge(report)
    for verdict, text, measured in verdicts:
        print(f"  {verdict}  {text}: {measured}")
    if any(v == UNKNOWN for v, _, _ in verdicts):
        return 2
    return 1 if any(v == MISS for v, _, _ in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
