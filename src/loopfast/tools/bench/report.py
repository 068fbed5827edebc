"""The bench's report: its JSON shape (what ``--json`` writes and benchmarks/check_targets.py
reads) and the figures as text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, TypedDict

from .children import KiB, MiB

if TYPE_CHECKING:
    from .aio import AioReport
    from .children import Measurement
    from .floors import FloorsSection
    from .threads import ThreadsReport

# ==== the report (JSON-ready) =====================================================================

class PeerResult(TypedDict):
    label: str
    samples: list[float]
    median: float
    min: float
    max: float
    # CPU time of both processes (this one and the peer process, user + system), in µs per
    # message (per round trip for round trips): the median over the rounds
    cpu_us_per_msg: float
    runs: list[Measurement]  # each measurement, with its "round" and "position" in the round


class Ratio(TypedDict):
    of_medians: float  # median(row) / median(reference)
    median_of_paired: float  # median over the rounds of row / reference from the same round
    paired: list[float]


class CaseReport(TypedDict):
    name: str
    title: str
    kind: str
    payload: str
    size: int
    unit: str
    unit_description: str
    lower_is_better: bool
    receive: str
    note: str
    count: int
    warmup: int
    references: list[str]
    results: dict[str, PeerResult]
    ratios: dict[str, dict[str, Ratio]]


class MemoryRow(TypedDict):
    peer: str
    label: str
    side: str  # "send" or "receive"
    api: str  # the call measured: send_bytes, recv_bytes, recv_bytes_into, send, recv
    message: str  # what moved: "bytes" or "float64 array"
    samples: list[int]
    worst: int
    worst_ratio: float


class MemorySection(TypedDict):
    size: int
    repeats: int
    method: str
    skipped: Optional[str]
    objects_skipped: Optional[str]
    rows: list[MemoryRow]


class Environment(TypedDict):
    loopfast_version: str
    implementation: str  # loopfast.implementation: "compiled" or "python"
    loopfast_core: str
    spin_us: float  # the process-wide busy-polling budget (the pure-Python twin never spins)
    python: str
    platform: str
    machine: str
    cpu_count: Optional[int]
    usable_cpus: Optional[int]
    cpu_model: Optional[str]
    load_average: Optional[list[float]]
    start_method: str


class Settings(TypedDict):
    quick: bool
    rounds: int
    cases: list[str]
    memory: bool
    pin: str
    floors: Optional[str]


class Report(TypedDict):
    schema: str
    started: str
    environment: Environment
    settings: Settings
    peers: dict[str, str]
    skipped_peers: dict[str, str]
    skipped_cases: dict[str, str]
    cases: list[CaseReport]
    memory: Optional[MemorySection]
    floors: Optional[FloorsSection]  # the C floors, with --floors DIR
    aio: Optional[AioReport]  # the asyncio round trip (_bench_aio), unless --no-aio or --case
    pools: Optional[dict[str, Any]]  # multiprocessing's pools and queues (_bench_pools)
    threads: Optional[ThreadsReport]  # 1 thread beside 8 (threads.py), unless --no-threads
    duration_s: float


# ==== figures as text =============================================================================

def format_value(value: float, unit: str) -> str:
    """A figure as the tables print it."""
    if unit == "msg/s":
        return f"{value:,.0f}"
    if unit == "GB/s":
        return f"{value:.2f}"
    return f"{value:.1f}"


def format_size(size: int) -> str:
    """A byte count as "256 MiB" (exact units only)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"
