"""Soak test: ``python -m loopfast soak --minutes N``.

Several processes (each with several threads) exchange messages over loopfast channels for a set
time: ``Pipe()`` ends handed to child processes, and ``Listener``/``Client`` connections with an
authkey between them. Message sizes run from 0 B to ``--max-size`` (16 MiB), mostly small; the
messages go through every sending and receiving API (send_bytes with offsets, send_bytes_many,
batch(), send() of dicts in band, of pickle.PickleBuffer and numpy arrays out of band, recv_bytes,
recv_bytes_into (with BufferTooShort), recv_bytes_many, recv, poll, wait), receives and sends with
timeouts short enough to expire part-way through a message (and then resume), and spinning
switched on and off. Every message carries (stream, sequence number, length, CRC-32), and the
receivers count lost, reordered, duplicated and corrupted messages. The parent prints a report;
the exit status is 0 only if all those counters and the error count are 0 and no process's RSS
grew by more than the bound. docs/cli/soak.md has the details.
"""

import argparse
import importlib
import json
import multiprocessing
import os
import queue
import random
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from loopfast import Pipe

from .soak_worker import (
    COUNTERS,
    DEFAULT_MAX_SIZE,
    DEFAULT_RSS_BOUND_MIB,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    GRACE,
    INJECTIONS,
    MIB,
    SETUP_TIMEOUT,
    worker_main,
)

__all__ = ["main"]

# ---- the parent ------------------------------------------------------------------------------


def _ipv6_available() -> bool:
    import socket
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _implementations(args: argparse.Namespace) -> List[str]:
    if args.implementation is not None:
        return [args.implementation] * args.processes
    # Both by default: even workers compiled, odd ones the twin, so that they also talk across.
    return ["compiled" if i % 2 == 0 else "python" for i in range(args.processes)]


def _start(args: argparse.Namespace, config: Dict[str, Any], ctx: Any, stop_event: Any,
           go_event: Any, reports: Any) -> List[Any]:
    rng = random.Random(args.seed)
    n = args.processes
    pipes = [Pipe(spin=rng.choice([None, 0.0, 50.0])) for _ in range(n)]
    keys = [os.urandom(32) for _ in range(n)]
    processes = []
    saved = os.environ.get("LOOPFAST_NO_EXTENSIONS")
    try:
        for i, impl in enumerate(_implementations(args)):
            # Link i joins worker i (role 0: the Pipe's first end, the Listener) and worker i+1.
            links = [{"id": i, "role": 0, "pipe": pipes[i][0], "authkey": keys[i]},
                     {"id": (i - 1) % n, "role": 1, "pipe": pipes[(i - 1) % n][1],
                      "authkey": keys[(i - 1) % n]}]
            os.environ["LOOPFAST_NO_EXTENSIONS"] = "1" if impl == "python" else "0"
            process = ctx.Process(target=worker_main, name=f"soak-{i}", daemon=True,
                                  args=(i, config, links, stop_event, go_event, reports))
            process.start()
            processes.append(process)
    finally:
        if saved is None:
            os.environ.pop("LOOPFAST_NO_EXTENSIONS", None)
        else:
            os.environ["LOOPFAST_NO_EXTENSIONS"] = saved
        for first, second in pipes:  # the children have their own copies now
            first.close()
            second.close()
    return processes


class Parent:
    """Starts the workers, gathers their reports, and stops everything in bounded time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.latest: Dict[int, Dict[str, Any]] = {}  # the last report of each worker
        self.interrupted = False
        self.notes: List[str] = []
        self.ctx = multiprocessing.get_context("spawn")
        self.stop_event = self.ctx.Event()
        self.processes: List[Any] = []
        self.dead: set[int] = set()
        self.go_time: Optional[float] = None
        self.next_progress = 0.0

    def gather(self, reports: Any, until: Callable[[], bool], deadline: float) -> None:
        while not until() and time.monotonic() < deadline:
            self.receive(reports, 0.25)
            if self.interrupted and not self.stop_event.is_set():
                self.stop_event.set()
            self.check_deaths(reports)
            self.progress()

    def receive(self, reports: Any, timeout: float) -> bool:
        """Take one report (waiting up to `timeout`); False if none came."""
        try:
            report = reports.get(timeout=timeout)
        except queue.Empty:
            return False
        if not self.latest.get(report["index"], {}).get("final"):
            self.latest[report["index"]] = report
        return True

    def check_deaths(self, reports: Any) -> None:
        exited = [i for i, process in enumerate(self.processes)
                  if process.exitcode is not None and not self.latest.get(i, {}).get("final")
                  and i not in self.dead]
        if exited:
            self.drain(reports)
        for i in exited:
            if not self.latest.get(i, {}).get("final"):
                self.dead.add(i)
                self.notes.append(f"worker {i} died with exit code "
                                  f"{self.processes[i].exitcode} before its final report")
                self.stop_event.set()  # the others end early; the run has failed

    def drain(self, reports: Any) -> None:
        """Read what is in the queue (a worker's last reports are there before it exits), for
        up to two seconds."""
        end = time.monotonic() + 2.0
        while time.monotonic() < end and self.receive(reports, 0.2):
            pass

    def finished(self, i: int) -> bool:
        return bool(self.latest.get(i, {}).get("final")) or i in self.dead

    def progress(self) -> None:
        now = time.monotonic()
        if self.go_time is None or now < self.next_progress:
            return
        self.next_progress = now + self.args.progress
        messages = sum(r["counts"]["messages"] for r in self.latest.values())
        size = sum(r["counts"]["bytes"] for r in self.latest.values())
        bad = sum(r["counts"][k] for r in self.latest.values()
                  for k in ("lost", "reordered", "duplicated", "corrupted", "errors"))
        print(f"[{now - self.go_time:6.0f} s] {messages:,} messages, {size / 1e9:,.2f} GB, "
              f"problems so far: {bad}", file=sys.stderr, flush=True)

    def run(self) -> Dict[str, Any]:
        args = self.args
        go_event = self.ctx.Event()
        reports = self.ctx.Queue()
        config = {"duration": args.duration, "threads": args.threads, "max_size": args.max_size,
                  "seed": args.seed, "inject": args.inject or [], "ipv6": _ipv6_available()}
        started = time.monotonic()
        self.processes = _start(args, config, self.ctx, self.stop_event, go_event, reports)
        n = len(self.processes)
        self.gather(reports, lambda: all(self.finished(i) or self.latest.get(i, {}).get("phase")
                                         in ("ready", "failed") for i in range(n)),
                    started + SETUP_TIMEOUT * 2)
        not_ready = [i for i in range(n) if self.latest.get(i, {}).get("phase") != "ready"]
        if not_ready:
            self.notes.append(f"workers {not_ready} did not get ready")
            self.stop_event.set()
        go_event.set()
        self.go_time = time.monotonic()
        self.next_progress = self.go_time + args.progress
        self.gather(reports, lambda: all(self.finished(i) for i in range(n)),
                    self.go_time + args.duration + 2 * GRACE)
        seconds = time.monotonic() - self.go_time
        self.drain(reports)
        for process in self.processes:
            process.join(10.0)
        self.drain(reports)
        for i, process in enumerate(self.processes):
            if process.exitcode is None:
                self.notes.append(f"worker {i} did not stop: terminated")
                process.terminate()
                process.join(10.0)
            if process.exitcode is None:
                process.kill()
                process.join(10.0)
            if not self.latest.get(i, {}).get("final") and i not in self.dead:
                self.dead.add(i)
                self.notes.append(f"worker {i} ended with exit code {process.exitcode} "
                                  "without a final report")
        return self.summary(seconds)

    def summary(self, seconds: float) -> Dict[str, Any]:
        args = self.args
        totals = dict.fromkeys(COUNTERS, 0)
        apis: Dict[str, int] = {}
        errors: List[str] = []
        workers = []
        bound = args.max_rss_growth * MIB
        rss_growth = 0
        for i in range(len(self.processes)):
            report = self.latest.get(i, {"counts": dict.fromkeys(COUNTERS, 0), "apis": {},
                                         "errors": [], "index": i})
            for key in COUNTERS:
                totals[key] += report["counts"][key]
            for key, value in report["apis"].items():
                apis[key] = apis.get(key, 0) + value
            errors.extend(report["errors"])
            start, end = report.get("rss_start"), report.get("rss_end")
            growth = end - start if start is not None and end is not None else None
            if growth is not None:
                rss_growth = max(rss_growth, growth)
            fds_start, fds_end = report.get("fds_start"), report.get("fds_end")
            if fds_start is not None and fds_end is not None and fds_end > fds_start:
                self.notes.append(f"worker {i}: open files grew from {fds_start} to {fds_end}")
            workers.append({**{k: v for k, v in report.items() if k not in ("counts", "apis",
                                                                             "errors")},
                            "rss_growth": growth, "died": i in self.dead,
                            "messages": report["counts"]["messages"]})
        failures = [f"{key} = {totals[key]}" for key in
                    ("lost", "reordered", "duplicated", "corrupted", "errors") if totals[key]]
        failures += self.notes
        if rss_growth > bound:
            failures.append(f"RSS grew by {rss_growth / MIB:.1f} MiB (bound {args.max_rss_growth}"
                            " MiB)")
        if totals["messages"] == 0:
            failures.append("no message was delivered")
        status = EXIT_INTERRUPTED if self.interrupted else (EXIT_FAILED if failures else 0)
        return {
            "seconds": round(seconds, 3), "requested_seconds": args.duration,
            "interrupted": self.interrupted, "processes": args.processes,
            "threads": args.threads, "max_size": args.max_size, "seed": args.seed,
            "inject": args.inject or [], "totals": totals,
            "messages_per_second": totals["messages"] / seconds if seconds else 0.0,
            "megabytes_per_second": totals["bytes"] / 1e6 / seconds if seconds else 0.0,
            "rss_growth_max": rss_growth, "rss_growth_bound": bound, "apis": apis,
            "workers": workers, "first_errors": errors[:5], "failures": failures,
            "passed": not failures and not self.interrupted, "exit_status": status}


def _mib(value: Optional[int]) -> str:
    return "?" if value is None else f"{value / MIB:.1f}"


def format_report(result: Dict[str, Any]) -> str:
    t = result["totals"]
    lines = [
        f"loopfast soak: {result['processes']} processes, Pipe (1 sender each way) and "
        f"Listener/Client ({result['threads']} sender{'s' * (result['threads'] != 1)} each way) "
        f"links in a ring, messages "
        f"0 B to {result['max_size']:,} B, seed {result['seed']}"
        + (" (INTERRUPTED: partial report)" if result["interrupted"] else ""),
        f"duration      {result['seconds']:.1f} s (requested {result['requested_seconds']:g})",
        f"messages      {t['messages']:,} received, {t['messages_sent']:,} sent",
        f"bytes         {t['bytes']:,} received ({t['bytes'] / 1e9:.2f} GB), "
        f"{t['bytes_sent']:,} sent",
        f"rate          {result['messages_per_second']:,.0f} messages/s, "
        f"{result['megabytes_per_second']:,.1f} MB/s",
        f"lost {t['lost']}   reordered {t['reordered']}   duplicated {t['duplicated']}   "
        f"corrupted {t['corrupted']}   errors {t['errors']}",
        f"timeouts that expired and resumed: {t['recv_timeouts']:,} receives, "
        f"{t['send_timeouts']:,} sends; out-of-band refusals {t['oob_refusals']:,}; "
        f"BufferTooShort {t['buffer_too_short']:,}; spin changes {t['spin_changes']:,}",
        "APIs          " + ", ".join(f"{k} {v:,}" for k, v in sorted(result["apis"].items())),
        "worker  impl      messages   RSS start  RSS end  growth  peak (MiB)  "
        "fds start/end/closed",
    ]
    for w in result["workers"]:
        state = " DIED" if w["died"] else ""
        lines.append(
            f"{w['index']:>6}  {w.get('implementation', '?'):<8} {w['messages']:>10,}"
            f"  {_mib(w.get('rss_start')):>9}  {_mib(w.get('rss_end')):>7}"
            f"  {_mib(w.get('rss_growth')):>6}  {_mib(w.get('rss_peak')):>10}"
            f"  {w.get('fds_start')}/{w.get('fds_end')}/{w.get('fds_after_close')}{state}")
    lines.append(f"RSS growth    max {result['rss_growth_max'] / MIB:+.1f} MiB "
                 f"(bound {result['rss_growth_bound'] / MIB:.0f} MiB)")
    for text in result["first_errors"]:
        lines.append("problem: " + text.rstrip().replace("\n", "\n  "))
    if result["interrupted"]:
        lines.append("result        INTERRUPTED (partial report)")
    elif result["failures"]:
        lines.append("result        FAIL: " + "; ".join(result["failures"]))
    else:
        lines.append("result        PASS")
    return "\n".join(lines)


def _size(text: str) -> int:
    units = {"k": 1024, "m": MIB, "g": 1024 * MIB}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(text[-1:], 1)
    value = int(float(text[:-1] if text[-1:] in units else text) * factor)
    if value < 0:
        raise argparse.ArgumentTypeError("size must be >= 0")
    return value


DESCRIPTION = ("Soak test: processes and threads exchange checked messages over loopfast "
               "channels; exit status 0 only if nothing was lost, reordered, duplicated or "
               "corrupted, no error happened and RSS stayed within the bound.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The soak test's options, on `parser` (``python -m loopfast soak``'s subcommand)."""
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="run time in minutes (default 1)")
    length.add_argument("--seconds", type=float, help="run time in seconds")
    parser.add_argument("--processes", type=int, default=4,
                        help="worker processes, linked in a ring (default 4, at least 2)")
    parser.add_argument("--threads", type=int, default=3,
                        help="sending threads per direction of each Listener/Client "
                             "connection (default 3)")
    parser.add_argument("--max-size", type=_size, default=DEFAULT_MAX_SIZE,
                        help="largest message, e.g. 16MiB (default), 1M, 4096")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--implementation", choices=["compiled", "python"], default=None,
                        help="run every worker with this channel implementation (default: even "
                             "workers compiled, odd ones the pure-Python twin)")
    parser.add_argument("--max-rss-growth", type=float, default=DEFAULT_RSS_BOUND_MIB,
                        metavar="MIB", help="fail if a process's RSS grows by more than this "
                                            "after the warm-up (default 64)")
    parser.add_argument("--progress", type=float, default=30.0, metavar="SECONDS",
                        help="progress line on stderr every SECONDS (default 30)")
    selftest = parser.add_argument_group(
        "self-test", "deliberately break the run, to prove that the checks catch it (the run "
                     "then fails)")
    selftest.add_argument("--inject", action="append", choices=INJECTIONS,
                          help="corruption: flip a bit of one payload; loss: skip a sequence "
                               "number; duplicate: send one message twice; reorder: swap two "
                               "messages; kill: worker 1 exits after the warm-up (repeatable)")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Validate the parsed options (parser.error() on a bad one) and fill in the derived ones."""
    if args.processes < 2:
        parser.error("--processes must be at least 2")
    if args.threads < 1 or args.threads > 64:
        parser.error("--threads must be between 1 and 64")
    if args.max_size > 1024 * MIB:
        parser.error("--max-size is at most 1 GiB")
    if args.seconds is not None:
        args.duration = args.seconds
    else:
        args.duration = 60.0 * (1.0 if args.minutes is None else args.minutes)
    if args.duration <= 0:
        parser.error("the run time must be positive")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    if args.implementation == "compiled":
        try:
            importlib.import_module("loopfast._core.channel")
        except ImportError:
            parser.error("the compiled extension is not available here")
    return args


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loopfast soak", description=DESCRIPTION)
    add_arguments(parser)
    return check_args(parser, parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the soak test that `args` (from check_args) describe; the exit status."""
    parent = Parent(args)

    def interrupt(signum: int, frame: Any) -> None:
        parent.interrupted = True  # the gathering loop tells the workers to stop

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        result = parent.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
            out.write("\n")
    return int(result["exit_status"])


def main(argv: Optional[List[str]] = None) -> int:
    return run(parse_args(argv))
