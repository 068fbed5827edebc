"""Command line: ``python -m loopfast <command>`` (also installed as the ``loopfast`` script).

    python -m loopfast bench [--quick] [--json FILE] [--plot FILE.png] [--floors DIR]
        loopfast beside its peers (and the C floors), one table
    python -m loopfast doctor [--json] [--port N] [--timeout S] [--strict]
        what works on loopback here, what does not and why, and what decides the speed
    python -m loopfast soak [--minutes N | --seconds N] [--processes N] [--inject WHAT] ...
        processes and threads exchange checked messages for a while: nothing may be lost

The measuring is in bench/, the diagnosis in doctor.py, the soak test in soak.py; this file
parses arguments and prints the reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Callable, Iterable, Optional, Sequence

from . import doctor as _doctor
from . import soak as _soak
from .bench import aio as _bench_aio
from .bench import floors as _bench_floors
from .bench import plot as _bench_plot
from .bench import pools as _bench_pools
from .bench import runner as _bench
from .bench import targets as _targets
from .bench import threads as _bench_threads
from .bench.children import MiB
from .bench.report import MemorySection, PeerResult, Report, format_size, format_value


def _run_bench(args: argparse.Namespace) -> int:
    if args.list:
        print("cases (* = in the default run):")
        for case in _bench.CASES.values():
            reason = case.unavailable()
            print(f"  {'*' if case.default else ' '} {case.name:<16} {case.title}: "
                  f"{', '.join(case.peers)}" + (f" (unavailable: {reason})" if reason else ""))
        print("peers:")
        for peer in _bench.PEERS.values():
            print(f"    {peer.name:<16} {peer.label}")
        return 0
    unknown = [name for name in args.case or () if name not in _bench.CASES]
    if unknown:
        print(f"loopfast bench: unknown case(s) {', '.join(unknown)} "
              f"(known: {', '.join(_bench.CASES)})", file=sys.stderr)
        return 2
    if args.plot:  # refuse before the run, not after it
        missing = _bench_plot.plot_unavailable()
        if missing:
            print(f"loopfast bench: {missing}", file=sys.stderr)
            return 2
    if args.floors and not os.path.isdir(args.floors):
        print(f"loopfast bench: --floors {args.floors}: not a directory", file=sys.stderr)
        return 2
    floors, floors_skipped = args.floors, None
    if floors is None and not args.no_floors:  # loopfast's own, where they can be built
        floors_skipped = _bench_floors.bundled_unavailable()
        floors = None if floors_skipped else _bench_floors.BUNDLED
    try:
        report = _bench.run(args.case, quick=args.quick, rounds=args.rounds,
                            memory=not args.no_memory, pin=args.pin, floors=floors,
                            aio=not args.no_aio, pools=not args.no_pools,
                            threads=not args.no_threads)
    except (_bench.BenchError, ValueError) as exc:
        print(f"loopfast bench: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if floors_skipped:
        print(f"C floors: not run ({floors_skipped})")
    print()
    print(format_verdict(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"loopfast bench: wrote every sample to {args.json}", file=sys.stderr)
    if args.plot:
        _bench_plot.write_plot(report, args.plot)
        print(f"loopfast bench: wrote the plot to {args.plot}", file=sys.stderr)
    return 0


def _run_doctor(args: argparse.Namespace) -> int:
    report = _doctor.run(port=args.port, timeout=args.timeout)
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        print(_doctor.format_text(report))
    return _doctor.exit_status(report, strict=args.strict)


# ---- the report as text ------------------------------------------------------------------------

WIDTH = 100  # the text report fits a terminal this wide

_SHORT_REFERENCE = {"mp_pipe": "mp.Pipe", "mp_pipe_simplex": "simplex",
                    "socket": "socket", "loopfast_bytes": "bytes"}
# Row labels that fit the table (the full ones are in the report's "peers" and the JSON).
_SHORT_LABEL = {"loopfast": "loopfast.Pipe()", "loopfast_spin0": "loopfast spin=0",
                "loopfast_many": "loopfast *_many ×1000", "loopfast_batch": "loopfast batch()",
                "loopfast_bytes": "loopfast send_bytes", "mp_pipe": "mp.Pipe()",
                "mp_pipe_simplex": "mp.Pipe(duplex=False)", "mp_tcp": "mp.connection TCP",
                "socket": "socket loop", "zmq": "pyzmq PAIR"}

_TABLE_NOTES = """\
mp: multiprocessing. Ratio columns: to multiprocessing.Pipe() (mp.Pipe), to
multiprocessing.Pipe(duplex=False) (simplex), to the plain socket loop (socket), to loopfast's own
send_bytes/recv_bytes of the same bytes (bytes). Spread: half the min-max range over the rounds,
in % of the median. *_many: send_bytes_many/recv_bytes_many of 1,000 messages at a time.
CPU µs: CPU time (user + system) of both processes, this one and the peer process, per message
(per round trip for round trips), median over the rounds: a busy-polling receiver spends CPU
while it waits; batching spends less per message.
Ratios: this row's median ÷ the reference's median, from this run. For µs lower is better
(≤ 1 means faster); for msg/s and GB/s higher is better. Round trips: the median of the single
round trips of a measurement. 1 and 16 MiB streams: recv_bytes_into one preallocated buffer (the
socket loop: recv_into). Socket loop: 8-byte length header, sendall, recv_into, TCP_NODELAY."""

_OBJECT_NOTES = """\
Objects (send/recv): loopfast pickles at protocol 5 with a numpy array's memory out of band
(written from the array, received into a new bytearray); multiprocessing pickles it in band.
"bytes": the same data through loopfast send_bytes(array.data) / recv_bytes(), this run."""


def format_report(report: Report) -> str:
    """The report as the text tables `python -m loopfast bench` prints."""
    env = report["environment"]
    pin = report["settings"].get("pin", "none")
    rounds = report["settings"]["rounds"]
    usable = env.get("usable_cpus")
    cpus = f"{env['cpu_count']} CPUs"
    if usable not in (None, env["cpu_count"]):
        cpus += f" ({usable} usable)"
    load = env.get("load_average")
    implementation = env.get("implementation", "unknown")
    spin = env.get("spin_us")
    spin_text = ""
    if implementation == "compiled" and spin is not None:  # the twin never busy-polls
        spin_text = f", busy-poll {spin:g} µs" if spin else ", no busy-poll"
    lines = [
        (f"loopfast {env['loopfast_version']}, {implementation} implementation "
         f"({env['loopfast_core']}){spin_text}, on {env['python']}, {env['platform']}"),
        f"machine: {cpus}, {env.get('cpu_model') or env['machine']}"
        + (f", load average {load[0]:.2f} at start" if load else "")
        + f"; peer processes by {env['start_method']}",
        f"{rounds} round{'' if rounds == 1 else 's'}, peers interleaved in rotated order"
        + ("" if pin == "none" else f", processes pinned ({pin})") + "; "
        f"figures are medians over the rounds; run took {report.get('duration_s', 0):.0f} s",
    ]
    lines = [wrapped for line in lines for wrapped in textwrap.wrap(
        line, width=WIDTH, subsequent_indent="  ", break_on_hyphens=False)] + [""]
    refs = sorted({ref for case in report["cases"] for ref in case["references"]},
                  key=lambda ref: [*_SHORT_REFERENCE, ref].index(ref))
    header = (["case / peer", "median", "unit", "spread", "CPU µs"]
              + [_SHORT_REFERENCE.get(ref, ref) for ref in refs])
    rows = []
    for case in report["cases"]:
        rows.append([case["title"]] + [""] * (len(header) - 1))
        for name, result in case["results"].items():
            unit = case["unit"]
            row = ["  " + _SHORT_LABEL.get(name, result["label"][:24]),
                   format_value(result["median"], unit), unit,
                   _spread_text(result), _cpu_text(result.get("cpu_us_per_msg"))]
            for ref in refs:
                ratio = case["ratios"].get(name, {}).get(ref)
                row.append(f"{ratio['of_medians']:.2f}×" if ratio else "")
            rows.append(row)
    lines += _table(header, rows, right=set(range(1, len(header))) - {2})
    shown = {name: result["label"] for case in report["cases"]
             for name, result in case["results"].items()
             if _SHORT_LABEL.get(name, result["label"][:24]) != result["label"]}
    lines += ["", *_TABLE_NOTES.splitlines()]
    if shown:
        lines.append("Peers, as the table names them:")
        lines += [f"  {_SHORT_LABEL.get(name, label[:24]):<24}  {label}"
                  for name, label in shown.items()]
    floors = report.get("floors")
    if floors:
        lines.append("")
        lines += _floor_lines(floors)
    if any(case.get("receive") == "object" for case in report["cases"]):
        lines.append(_OBJECT_NOTES)
        for case in report["cases"]:
            if case.get("receive") == "object" and case["note"]:
                lines += textwrap.wrap(f"{case['title']}: {case['note']}.", width=100)
    for name, reason in report.get("skipped_peers", {}).items():
        lines.append(f"skipped peer {name}: {reason}")
    for name, reason in report.get("skipped_cases", {}).items():
        lines.append(f"skipped case {name}: {reason}")
    mem = report.get("memory")
    if mem:
        lines.append("")
        lines += _memory_lines(mem)
    aio = report.get("aio")
    if aio:
        lines.append("")
        lines.append(_bench_aio.format_report(aio))
    pools = report.get("pools")
    if pools:
        lines.append("")
        lines.append(_bench_pools.format_report(pools))
    threads = report.get("threads")
    if threads:
        lines.append("")
        lines.append(_bench_threads.format_report(threads))
    return "\n".join(lines)


# The loopfast rows of the bottom line, each against multiprocessing.Pipe() of the same case.
_BOTTOM_LINE = [("loopfast", "loopfast.Pipe()"), ("loopfast_spin0", "spin=0"),
                ("loopfast_batch", "batch()"), ("loopfast_many", "*_many")]


def format_verdict(report: Report) -> str:
    """The bench's last words: each loopfast row against multiprocessing.Pipe(), and every target
    of benchmarks/check_targets.py (loopfast.tools.bench.targets) judged on this run."""
    lines = textwrap.wrap("Bottom line: loopfast against multiprocessing.Pipe() in this run "
                          "(µs: < 1× is faster; msg/s, GB/s: > 1× is faster).", width=WIDTH)
    columns = [(name, title) for name, title in _BOTTOM_LINE
               if any(name in case["results"] for case in report["cases"])]
    rows = []
    for case in report["cases"]:
        cells = [case["title"]]
        for name, _ in columns:
            ratio = case["ratios"].get(name, {}).get("mp_pipe")
            if ratio is None:
                cells.append("")
                continue
            value = ratio["of_medians"]
            faster = value < 1 if case["unit"] == "µs" else value > 1
            verdict = "same" if f"{value:.2f}" == "1.00" else "faster" if faster else "slower"
            cells.append(f"{value:.2f}× {verdict}")
        if any(cells[1:]):
            rows.append(cells)
    lines += _table(["case"] + [title for _, title in columns], rows,
                    right=set(range(1, len(columns) + 1)))
    verdicts = _targets.judge(report)
    counts = {v: sum(1 for got, _, _ in verdicts if got == v)
              for v in (_targets.PASS, _targets.MISS, _targets.SKIP, _targets.UNKNOWN)}
    lines += ["", textwrap.fill(
        f"Targets (benchmarks/check_targets.py's, from this run): {counts[_targets.PASS]} pass, "
        f"{counts[_targets.MISS]} miss, "
        f"{counts[_targets.SKIP] + counts[_targets.UNKNOWN]} not judged here"
        + (" (a quick run judges smaller messages, with fewer rounds)"
           if report["settings"].get("quick") else "") + ".", width=WIDTH)]
    for verdict, text, measured in verdicts:
        if verdict in (_targets.SKIP, _targets.UNKNOWN):
            continue
        shown = measured.split(" (")[0]
        lines += textwrap.wrap(f"{verdict}  {shown:>16}  {text}", width=WIDTH,
                               subsequent_indent=" " * 24)
    missing_cases, reasons = set(), set()
    for got, _, measured in verdicts:
        if got not in (_targets.SKIP, _targets.UNKNOWN):
            continue
        if measured.startswith("not measured ("):
            missing_cases.add(measured[len("not measured ("):].split(":")[0])
        else:
            reasons.add(measured)
    if missing_cases:
        reasons.add("cases not in this run: " + ", ".join(sorted(missing_cases)))
    if reasons:
        lines += textwrap.wrap("not judged: " + "; ".join(sorted(reasons)), width=WIDTH,
                               subsequent_indent="  ")
    return "\n".join(lines)


def _spread_text(result: PeerResult) -> str:
    """Half the min-max range, in % of the median."""
    median = result["median"]
    if not median:
        return ""
    return f"±{50 * (result['max'] - result['min']) / median:.0f}%"


def _cpu_text(value: Optional[float]) -> str:
    if value is None:
        return ""
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def _floor_lines(floors: _bench_floors.FloorsSection) -> list[str]:
    bundled = (os.path.isdir(floors["directory"])
               and os.path.samefile(floors["directory"], _bench_floors.BUNDLED))
    where = "loopfast's own" if bundled else f"from {floors['directory']}"
    lines = textwrap.wrap(f"C floor (pingpong.c and stream.c {where}, {floors['compiler']} -O2, "
                          "run in every round):", width=WIDTH)
    rows = [[result["label"], result["command"], format_value(result["median"], result["unit"]),
             result["unit"], f"{format_value(result['min'], result['unit'])}–"
                             f"{format_value(result['max'], result['unit'])}"]
            for result in floors["results"].values()]
    lines += _table(["floor", "command", "median", "unit", "min–max"], rows, right={2, 4})
    spin = floors["results"].get("rt64_spin")
    block = floors["results"].get("rt64_block")
    for row, ratios in floors["ratios"].items():
        parts = []
        if spin and "rt64_spin" in ratios:
            parts.append(f"{ratios['rt64_spin']:.2f}× the busy-polling floor")
        if block and "rt64_block" in ratios:
            parts.append(f"{ratios['rt64_block']:.2f}× the blocking floor")
        if parts:
            label = _bench.PEERS[row].label if row in _bench.PEERS else row
            lines.append(f"64 B round trip, {label}: {' and '.join(parts)}")
    return lines


def _memory_lines(mem: MemorySection) -> list[str]:
    if mem["skipped"]:
        return [f"memory: skipped ({mem['skipped']})"]
    method = mem.get("method", "rise of the peak RSS (VmHWM) during the call")
    lines = textwrap.wrap(f"Memory: one {format_size(mem['size'])} message between two "
                          f"processes, worst of {mem['repeats']}; extra memory = {method}.",
                          width=100)
    header = ["peer", "side", "call", "message", "extra memory", "× payload", "samples"]
    rows = [[row["label"], row["side"], row["api"], row.get("message", "bytes"),
             f"{row['worst'] / MiB:.2f} MiB", f"{row['worst_ratio']:.3f}×",
             str(len(row["samples"]))] for row in mem["rows"]]
    lines += _table(header, rows, right={4, 5, 6})
    if mem.get("objects_skipped"):
        lines.append(f"skipped the object rows (send/recv of a float64 array): "
                     f"{mem['objects_skipped']}")
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           right: Iterable[int] = ()) -> list[str]:
    right = set(right)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


# ---- arguments -----------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a TCP port number, 1..65535")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError("must be a number of seconds > 0")
    return value


def _version_text() -> str:
    """loopfast's version, the channel implementation in use and the interpreter."""
    import platform

    import loopfast
    return (f"loopfast {loopfast.__version__} ({loopfast.implementation} core) on "
            f"{platform.python_implementation()} {platform.python_version()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopfast",
        description="loopfast: fast, authenticated message channels between processes over "
                    "loopback TCP.")
    parser.add_argument("--version", action="version", version=_version_text())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    bench = commands.add_parser(
        "bench", help="measure loopfast beside multiprocessing, a plain socket loop and pyzmq",
        description="Measure loopfast.Pipe() (with and without busy-polling, and batched) "
                    "beside multiprocessing.Pipe(), multiprocessing.Pipe(duplex=False), "
                    "multiprocessing.connection over TCP, a plain Python socket loop and pyzmq "
                    "(when installed), in one run: repeated rounds with the peers interleaved, "
                    "medians, CPU per message, and each figure's ratio to multiprocessing.Pipe "
                    "(and, for streams, to the other peers). "
                    "Progress goes to stderr, the tables to stdout.")
    bench.add_argument("--quick", action="store_true",
                       help="fewer rounds and messages (well under 30 s); noisier figures")
    bench.add_argument("--json", metavar="FILE",
                       help="also write every sample, median and ratio to FILE as JSON")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="also draw the medians to FILE.png, one panel per case, the ratio "
                            "to multiprocessing.Pipe on each bar (needs matplotlib: "
                            "pip install 'loopfast[plot]')")
    bench.add_argument("--floors", metavar="DIR",
                       help="compile (cc -O2) and run the C floor programs pingpong.c and "
                            "stream.c found in DIR, in every round, and compare loopfast's 64 B "
                            "round trip with them (default: loopfast's own, when a C compiler "
                            "is found)")
    bench.add_argument("--no-floors", action="store_true",
                       help="do not run the C floors")
    bench.add_argument("--rounds", type=_positive_int, metavar="N",
                       help="rounds (default: 7, or 3 with --quick)")
    bench.add_argument("--case", action="append", metavar="NAME",
                       help="run only this case (repeatable; see --list)")
    bench.add_argument("--pin", choices=_bench.PIN_MODES, default="none",
                       help="CPU placement (Linux): 'split' pins this process and the peer "
                            "process to two different CPUs, 'same' to one; default: the "
                            "scheduler's choice")
    bench.add_argument("--no-memory", action="store_true",
                       help="skip the peak-memory measurement")
    bench.add_argument("--no-aio", action="store_true",
                       help="skip the asyncio round trip (loopfast.aio beside the sync channel "
                            "and asyncio streams; not run with --case either)")
    bench.add_argument("--no-pools", action="store_true",
                       help="skip multiprocessing's pools and queues (ProcessPoolExecutor, "
                            "Pool, Queue: stock beside loopfast.get_context(); not run with "
                            "--case either)")
    bench.add_argument("--no-threads", action="store_true",
                       help="skip the parallel threads (one thread's message rate beside eight "
                            "threads' on eight pairs; not run with --case either)")
    bench.add_argument("--list", action="store_true", help="list the cases and peers, and exit")
    bench.set_defaults(handler=_run_bench)

    doctor = commands.add_parser(
        "doctor", help="diagnose loopback trouble and show what decides loopfast's speed here",
        description="Check that loopfast works over 127.0.0.1 and ::1 (bind, connect, "
                    "handshake, round trip), what 'localhost' resolves to, and optionally what "
                    "answers on a given port (refused, dropped, reset, listening; loopfast or "
                    "not); show the machine's facts that decide loopfast's speed (usable CPUs, "
                    "busy-polling, socket buffer limits, ephemeral ports) and measure the 64 B "
                    "round trip. Talks to 127.0.0.1 and ::1 only. Exit status: 0 healthy "
                    "(warnings allowed), 1 an error (or a warning with --strict), 2 usage.")
    doctor.add_argument("--json", action="store_true",
                        help="print one JSON object (machine facts and the checks) instead of "
                             "the list")
    doctor.add_argument("--port", type=_port, metavar="N",
                        help="also check TCP port N on 127.0.0.1 and ::1: refused, dropped "
                             "(timed out), reset or listening, and whether a loopfast listener "
                             "answers (nothing is sent to it)")
    doctor.add_argument("--timeout", type=_seconds, default=_doctor.DEFAULT_TIMEOUT,
                        metavar="S",
                        help="seconds to wait for each connection and answer (default: "
                             f"{_doctor.DEFAULT_TIMEOUT:g})")
    doctor.add_argument("--strict", action="store_true",
                        help="exit with status 1 on warnings too")
    doctor.set_defaults(handler=_run_doctor)

    soak = commands.add_parser(
        "soak", help="run the soak test: checked messages between processes and threads",
        description=_soak.DESCRIPTION)
    _soak.add_arguments(soak)
    soak.set_defaults(handler=lambda args: _soak.run(_soak.check_args(soak, args)))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m loopfast`` and of the ``loopfast`` console script."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)
