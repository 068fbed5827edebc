#!/usr/bin/env python3
"""Check the speed and memory targets of issues 2, 4, 5, 7, 11 and 12 from ONE run of the
loopfast bench; print PASS/MISS.

    python benchmarks/check_targets.py                  # the full bench (about 2.5 minutes)
    python benchmarks/check_targets.py --quick          # fewer rounds, smaller messages
    python benchmarks/check_targets.py --from-json F    # judge a saved bench --json F
    python benchmarks/check_targets.py --floors DIR     # other C floors (default: loopfast's own)

The targets themselves are in loopfast.tools.bench.targets (the bench's own verdict uses them).
Exit status: 0 if every target passes, 1 if any misses, 2 if one could not be judged (a case or
the memory figures missing from the run, or numpy not installed). A target against the C floors
is SKIP (not judged, no effect on the status) when the run had no --floors.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from loopfast.tools.bench import runner as _bench
from loopfast.tools.bench.floors import BUNDLED, bundled_unavailable
from loopfast.tools.bench.targets import MISS, UNKNOWN, judge
from loopfast.tools.cli import format_report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quick (noisier) run")
    parser.add_argument("--pin", choices=_bench.PIN_MODES, default="none",
                        help="CPU placement of the two processes (see python -m loopfast bench -h)")
    parser.add_argument("--json", metavar="FILE", help="save the run's report to FILE")
    parser.add_argument("--floors", metavar="DIR",
                        help="run the C floors in DIR (pingpong.c, stream.c); default: "
                             "loopfast's own, where a C compiler is found")
    parser.add_argument("--from-json", metavar="FILE",
                        help="judge a report saved by `python -m loopfast bench --json FILE`")
    args = parser.parse_args(argv)

    report: _bench.Report
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            report = json.load(f)
    else:
        floors = args.floors
        if floors is None and bundled_unavailable() is None:
            floors = BUNDLED
        report = _bench.run(quick=args.quick, pin=args.pin, floors=floors)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1, ensure_ascii=False)
    print(format_report(report))
    print()
    print("Targets (issues 2, 4, 5, 7, 11 and 12), from this one run:")
    verdicts = judge(report)
    for verdict, text, measured in verdicts:
        print(f"  {verdict}  {text}: {measured}")
    if any(v == UNKNOWN for v, _, _ in verdicts):
        return 2
    return 1 if any(v == MISS for v, _, _ in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
