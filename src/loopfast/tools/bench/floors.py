"""The C floors of ``python -m loopfast bench``: two small C programs, pingpong.c and stream.c,
that measure what plain C reaches over TCP 127.0.0.1 between two processes. loopfast ships its
own (bench/c/, POSIX); ``--floors DIR`` takes others with the same command lines and output.
They are compiled with ``cc -O2`` (``$CC``) into a temporary directory when the bench starts and
run in each round, beside the Python peers, so that loopfast is judged against what plain C
reaches on the same machine in the same hour.

pingpong: ``pingpong SPIN SIZE COUNT`` prints "... rtt median X us p99 Y us";
stream: ``stream SIZE COUNT BATCH`` prints "... N msg/s G GB/s".
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import tempfile
from typing import NamedTuple, Optional, TypedDict

__all__ = ["BUNDLED", "FLOORS", "Floor", "FloorResult", "FloorRunner", "FloorsSection",
           "bundled_unavailable", "summarize"]

# loopfast's own floor programs (package data).
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c")

# The longest one floor program may run (its own processes included).
FLOOR_TIMEOUT = 120.0


class Floor(NamedTuple):
    name: str
    label: str
    program: str  # "pingpong" or "stream"
    args: tuple[int, int, int]  # full run
    quick_args: tuple[int, int, int]
    unit: str  # "µs", "msg/s" or "GB/s"


FLOORS = (
    Floor("rt64_spin", "64 B round trip, busy-polling", "pingpong", (1, 64, 20_000),
          (1, 64, 5000), "µs"),
    Floor("rt64_block", "64 B round trip, blocking", "pingpong", (0, 64, 5000), (0, 64, 1500),
          "µs"),
    Floor("stream64_b1", "64 B stream, 1 per send()", "stream", (64, 200_000, 1),
          (64, 50_000, 1), "msg/s"),
    Floor("stream64_b1000", "64 B stream, 1000 per send()", "stream", (64, 5_000_000, 1000),
          (64, 1_000_000, 1000), "msg/s"),
    Floor("stream1m", "1 MiB stream", "stream", (1024 * 1024, 1000, 1), (1024 * 1024, 200, 1),
          "GB/s"),
)

_PINGPONG = re.compile(r"rtt median ([0-9.]+) us")
_STREAM = re.compile(r"([0-9.]+) msg/s ([0-9.]+) GB/s")


class FloorResult(TypedDict):
    label: str
    unit: str
    command: str
    samples: list[float]
    median: float
    min: float
    max: float


def bundled_unavailable() -> Optional[str]:
    """None if the bundled floor programs can be built and run here, else why not."""
    if os.name != "posix":
        return "the C floor programs are POSIX only"
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler!r} was not found; set CC)"
    return None


class FloorsSection(TypedDict):
    directory: str
    compiler: str
    results: dict[str, FloorResult]
    # loopfast's 64 B round trip ÷ a floor, per loopfast row: {"loopfast": {"rt64_spin": x, ...}}
    ratios: dict[str, dict[str, float]]


class FloorError(RuntimeError):
    """The floor programs could not be compiled or run."""


class FloorRunner:
    """Compiles the floor programs of `directory` into a temporary directory (context manager)
    and runs them: `run_all()` once per round."""

    def __init__(self, directory: str, quick: bool) -> None:
        self.directory = os.path.abspath(directory)
        self.quick = quick
        self.compiler = os.environ.get("CC", "cc")
        self._tmp: Optional[tempfile.TemporaryDirectory[str]] = None
        self.binaries: dict[str, str] = {}
        self.samples: dict[str, list[float]] = {floor.name: [] for floor in FLOORS}
        # The CPUs before the bench pins itself (--pin): the floor programs fork their own two
        # processes and must not inherit a single pinned CPU (a busy-polling ping-pong on one
        # CPU never finishes).
        self.cpus: Optional[set[int]] = (
            os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None)

    def __enter__(self) -> FloorRunner:
        missing = [f"{p}.c" for p in ("pingpong", "stream")
                   if not os.path.isfile(os.path.join(self.directory, f"{p}.c"))]
        if missing:
            raise FloorError(f"--floors {self.directory}: no {' or '.join(missing)} there")
        if shutil.which(self.compiler) is None:
            raise FloorError(f"--floors needs a C compiler: {self.compiler!r} was not found")
        self._tmp = tempfile.TemporaryDirectory(prefix="loopfast-floors-")
        for program in ("pingpong", "stream"):
            binary = os.path.join(self._tmp.name, program)
            command = [self.compiler, "-O2", "-o", binary,
                       os.path.join(self.directory, f"{program}.c")]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                  check=False)
            if done.returncode != 0:
                self._tmp.cleanup()
                raise FloorError(f"compiling {program}.c failed: {done.stderr.strip()}")
            self.binaries[program] = binary
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def command(self, floor: Floor) -> list[str]:
        args = floor.quick_args if self.quick else floor.args
        return [self.binaries[floor.program], *map(str, args)]

    def run_one(self, floor: Floor) -> float:
        command = self.command(floor)
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=FLOOR_TIMEOUT, check=False,
                                  preexec_fn=self._unpin if self.cpus is not None else None)
        except subprocess.TimeoutExpired:
            raise FloorError(f"{floor.program} did not finish in {FLOOR_TIMEOUT:g} s") from None
        if done.returncode != 0:
            raise FloorError(f"{' '.join(command)} failed (status {done.returncode}): "
                             f"{done.stderr.strip()}")
        if floor.program == "pingpong":
            match = _PINGPONG.search(done.stdout)
            if match:
                return float(match.group(1))
        else:
            match = _STREAM.search(done.stdout)
            if match:
                return float(match.group(1 if floor.unit == "msg/s" else 2))
        raise FloorError(f"unexpected output from {' '.join(command)}: {done.stdout.strip()!r}")

    def _unpin(self) -> None:
        if self.cpus is not None:
            os.sched_setaffinity(0, self.cpus)

    def run_all(self) -> dict[str, float]:
        """Every floor once; returns this round's figures."""
        got = {}
        for floor in FLOORS:
            got[floor.name] = value = self.run_one(floor)
            self.samples[floor.name].append(value)
        return got


def summarize(runner: FloorRunner, rt64_medians: dict[str, float]) -> FloorsSection:
    """The floors' medians, and each loopfast 64 B round-trip median (by row) ÷ each round-trip
    floor."""
    results: dict[str, FloorResult] = {}
    for floor in FLOORS:
        samples = runner.samples[floor.name]
        if not samples:
            continue
        command = runner.command(floor)
        results[floor.name] = {
            "label": floor.label, "unit": floor.unit,
            "command": " ".join([os.path.basename(command[0]), *command[1:]]),
            "samples": samples, "median": statistics.median(samples),
            "min": min(samples), "max": max(samples)}
    ratios: dict[str, dict[str, float]] = {row: {name: median / results[name]["median"]
                                                 for name in ("rt64_spin", "rt64_block")
                                                 if name in results}
                                           for row, median in rt64_medians.items()}
    return {"directory": runner.directory, "compiler": runner.compiler, "results": results,
            "ratios": ratios}
