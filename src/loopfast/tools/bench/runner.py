"""The benchmark engine behind ``python -m loopfast bench`` (and the files in benchmarks/).

Vocabulary:

- a *peer* is one way of moving messages between two processes: ``loopfast.Pipe()``,
  ``multiprocessing.Pipe()``, ``multiprocessing.Pipe(duplex=False)``, a plain Python socket loop.
  Each gives an `Endpoint` (send / recv / recv_into for bytes, send_obj / recv_obj for objects)
  on both ends of a connection;
- a *payload* is what a case moves (`PAYLOADS`): bytes, a numpy array, a small dict. A payload
  may be unavailable here (numpy is optional), and then its cases are skipped with a note;
- a *case* is one workload (64 B round trip, 1 MiB stream, ...) of a *kind* (``roundtrip``,
  ``stream``) that says how it is driven and what is timed;
- a *peer process* (`PeerProcess`) serves the far end of one connection: it is started once per
  measurement (fork on Linux, spawn elsewhere) and runs fixed-count loops on command from a control
  pipe, so that only the messages are timed, never process start-up.

A run does `rounds` rounds; in each round every case runs once with each of its peers, in an order
rotated from round to round, so that the slow drifts of a noisy machine hit every peer alike.
Figures are medians over the rounds, and every ratio compares two medians from the same run.

Memory is measured apart (`measure_memory`): a sender and a receiver process each reset their
peak RSS (``/proc/self/clear_refs``), move one large message, and report how far ``VmHWM`` rose.

Every wait is bounded: peer processes run under a watchdog that ends them when a command takes
longer than its limit, and this process kills a peer process that outlives its limit, which ends
any receive of ours with EOF (we never keep a copy of the peer's end of the connection).

To add a peer: `register_peer(Peer(...))`. To add a case of an existing kind:
`register_case(Case(...))` (with `register_payload(Payload(...))` for a new kind of message). To
add a kind: a measuring function in `KINDS`, plus any loop the peer process needs in
`SERVICE_OPS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import shutil
import statistics
import sys
import time
from typing import (
    TYPE_CHECKING,
    Callable,
    Iterator,
    Literal,
    NamedTuple,
    Optional,
    Sequence,
    TypeVar,
    Union,
)

from .children import (
    PAYLOADS,
    SERVICE_OPS,
    SMALL_DICT_SIZE,
    KiB,
    MiB,
    Payload,
    PeerProcess,
    _context,
    _gc_paused,
    _set_affinity,
    make_payload,
    received_size,
    register_payload,
)
from .peers import PEERS, BenchError, Endpoint, Peer, as_buffer, register_peer
from .report import (
    CaseReport,
    Environment,
    PeerResult,
    Ratio,
    Report,
    format_size,
    format_value,
)

if TYPE_CHECKING:
    from .children import Measurement

__all__ = [
    "CASES",
    "KINDS",
    "PAYLOADS",
    "PEERS",
    "SERVICE_OPS",
    "BenchError",
    "Case",
    "Endpoint",
    "Payload",
    "Peer",
    "PeerProcess",
    "Report",
    "drain",
    "echo_op",
    "environment",
    "format_size",
    "format_value",
    "make_payload",
    "measure",
    "received_size",
    "receiver",
    "register_case",
    "register_payload",
    "register_peer",
    "run",
    "send_call",
    "send_op",
]

SCHEMA = "loopfast-bench/1"
# Messages per thread per measurement of the parallel-threads rows (see threads.py).
THREADS_COUNT, THREADS_QUICK_COUNT = 20_000, 5_000
# Round trips per measurement of the asyncio rows (see aio.py).
AIO_COUNT = 2000
AIO_QUICK_COUNT = 500
FULL_ROUNDS = 7
QUICK_ROUNDS = 3

_T = TypeVar("_T")


# ==== cases ======================================================================================

Receive = Literal["recv", "recv_into", "object"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One workload. `count` messages (round trips) per measurement, `quick_count` with --quick;
    `warmup` of them go first, untimed (default: a tenth, at least 2). `receive` is how this
    process takes messages in: "recv" (recv_bytes(): a new bytes object each), "recv_into"
    (recv_bytes_into() one preallocated buffer) or "object" (the peer's recv_obj: recv(), an
    object). `payload` names what moves (`PAYLOADS`); `quick_size` and `quick_title`, if given,
    replace `size` and `title` under --quick. `references` are the peers the others are compared
    with."""

    name: str
    title: str
    kind: str
    size: int
    unit: str
    count: int
    quick_count: int
    peers: tuple[str, ...]
    references: tuple[str, ...] = ("mp_pipe",)
    receive: Receive = "recv"
    default: bool = True
    note: str = ""
    payload: str = "bytes"
    warmup: Optional[int] = None
    quick_size: Optional[int] = None
    quick_title: Optional[str] = None

    def counts(self, quick: bool) -> tuple[int, int]:
        count = self.quick_count if quick else self.count
        return count, max(2, count // 10) if self.warmup is None else self.warmup

    def for_run(self, quick: bool) -> Case:
        """This case as a run measures it: under `quick`, at its quick size and title."""
        if not quick or self.quick_size is None:
            return self
        return dataclasses.replace(
            self, size=self.quick_size, title=self.quick_title or self.title, quick_size=None,
            note=f"{self.note}; --quick moves {format_size(self.quick_size)} (the full run: "
                 f"{format_size(self.size)})")

    def unavailable(self) -> Optional[str]:
        """Why this case cannot run here (its payload needs a missing module), or None."""
        return PAYLOADS[self.payload].unavailable()


CASES: dict[str, Case] = {}


def register_case(case: Case) -> Case:
    """Add (or replace) a case in the registry; returns it."""
    if case.kind not in KINDS:
        raise ValueError(f"unknown kind {case.kind!r}")
    if case.payload not in PAYLOADS:
        raise ValueError(f"unknown payload {case.payload!r}")
    CASES[case.name] = case
    return case


def receiver(ep: Endpoint, case: Case) -> Callable[[], object]:
    """The receive call a case uses on endpoint `ep` (see `Case.receive`)."""
    if case.receive == "recv_into":
        return functools.partial(ep.recv_into, bytearray(case.size))
    if case.receive == "object":
        return ep.recv_obj
    return ep.recv


# The peer process's loops for each way of receiving: (stream: send n, round trip: echo n).
_SEND_OP = {"recv": "send", "recv_into": "send", "object": "send_obj"}
_ECHO_OP = {"recv": "echo", "recv_into": "echo_into", "object": "echo_obj"}


def send_op(case: Case) -> str:
    """The `SERVICE_OPS` loop by which a peer process sends a case's messages to this one."""
    return _SEND_OP[case.receive]


def echo_op(case: Case) -> str:
    """The `SERVICE_OPS` loop by which a peer process echoes a case's messages back."""
    return _ECHO_OP[case.receive]


def send_call(ep: Endpoint, case: Case, payload: object) -> Callable[[], None]:
    """A call that sends `payload` on `ep` as `case` sends it: send_bytes or send (an object)."""
    if case.receive == "object":
        return functools.partial(ep.send_obj, payload)
    return functools.partial(ep.send, as_buffer(payload))


def _check_size(case: Case, received: object, peer: Peer) -> None:
    if received_size(received) != case.size:
        raise BenchError(f"{peer.name}: {case.title}: received a {received_size(received)}-byte "
                         f"message, expected {case.size}")


def _round_trips(send: Callable[[_T], None], recv: Callable[[], object], payload: _T, n: int,
                 clock: Callable[[], int]) -> tuple[list[int], object]:
    times = [0] * n
    reply = None
    for i in range(n):
        t0 = clock()
        send(payload)
        reply = recv()
        times[i] = clock() - t0
    return times, reply


def measure_roundtrip(pp: PeerProcess, case: Case, count: int, warmup: int) -> Measurement:
    """`count` round trips, each timed alone; the figure is their median in µs. CPU: both
    processes' CPU time over the timed round trips (the warm-up ones are a separate command)."""
    ep = pp.endpoint
    payload = PAYLOADS[case.payload].make(case.size)
    recv = receiver(ep, case)
    send: Callable[[object], None] = ep.send_obj if case.receive == "object" else ep.send  # type: ignore[assignment]
    data = payload if case.receive == "object" else as_buffer(payload)
    clock = time.perf_counter_ns
    pp.request(echo_op(case), warmup)
    _round_trips(send, recv, data, warmup, clock)
    pp.done()
    pp.request(echo_op(case), count)
    with _gc_paused():
        cpu = time.process_time()
        times, reply = _round_trips(send, recv, data, count, clock)
        cpu = time.process_time() - cpu
    cpu += pp.done()
    _check_size(case, reply, pp.peer)
    times.sort()
    return {
        "value": times[len(times) // 2] / 1e3,
        "median_us": times[len(times) // 2] / 1e3,
        "mean_us": sum(times) / len(times) / 1e3,
        "p99_us": times[len(times) * 99 // 100] / 1e3,
        "count": count,
        "cpu_s": cpu,
        "cpu_us_per_msg": cpu / count * 1e6,  # per round trip (two messages)
    }


def drain(ep: Endpoint, case: Case, n: int) -> object:
    """Receive `n` of a stream case's messages on `ep` (in batches if the peer has `recv_n`);
    return the last."""
    if ep.recv_n is not None and case.receive == "recv":
        return ep.recv_n(n)
    recv = receiver(ep, case)
    received = None
    for _ in range(n):
        received = recv()
    return received


def measure_stream(pp: PeerProcess, case: Case, count: int, warmup: int) -> Measurement:
    """The peer process sends `count` messages back to back; timed from the command that starts
    them to the last one received here. CPU: both processes' CPU time over the same messages."""
    ep = pp.endpoint
    op = send_op(case)
    pp.request(op, warmup)
    drain(ep, case, warmup)
    pp.done()
    clock = time.perf_counter
    with _gc_paused():
        cpu = time.process_time()
        t0 = clock()
        pp.request(op, count)
        last = drain(ep, case, count)
        elapsed = clock() - t0
        cpu = time.process_time() - cpu
    cpu += pp.done()
    _check_size(case, last, pp.peer)
    rates = {"msg/s": count / elapsed, "GB/s": count * case.size / elapsed / 1e9}
    return {"value": rates[case.unit], "seconds": elapsed, "count": count,
            "msg_per_s": rates["msg/s"], "gb_per_s": rates["GB/s"], "cpu_s": cpu,
            "cpu_us_per_msg": cpu / count * 1e6}


class Kind(NamedTuple):
    measure: Callable[[PeerProcess, Case, int, int], Measurement]
    lower_is_better: bool
    unit_label: dict[str, str]


KINDS: dict[str, Kind] = {
    "roundtrip": Kind(measure_roundtrip, True, {"µs": "µs per round trip (median)"}),
    "stream": Kind(measure_stream, False, {"msg/s": "messages per second",
                                           "GB/s": "GB/s (10^9 bytes per second)"}),
}

# loopfast with the default busy-polling budget, and without busy-polling (spin=0: the issue-2
# targets are judged on that row), beside every other peer.
_RT_PEERS = ("loopfast", "loopfast_spin0", "mp_pipe", "mp_tcp", "socket", "zmq")
_STREAM_PEERS = ("loopfast", "loopfast_spin0", "mp_pipe", "mp_pipe_simplex", "mp_tcp", "socket",
                 "zmq")
# The 64 B stream adds loopfast's two ways of batching (issue 5).
_STREAM64_PEERS = ("loopfast", "loopfast_spin0", "loopfast_many", "loopfast_batch", "mp_pipe",
                   "mp_pipe_simplex", "mp_tcp", "socket", "zmq")
_BULK_REFERENCES = ("mp_pipe", "mp_pipe_simplex", "socket")

register_case(Case("rt64", "64 B round trip", "roundtrip", 64, "µs", 10_000, 1500, _RT_PEERS,
                   note="send_bytes, then recv_bytes of the echo"))
register_case(Case("rt4k", "4 KiB round trip", "roundtrip", 4 * KiB, "µs", 5000, 1000, _RT_PEERS,
                   note="send_bytes, then recv_bytes of the echo"))
register_case(Case("rt1m", "1 MiB round trip", "roundtrip", MiB, "µs", 400, 60, _RT_PEERS,
                   receive="recv_into",
                   note="send_bytes, then recv_bytes_into one preallocated buffer (both sides)"))
register_case(Case("stream64", "64 B stream", "stream", 64, "msg/s", 300_000, 60_000,
                   _STREAM64_PEERS, ("mp_pipe", "mp_pipe_simplex", "socket"),
                   note="one send_bytes / recv_bytes per message; the batched rows: "
                        "send_bytes_many / recv_bytes_many of 1000 messages per call, and "
                        "batch() blocks of 1000 plain send_bytes with plain recv_bytes"))
register_case(Case("stream4k", "4 KiB stream", "stream", 4 * KiB, "msg/s", 100_000, 20_000,
                   _STREAM_PEERS, ("mp_pipe", "mp_pipe_simplex", "socket"),
                   note="one send_bytes / recv_bytes per message"))
register_case(Case("stream1m", "1 MiB stream", "stream", MiB, "GB/s", 800, 150, _STREAM_PEERS,
                   _BULK_REFERENCES, receive="recv_into",
                   note="recv_bytes_into one preallocated buffer, as the socket loop's recv_into"))
register_case(Case("stream16m", "16 MiB stream", "stream", 16 * MiB, "GB/s", 50, 10,
                   _STREAM_PEERS, _BULK_REFERENCES, receive="recv_into",
                   note="recv_bytes_into one preallocated buffer, as the socket loop's recv_into"))
# Objects (issue 4). A big numpy array: pickle protocol 5 with its memory out of band (loopfast)
# or in band (multiprocessing), beside the same bytes through loopfast's send_bytes/recv_bytes.
# Few messages: multiprocessing moves one 256 MiB array in about a second.
NUMPY_OBJECT_SIZE = 256 * MiB
QUICK_NUMPY_OBJECT_SIZE = 32 * MiB
register_case(Case("numpy_object", "256 MiB numpy object", "stream", NUMPY_OBJECT_SIZE, "GB/s",
                   3, 4, ("loopfast", "mp_pipe", "loopfast_bytes"), ("loopfast_bytes", "mp_pipe"),
                   receive="object", payload="float64_array", warmup=1,
                   quick_size=QUICK_NUMPY_OBJECT_SIZE,
                   quick_title="32 MiB numpy object",
                   note="one float64 array per message: send(array) / recv() (a new array), "
                        "beside send_bytes(array.data) / recv_bytes() (new bytes)"))
register_case(Case("small_object_rt", "small object round trip", "roundtrip", SMALL_DICT_SIZE,
                   "µs", 10_000, 1500, ("loopfast", "mp_pipe"), receive="object",
                   payload="small_dict",
                   note="a dict of 10 short fields (str/int/float): send, then recv of the echo"))
# Not in the default run (select with --case): the same bulk streams through recv_bytes(), which
# allocates a new bytes object per message.
register_case(Case("stream1m_bytes", "1 MiB stream, recv_bytes", "stream", MiB, "GB/s", 800, 300,
                   ("loopfast", "mp_pipe", "mp_pipe_simplex"), ("mp_pipe", "mp_pipe_simplex"),
                   default=False, note="recv_bytes: a new bytes object per message"))
register_case(Case("stream16m_bytes", "16 MiB stream, recv_bytes", "stream", 16 * MiB, "GB/s",
                   50, 20, ("loopfast", "mp_pipe", "mp_pipe_simplex"),
                   ("mp_pipe", "mp_pipe_simplex"), default=False,
                   note="recv_bytes: a new bytes object per message"))


def measure(case: Union[Case, str], peer: Union[Peer, str], quick: bool = False, *,
            cpus: Optional[set[int]] = None) -> Measurement:
    """One measurement of `case` with `peer` (names or objects), in a fresh peer process (pinned
    to `cpus` if given)."""
    case = (CASES[case] if isinstance(case, str) else case).for_run(quick)
    peer = PEERS[peer] if isinstance(peer, str) else peer
    count, warmup = case.counts(quick)
    with PeerProcess(peer, case.size, payload=case.payload, cpus=cpus) as pp:
        try:
            return KINDS[case.kind].measure(pp, case, count, warmup)
        except (EOFError, OSError) as exc:
            raise pp.failure() from exc


# ==== a whole run =================================================================================

def environment() -> Environment:
    """Facts about this machine and build, for the report header."""
    import loopfast
    core = sys.modules[loopfast.Channel.__module__].__file__ or loopfast.Channel.__module__
    cpu_model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    usable_cpus = _get_affinity()
    usable = None if usable_cpus is None else len(usable_cpus)
    return {
        "loopfast_version": loopfast.__version__,
        "implementation": loopfast.implementation,
        "spin_us": loopfast.get_default_spin(),
        "loopfast_core": os.path.basename(core),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": cpu_model or platform.processor() or None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "start_method": _context().get_start_method(),
    }


PIN_MODES = ("none", "split", "same")


def _get_affinity() -> Optional[set[int]]:
    """The CPUs this process may run on, or None where the OS cannot say or pin (not Linux)."""
    if sys.platform == "win32" or sys.platform == "darwin" or not hasattr(os, "sched_getaffinity"):
        return None
    return os.sched_getaffinity(0)


def pinning(mode: str) -> tuple[Optional[set[int]], Optional[set[int]]]:
    """(CPUs for this process, CPUs for peer processes) under a pin mode: "none" leaves placement
    to the scheduler; "split" puts the two processes on two different CPUs; "same" on one CPU.
    (On loopback the placement decides whether a wake-up costs a few µs or tens of µs.)"""
    if mode == "none":
        return None, None
    if mode not in PIN_MODES:
        raise ValueError(f"unknown pin mode {mode!r} (one of {', '.join(PIN_MODES)})")
    usable = _get_affinity()
    if usable is None:
        raise ValueError("pinning processes to CPUs needs Linux (sched_setaffinity)")
    cpus = sorted(usable)
    if mode == "same":
        return {cpus[0]}, {cpus[0]}
    if len(cpus) < 2:
        raise ValueError("pin mode 'split' needs two usable CPUs")
    return {cpus[0]}, {cpus[1]}


@contextlib.contextmanager
def _pinned(cpus: Optional[set[int]]) -> Iterator[None]:
    if cpus is None:
        yield
        return
    before = _get_affinity()
    _set_affinity(0, cpus)
    try:
        yield
    finally:
        if before is not None:
            _set_affinity(0, before)


def _rotated(items: list[_T], by: int) -> list[_T]:
    by %= len(items)
    return items[by:] + items[:by]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Progress:
    """Progress on stderr, with the time left. On a terminal: one status line (done, time left,
    round, case, peer) rewritten in place before each measurement, as wide as the terminal.
    Elsewhere (a log): a line per case and round, at most 100 columns."""

    def __init__(self, line: Callable[[str], None], steps: int = 0) -> None:
        self.line = line
        self.live = line is _stderr and sys.stderr.isatty()
        self.columns = shutil.get_terminal_size((100, 24)).columns if self.live else 100
        self.steps = steps  # measurements the run will make (the ETA is theirs)
        self.done = 0
        self.started = time.monotonic()
        self._width = 0

    def step(self) -> None:
        self.done += 1

    def _eta(self) -> str:
        if not self.steps:
            return ""
        if not self.done or self.done >= self.steps:
            return f"{self.done}/{self.steps}"
        left = (time.monotonic() - self.started) / self.done * (self.steps - self.done)
        return f"{self.done}/{self.steps}, {_duration(left)} left"

    def _fit(self, text: str, width: int) -> str:
        return text if len(text) <= width else text[:width - 1] + "…"

    def status(self, message: str) -> None:
        if self.live:
            eta = self._eta()
            text = self._fit(f"[{eta}] {message}" if eta else message, self.columns - 1)
            sys.stderr.write("\r" + text.ljust(self._width))
            sys.stderr.flush()
            self._width = len(text)

    def __call__(self, message: str, *, log_only: bool = False) -> None:
        """A line of progress; `log_only` ones are left out on a terminal (its status line
        says as much)."""
        if self.live and log_only:
            return
        if self.live and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            self._width = 0
        eta = self._eta() if log_only else ""
        self.line(self._fit(f"[{eta}] {message}" if eta else message, self.columns))


def _duration(seconds: float) -> str:
    whole = max(0, round(seconds))
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"


def run(case_names: Optional[Sequence[str]] = None, *, quick: bool = False,
        rounds: Optional[int] = None, memory: bool = True, pin: str = "none",
        floors: Optional[str] = None, aio: bool = True, pools: bool = True,
        threads: bool = True, progress: Callable[[str], None] = _stderr) -> Report:
    """Run the bench and return its report (a JSON-ready dict; `format_report` prints it).
    `floors`: a directory holding the C floor programs (pingpong.c, stream.c), compiled and run
    in every round (see _bench_floors). `aio`: also measure the asyncio round trip (_bench_aio),
    `pools`: multiprocessing's pools and queues, stock and on loopfast (_bench_pools), `threads`:
    one thread's message rate beside eight threads' (threads.py), in a run of all the default
    cases (not with `case_names`)."""
    from . import floors as _bench_floors
    own_cpus, peer_cpus = pinning(pin)
    if case_names:
        unknown = [name for name in case_names if name not in CASES]
        if unknown:
            raise ValueError(f"unknown case(s): {', '.join(unknown)}")
        selected = [CASES[name] for name in case_names]
    else:
        selected = [case for case in CASES.values() if case.default]
    skipped_cases = {}
    for case in selected:
        reason = case.unavailable()
        if reason:
            skipped_cases[case.name] = reason
    cases = [case.for_run(quick) for case in selected if case.name not in skipped_cases]
    rounds = rounds or (QUICK_ROUNDS if quick else FULL_ROUNDS)
    started = time.time()
    t0 = time.perf_counter()
    env = environment()
    report: Report = {
        "schema": SCHEMA,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "environment": env,
        "settings": {"quick": quick, "rounds": rounds, "cases": [c.name for c in cases],
                     "memory": memory, "pin": pin, "floors": floors},
        "peers": {name: peer.label for name, peer in PEERS.items()},
        "skipped_peers": {},
        "skipped_cases": skipped_cases,
        "cases": [],
        "memory": None,
        "floors": None,
        "aio": None,
        "pools": None,
        "threads": None,
        "duration_s": 0.0,
    }
    skipped = report["skipped_peers"]
    for case in cases:
        for name in case.peers:
            reason = PEERS[name].unavailable()
            if reason:
                skipped[name] = reason
    steps = rounds * (sum(len([p for p in case.peers if p not in skipped]) for case in cases)
                      + (1 if floors is not None else 0))
    show = _Progress(progress, steps)
    show(f"loopfast bench: {len(cases)} cases, {rounds} rounds"
         f"{' (quick)' if quick else ''}, {env['implementation']} implementation"
         f"{', C floors' if floors else ''}; medians and ratios at the end")
    for name, reason in skipped_cases.items():
        show(f"skipping case {name}: {reason}")
    for name, reason in skipped.items():
        show(f"skipping peer {name}: {reason}")

    if memory:
        # First, while this process holds little: the memory processes are forked from it, and
        # an allocator that keeps freed memory resident (free-threaded CPython's mimalloc) would
        # hand them the big buffers of the cases, already counted in their RSS, so that their
        # peak RSS did not rise (a 64 MiB receive measured +0.06 MiB after the cases).
        from .memory import run_memory
        report["memory"] = run_memory(quick, show)
    runs: dict[str, dict[str, list[Measurement]]] = {
        case.name: {name: [] for name in case.peers if name not in skipped} for case in cases}
    with contextlib.ExitStack() as stack:
        runner = None
        if floors is not None:
            try:
                runner = stack.enter_context(_bench_floors.FloorRunner(floors, quick))
            except _bench_floors.FloorError as exc:
                raise BenchError(str(exc)) from None
        stack.enter_context(_pinned(own_cpus))
        for r in range(rounds):
            for c, case in enumerate(cases):
                peers = _rotated([p for p in case.peers if p not in skipped], r)
                for position, name in enumerate(peers):
                    show.status(f"round {r + 1}/{rounds}  case {c + 1}/{len(cases)} "
                                f"{case.title}  peer {position + 1}/{len(peers)} "
                                f"{PEERS[name].label}")
                    result = measure(case, name, quick, cpus=peer_cpus)
                    runs[case.name][name].append(dict(result, round=r, position=position))
                    show.step()
                show(f"round {r + 1}/{rounds}  {case.title:<16} " + ", ".join(
                    f"{name} {format_value(runs[case.name][name][-1]['value'], case.unit)}"
                    for name in peers) + f" {case.unit}", log_only=True)
            if runner is not None:
                show.status(f"round {r + 1}/{rounds}  C floors")
                try:
                    got = runner.run_all()
                except _bench_floors.FloorError as exc:
                    raise BenchError(str(exc)) from None
                show.step()
                show(f"round {r + 1}/{rounds}  C floors         " + ", ".join(
                    f"{name} {format_value(value, floor.unit)} {floor.unit}"
                    for (name, value), floor in zip(got.items(), _bench_floors.FLOORS)),
                     log_only=True)

        for case in cases:
            report["cases"].append(_summarize(case, runs[case.name], quick))
        if runner is not None:
            rt64 = next((c for c in report["cases"] if c["name"] == "rt64"), None)
            medians = {} if rt64 is None else {
                name: result["median"] for name, result in rt64["results"].items()
                if name.startswith("loopfast")}
            report["floors"] = _bench_floors.summarize(runner, medians)
    if aio and not case_names:
        from . import aio as _bench_aio
        report["aio"] = _bench_aio.run(rounds=rounds, count=AIO_QUICK_COUNT if quick else
                                       AIO_COUNT, pin=pin, progress=show.status)
    if pools and not case_names:
        from . import pools as _bench_pools
        report["pools"] = _bench_pools.run(rounds=rounds, quick=quick, progress=show.status)
    if threads and not case_names:
        from . import threads as _bench_threads
        report["threads"] = _bench_threads.run(rounds=rounds, count=THREADS_QUICK_COUNT if quick
                                               else THREADS_COUNT, progress=show.status)
    report["duration_s"] = time.perf_counter() - t0
    return report


def _summarize(case: Case, runs: dict[str, list[Measurement]], quick: bool) -> CaseReport:
    count, warmup = case.counts(quick)
    kind = KINDS[case.kind]
    results: dict[str, PeerResult] = {}
    for name, peer_runs in runs.items():
        values = [run["value"] for run in peer_runs]
        results[name] = {
            "label": PEERS[name].label,
            "samples": values,
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "cpu_us_per_msg": statistics.median(run["cpu_us_per_msg"] for run in peer_runs),
            "runs": peer_runs,
        }
    ratios: dict[str, dict[str, Ratio]] = {}
    for name, result in results.items():
        ratios[name] = {}
        for ref in case.references:
            if ref not in results:
                continue
            paired = [a / b for a, b in zip(result["samples"], results[ref]["samples"])]
            ratios[name][ref] = {
                "of_medians": result["median"] / results[ref]["median"],
                "median_of_paired": statistics.median(paired),
                "paired": paired,
            }
    return {
        "name": case.name,
        "title": case.title,
        "kind": case.kind,
        "payload": case.payload,
        "size": case.size,
        "unit": case.unit,
        "unit_description": kind.unit_label.get(case.unit, case.unit),
        "lower_is_better": kind.lower_is_better,
        "receive": case.receive,
        "note": case.note,
        "count": count,
        "warmup": warmup,
        "references": list(case.references),
        "results": results,
        "ratios": ratios,
    }
