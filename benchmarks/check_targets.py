#!/usr/bin/env python3
"""Check issue 2's speed and memory targets from ONE run of the loopfast bench; print PASS/MISS.

    python benchmarks/check_targets.py                  # the full bench (about 1.5 minutes)
    python benchmarks/check_targets.py --quick          # fewer rounds, smaller memory message
    python benchmarks/check_targets.py --from-json F    # judge a saved bench --json F

Every target is a ratio to a peer measured in the same run (absolute figures swing by ±50% on a
shared machine). Exit status: 0 if every target passes, 1 if any misses, 2 if one could not be
judged (a case or the memory figures missing from the run).
"""

import argparse
import json
import sys

from loopfast import _bench
from loopfast.__main__ import format_report

MiB = 1024 * 1024

# (what the issue asks, case, peer, reference peer, comparison, bound): the ratio is
# median(peer) / median(reference) from the same run.
RATIO_TARGETS = [
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
]

# (what the issue asks, memory row's api, what is compared, bound)
MEMORY_TARGETS = [
    ("receiving one big message (recv_bytes) peaks at ≤ 1.05 × its size in extra memory",
     "recv_bytes", "ratio", 1.05),
    ("sending one big message (send_bytes) adds under 1 MiB",
     "send_bytes", "bytes", 1 * MiB),
]

PASS, MISS, UNKNOWN = "PASS", "MISS", "????"


def _compare(value, op, bound):
    return value <= bound if op == "<=" else value >= bound if op == ">=" else value < bound


def judge(report):
    """[(verdict, target text, measured text)] for every target."""
    verdicts = []
    cases = {case["name"]: case for case in report["cases"]}
    for text, case_name, peer, ref, op, bound in RATIO_TARGETS:
        ratio = cases.get(case_name, {}).get("ratios", {}).get(peer, {}).get(ref)
        if ratio is None:
            verdicts.append((UNKNOWN, text, f"not measured ({case_name}: {peer} vs {ref})"))
            continue
        case = cases[case_name]
        value = ratio["of_medians"]
        ours, theirs = (_bench.format_value(case["results"][name]["median"], case["unit"])
                        for name in (peer, ref))
        measured = (f"{value:.2f}× (loopfast {ours} vs {theirs} {case['unit']}; "
                    f"paired per-round median {ratio['median_of_paired']:.2f}×)")
        verdicts.append((PASS if _compare(value, op, bound) else MISS, text, measured))
    memory = report.get("memory") or {}
    rows = {row["api"]: row for row in memory.get("rows", []) if row["peer"] == "loopfast"}
    for text, api, what, bound in MEMORY_TARGETS:
        row = rows.get(api)
        if row is None:
            reason = memory.get("skipped") or "memory was not measured"
            verdicts.append((UNKNOWN, text, reason))
            continue
        size = f"{memory['size'] // MiB} MiB message"
        if what == "ratio":
            ok = row["worst_ratio"] <= bound
            measured = f"{row['worst_ratio']:.3f}× ({row['worst'] / MiB:.1f} MiB for a {size})"
        else:
            ok = row["worst"] < bound
            measured = f"{row['worst'] / MiB:.2f} MiB for a {size}"
        verdicts.append((PASS if ok else MISS, text, measured))
    return verdicts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quick (noisier) run")
    parser.add_argument("--pin", choices=_bench.PIN_MODES, default="none",
                        help="CPU placement of the two processes (see python -m loopfast bench -h)")
    parser.add_argument("--json", metavar="FILE", help="save the run's report to FILE")
    parser.add_argument("--from-json", metavar="FILE",
                        help="judge a report saved by `python -m loopfast bench --json FILE`")
    args = parser.parse_args(argv)

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
    print("Targets (issue 2), from this one run:")
    verdicts = judge(report)
    for verdict, text, measured in verdicts:
        print(f"  {verdict}  {text}: {measured}")
    if any(v == UNKNOWN for v, _, _ in verdicts):
        return 2
    return 1 if any(v == MISS for v, _, _ in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
