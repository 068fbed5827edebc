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
import gc
import multiprocessing
import os
import pickle
import platform
import statistics
import sys
import threading
import time
import traceback
from typing import (
    TYPE_CHECKING,
    Callable,
    Iterator,
    Literal,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    TypedDict,
    TypeVar,
    Union,
)

from .peers import PEERS, BenchError, Endpoint, Peer, as_buffer, register_peer

if TYPE_CHECKING:
    # Connection, or PipeConnection on Windows
    from multiprocessing.connection import _ConnectionBase
    from multiprocessing.context import SpawnContext
    from types import TracebackType

    from typing_extensions import TypeAlias

    from .aio import AioReport
    from .floors import FloorsSection
    from .peers import End

    if sys.platform == "win32":
        _Context: TypeAlias = SpawnContext
    else:
        from multiprocessing.context import ForkContext
        _Context: TypeAlias = Union[ForkContext, SpawnContext]
    # The control pipe between this process and a peer process: (tag, value) both ways.
    Ctrl: TypeAlias = "_ConnectionBase[tuple[str, object], tuple[str, object]]"
    # One measurement: "value" (the figure) and whatever else the kind records (counts, times).
    Measurement: TypeAlias = dict[str, float]

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
# Round trips per measurement of the asyncio rows (see _bench_aio).
AIO_COUNT = 2000
AIO_QUICK_COUNT = 500
FULL_ROUNDS = 7
QUICK_ROUNDS = 3
# A peer process gives up (and this process kills it) when one command takes longer than this.
COMMAND_LIMIT = 60.0
# Extra time this process grants a peer process beyond its own watchdog before killing it.
KILL_GRACE = 10.0
# Exit status of a peer process ended by its watchdog.
WATCHDOG_EXIT = 86

KiB = 1024
MiB = 1024 * KiB

_T = TypeVar("_T")


class _Closable(Protocol):
    def close(self) -> None: ...


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
    pools: Optional[dict[str, object]]  # multiprocessing's pools and queues (_bench_pools)
    duration_s: float



# ==== payloads ====================================================================================

@dataclasses.dataclass(frozen=True)
class Payload:
    """What a case moves. `make(size)` builds it with every page written (so that its memory is
    really there); `unavailable()` says why it cannot be built here (a missing module), or None.
    A case's size is the payload's size in bytes (for an object with no buffer: its pickle's)."""

    name: str
    description: str
    make: Callable[[int], object]
    unavailable: Callable[[], Optional[str]] = lambda: None


PAYLOADS: dict[str, Payload] = {}


def register_payload(payload: Payload) -> Payload:
    """Add (or replace) a payload in the registry; returns it."""
    PAYLOADS[payload.name] = payload
    return payload


def make_payload(size: int) -> bytes:
    """`size` bytes, every page written (so that the memory is really there)."""
    pattern = bytes(range(256))
    return pattern * (size // 256) + pattern[:size % 256]


def _numpy_missing() -> Optional[str]:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return "numpy is not installed (it is optional: pip install numpy, or '.[test]')"
    return None


def _float64_array(size: int) -> object:
    """One C-contiguous float64 array of `size` bytes, every page written."""
    import numpy as np
    if size % 8:
        raise ValueError(f"a float64 array cannot be {size} bytes long")
    return np.arange(size // 8, dtype=np.float64)


def _small_dict(size: int) -> dict[str, Union[str, int, float]]:
    """A dict of 10 short fields (str, int, float values), the same every time; `size` is ignored
    (the case's size is this dict's pickle)."""
    return {"id": 1234567, "name": "sensor-17", "kind": "temperature", "unit": "celsius",
            "value": 21.375, "low": -40.0, "high": 85.0, "seq": 98765, "ok": 1, "site": "lab-3"}


register_payload(Payload("bytes", "bytes", make_payload))
register_payload(Payload("float64_array", "float64 array", _float64_array, _numpy_missing))
register_payload(Payload("small_dict", "dict of 10 short fields", _small_dict))
SMALL_DICT_SIZE = len(pickle.dumps(_small_dict(0), protocol=5))


def received_size(received: object) -> int:
    """The size in bytes of what a receive returned: a count, bytes, a view, a numpy array (its
    ``nbytes``, without importing numpy), or any other object (its pickle at protocol 5)."""
    if isinstance(received, int):
        return received
    if isinstance(received, (bytes, bytearray)):
        return len(received)
    if isinstance(received, memoryview):
        return received.nbytes
    nbytes = getattr(received, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return len(pickle.dumps(received, protocol=5))


# ==== processes ===================================================================================

def _context() -> _Context:
    """fork on Linux (cheap, and what the issue measures with); spawn where fork is unsafe."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class _Watchdog:
    """Calls `action` once if not re-armed within the armed time. A sleeping thread: it takes
    the GIL only when it wakes, so it does not disturb what is being timed."""

    def __init__(self, action: Callable[[], object], seconds: float) -> None:
        self._action = action
        self.seconds = seconds
        self._deadline = 0.0
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def arm(self, seconds: Optional[float] = None) -> None:
        self._deadline = time.monotonic() + (self.seconds if seconds is None else seconds)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loopfast-bench-watchdog",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(max(0.0, self._deadline - time.monotonic())):
            if time.monotonic() >= self._deadline:
                self._action()
                return

    def cancel(self) -> None:
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)


def _child_entry(target: Callable[..., None], ctrl: Ctrl, args: tuple[object, ...],
                 inherited: tuple[_Closable, ...], limit: float) -> None:
    # Under fork this process inherited this side's copies of the other ends: close them, so that
    # either process ending shows up as EOF on the other side.
    for obj in inherited:
        obj.close()
    dog = _Watchdog(lambda: os._exit(WATCHDOG_EXIT), limit)
    dog.arm()
    try:
        target(ctrl, dog, *args)
    except BaseException:
        with contextlib.suppress(Exception):
            ctrl.send(("error", traceback.format_exc()))
        raise
    finally:
        dog.cancel()


class _Child:
    """A helper process running `target(ctrl, watchdog, *args)`, talking over a control pipe.

    `ends` are connection ends handed to the child; this process closes its copies of them after
    the start, and under fork the child closes the copies of `inherited` objects it got.
    """

    def __init__(self, name: str, target: Callable[..., None], args: tuple[object, ...], *,
                 ends: Sequence[_Closable] = (), inherited: Sequence[_Closable] = (),
                 limit: float = COMMAND_LIMIT, cpus: Optional[set[int]] = None) -> None:
        ctx = _context()
        self.name = name
        self.limit = limit
        self.ctrl: Ctrl
        self.ctrl, child_ctrl = ctx.Pipe()
        forked = ctx.get_start_method() == "fork"
        closed_in_child = (*inherited, self.ctrl) if forked else ()
        self.process = ctx.Process(target=_child_entry, name=f"loopfast-bench {name}",
                                   args=(target, child_ctrl, args, closed_in_child, limit),
                                   daemon=True)
        self.process.start()
        child_ctrl.close()
        for end in ends:
            end.close()
        if cpus is not None:
            _set_affinity(self.process.pid or 0, cpus)
        self._killer = _Watchdog(self.process.kill, limit + KILL_GRACE)
        self._error: Optional[str] = None

    def arm(self) -> None:
        """(Re)start the countdown after which this process kills the child."""
        self._killer.arm()

    def command(self, op: str, arg: object = None) -> None:
        self._killer.arm()
        self.ctrl.send((op, arg))

    def expect(self, tag: str, timeout: Optional[float] = None) -> object:
        """Wait (bounded) for a `tag` message from the child and return its value."""
        timeout = self.limit if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self.ctrl.poll(max(0.0, deadline - time.monotonic())):
                    raise BenchError(
                        f"{self.name}: no {tag!r} from the peer process in {timeout:g} s")
                got, value = self.ctrl.recv()
            except (EOFError, OSError):
                raise BenchError(f"{self.name}: {self.failure()}") from None
            if got != "done" or tag == "done":
                break  # a "done" nobody waited for (benchmarks/ does not) is skipped
        if got == "error":
            self._error = str(value)
            raise BenchError(f"{self.name}: the peer process failed:\n{value}")
        if got != tag:
            raise BenchError(f"{self.name}: expected {tag!r} from the peer process, got {got!r}")
        return value

    def failure(self) -> str:
        """Why the child stopped answering: its traceback if it sent one, else its exit status."""
        if self._error is None:
            with contextlib.suppress(EOFError, OSError, ValueError):
                if self.ctrl.poll(1.0):
                    got, value = self.ctrl.recv()
                    if got == "error":
                        self._error = str(value)
        if self._error is not None:
            return f"the peer process failed:\n{self._error}"
        self.process.join(2.0)
        code = self.process.exitcode
        if code == WATCHDOG_EXIT:
            return f"the peer process timed out (no progress within {self.limit:g} s)"
        if code is None:
            return "the peer process stopped answering"
        return f"the peer process exited early (exit status {code})"

    def stop(self, clean: bool = True) -> None:
        """Tell the child to exit and wait for it (bounded); with `clean`, check that it did."""
        problem = None
        try:
            if self.process.is_alive():
                self.ctrl.send(("stop", None))
                self.expect("bye", 10.0)
        except (BenchError, OSError) as exc:
            problem = str(exc)
        self.process.join(10.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
            problem = problem or "the peer process did not exit and was killed"
        self._killer.cancel()
        self.ctrl.close()
        if clean and problem is None and self.process.exitcode != 0:
            problem = f"the peer process exited with status {self.process.exitcode}"
        if clean and problem:
            raise BenchError(f"{self.name}: {problem}")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Timed loops run without the cyclic garbage collector (as timeit does)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ---- the peer process's side: fixed-count loops run on command ---------------------------------

def _op_send(ep: Endpoint, payload: object, buffer: bytearray, n: int) -> None:
    send, data = ep.send, as_buffer(payload)
    if ep.send_n is not None:
        ep.send_n(data, n)
        return
    for _ in range(n):
        send(data)


def _op_recv(ep: Endpoint, payload: object, buffer: bytearray, n: int) -> None:
    recv = ep.recv
    for _ in range(n):
        recv()


def _op_recv_into(ep: Endpoint, payload: object, buffer: bytearray, n: int) -> None:
    recv_into = ep.recv_into
    for _ in range(n):
        recv_into(buffer)


def _op_echo(ep: Endpoint, payload: object, buffer: bytearray, n: int) -> None:
    send, recv = ep.send, ep.recv
    for _ in range(n):
        send(recv())


def _op_echo_into(ep: Endpoint, payload: object, buffer: bytearray, n: int) -> None:
    send, recv_into = ep.send, ep.recv_into
    view = memoryview(buffer)
    for _ in range(n):
        send(view[:recv_into(buffer)])


def _op_send_obj(ep: Endpoint, payload: object, buffer: bytearray, n: int) -> None:
    send_obj = ep.send_obj
    for _ in range(n):
        send_obj(payload)


def _op_echo_obj(ep: Endpoint, payload: object, buffer: bytearray, n: int) -> None:
    send_obj, recv_obj = ep.send_obj, ep.recv_obj
    for _ in range(n):
        send_obj(recv_obj())


# Loops a peer process runs on command, each exactly `n` messages: op(endpoint, the case's
# payload, a preallocated buffer of the payload's size (bytes payloads only), n).
SERVICE_OPS: dict[str, Callable[[Endpoint, object, bytearray, int], None]] = {
    "send": _op_send,
    "recv": _op_recv,
    "recv_into": _op_recv_into,
    "echo": _op_echo,
    "echo_into": _op_echo_into,
    "send_obj": _op_send_obj,
    "echo_obj": _op_echo_obj,
}


def _serve(ctrl: Ctrl, dog: _Watchdog, peer_name: str, end: End, size: int,
           payload_name: str) -> None:
    # Close the end explicitly: one left for interpreter shutdown to finalize is untidy under spawn.
    with contextlib.closing(end):
        _serve_commands(ctrl, dog, PEERS[peer_name].endpoint(end, size), size, payload_name)


def _serve_commands(ctrl: Ctrl, dog: _Watchdog, ep: Endpoint, size: int,
                    payload_name: str) -> None:
    payload = PAYLOADS[payload_name].make(size)
    buffer = bytearray(size if payload_name == "bytes" else 0)
    ctrl.send(("ready", os.getpid()))
    while True:
        dog.arm()
        if not ctrl.poll(dog.seconds):
            raise TimeoutError("no command from the benchmark process")
        op, n = ctrl.recv()
        if op == "stop":
            ctrl.send(("bye", None))
            return
        if not isinstance(n, int):
            raise BenchError(f"bad command from the benchmark process: {op!r} {n!r}")
        cpu = time.process_time()
        with _gc_paused():
            SERVICE_OPS[op](ep, payload, buffer, n)
        # This process's CPU time (user + system, all threads) for the loop: summed with the
        # measuring process's into CPU per message.
        ctrl.send(("done", time.process_time() - cpu))


class PeerProcess:
    """A connection of `peer` whose far end is served by a new process (context manager).

    ``endpoint`` is this process's end; ``request(op, n)`` starts one of `SERVICE_OPS` in the peer
    process (it returns at once; the caller then does its side of the n messages). The peer
    process builds the payload (`payload`, a name in `PAYLOADS`) of `size` bytes once, at its
    start. Used by the bench and by the pytest-benchmark files in benchmarks/.
    """

    def __init__(self, peer: Union[Peer, str], size: int, *, payload: str = "bytes",
                 limit: float = COMMAND_LIMIT, cpus: Optional[set[int]] = None) -> None:
        self.peer = PEERS[peer] if isinstance(peer, str) else peer
        self.size = size
        self.payload = payload
        self.limit = limit
        self.cpus = cpus
        self._endpoint: Optional[Endpoint] = None
        self._child: Optional[_Child] = None
        self._end: Optional[End] = None

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise BenchError(f"{self.peer.name}: the peer process is not running")
        return self._endpoint

    def __enter__(self) -> PeerProcess:
        first, second = self.peer.make_pair()
        try:
            self._child = _Child(self.peer.name, _serve,
                                 (self.peer.name, second, self.size, self.payload),
                                 ends=(second,), inherited=(first,), limit=self.limit,
                                 cpus=self.cpus)
            self._child.arm()
            self._child.expect("ready")
        except BaseException:
            first.close()
            second.close()
            if self._child is not None:
                self._child.stop(clean=False)
            raise
        self._end = first
        self._endpoint = self.peer.endpoint(first, self.size)
        return self

    def _running(self) -> _Child:
        if self._child is None:
            raise BenchError(f"{self.peer.name}: the peer process is not running")
        return self._child

    def request(self, op: str, n: int) -> None:
        """Start `op` for `n` messages in the peer process (returns at once)."""
        self._running().command(op, n)

    def done(self) -> float:
        """Wait (bounded) for the end of the last request's loop; its CPU seconds in the peer
        process."""
        value = self._running().expect("done")
        if not isinstance(value, float):
            raise BenchError(f"{self.peer.name}: unexpected reply {value!r}")
        return value

    def failure(self) -> BenchError:
        return BenchError(f"{self.peer.name}: {self._running().failure()}")

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close(clean=exc_type is None)

    def close(self, clean: bool = True) -> None:
        if self._child is None:
            return
        child, self._child = self._child, None
        self._endpoint = None
        if self._end is not None:
            self._end.close()
        child.stop(clean=clean)


# ==== cases =======================================================================================

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


def _set_affinity(pid: int, cpus: set[int]) -> None:
    if sys.platform == "win32" or sys.platform == "darwin" or not hasattr(os, "sched_setaffinity"):
        raise ValueError("pinning processes to CPUs needs Linux (sched_setaffinity)")
    os.sched_setaffinity(pid, cpus)


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
    """Progress on stderr: a line per case and round; on a terminal, also a status line
    (round, case, peer) rewritten in place before each measurement."""

    def __init__(self, line: Callable[[str], None]) -> None:
        self.line = line
        self.live = line is _stderr and sys.stderr.isatty()
        self._width = 0

    def status(self, message: str) -> None:
        if self.live:
            text = message[:119]
            sys.stderr.write("\r" + text.ljust(self._width))
            sys.stderr.flush()
            self._width = len(text)

    def __call__(self, message: str) -> None:
        if self.live and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.line(message)


def run(case_names: Optional[Sequence[str]] = None, *, quick: bool = False,
        rounds: Optional[int] = None, memory: bool = True, pin: str = "none",
        floors: Optional[str] = None, aio: bool = True, pools: bool = True,
        progress: Callable[[str], None] = _stderr) -> Report:
    """Run the bench and return its report (a JSON-ready dict; `format_report` prints it).
    `floors`: a directory holding the C floor programs (pingpong.c, stream.c), compiled and run
    in every round (see _bench_floors). `aio`: also measure the asyncio round trip (_bench_aio),
    `pools`: multiprocessing's pools and queues, stock and on loopfast (_bench_pools), in a run
    of all the default cases (not with `case_names`)."""
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
        "duration_s": 0.0,
    }
    skipped = report["skipped_peers"]
    for case in cases:
        for name in case.peers:
            reason = PEERS[name].unavailable()
            if reason:
                skipped[name] = reason
    show = _Progress(progress)
    show(f"loopfast bench: {len(cases)} cases, {rounds} rounds"
         f"{' (quick)' if quick else ''}, {env['implementation']} implementation"
         f"{', C floors' if floors else ''}; medians and ratios at the end")
    for name, reason in skipped_cases.items():
        show(f"skipping case {name}: {reason}")
    for name, reason in skipped.items():
        show(f"skipping peer {name}: {reason}")

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
                show(f"round {r + 1}/{rounds}  {case.title:<16} " + ", ".join(
                    f"{name} {format_value(runs[case.name][name][-1]['value'], case.unit)}"
                    for name in peers) + f" {case.unit}")
            if runner is not None:
                show.status(f"round {r + 1}/{rounds}  C floors")
                try:
                    got = runner.run_all()
                except _bench_floors.FloorError as exc:
                    raise BenchError(str(exc)) from None
                show(f"round {r + 1}/{rounds}  C floors         " + ", ".join(
                    f"{name} {format_value(value, floor.unit)} {floor.unit}"
                    for (name, value), floor in zip(got.items(), _bench_floors.FLOORS)))

        for case in cases:
            report["cases"].append(_summarize(case, runs[case.name], quick))
        if runner is not None:
            rt64 = next((c for c in report["cases"] if c["name"] == "rt64"), None)
            medians = {} if rt64 is None else {
                name: result["median"] for name, result in rt64["results"].items()
                if name.startswith("loopfast")}
            report["floors"] = _bench_floors.summarize(runner, medians)
    if memory:
        from .memory import run_memory
        report["memory"] = run_memory(quick, show)
    if aio and not case_names:
        from . import aio as _bench_aio
        report["aio"] = _bench_aio.run(rounds=rounds, count=AIO_QUICK_COUNT if quick else
                                       AIO_COUNT, pin=pin, progress=show.status)
    if pools and not case_names:
        from . import pools as _bench_pools
        report["pools"] = _bench_pools.run(rounds=rounds, quick=quick, progress=show.status)
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
