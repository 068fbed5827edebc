"""The bench's processes: the payloads, the peer process (its side of every measurement: fixed-count
loops run on command over a control pipe) and the watchdog that ends it if this process goes away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import multiprocessing
import os
import pickle
import sys
import threading
import time
import traceback
from typing import (
    TYPE_CHECKING,
    Callable,
    Iterator,
    Optional,
    Protocol,
    Sequence,
    TypeVar,
    Union,
)

from .peers import PEERS, BenchError, Endpoint, Peer, as_buffer

if TYPE_CHECKING:
    # Connection, or PipeConnection on Windows
    from multiprocessing.connection import _ConnectionBase
    from multiprocessing.context import SpawnContext
    from types import TracebackType

    from typing_extensions import TypeAlias

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


def _set_affinity(pid: int, cpus: set[int]) -> None:
    if sys.platform == "win32" or sys.platform == "darwin" or not hasattr(os, "sched_setaffinity"):
        raise ValueError("pinning processes to CPUs needs Linux (sched_setaffinity)")
    os.sched_setaffinity(pid, cpus)


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


class Watchdog:
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
    dog = Watchdog(lambda: os._exit(WATCHDOG_EXIT), limit)
    dog.arm()
    try:
        target(ctrl, dog, *args)
    except BaseException:
        with contextlib.suppress(Exception):
            ctrl.send(("error", traceback.format_exc()))
        raise
    finally:
        dog.cancel()


class Child:
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
        self._killer = Watchdog(self.process.kill, limit + KILL_GRACE)
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


def _serve(ctrl: Ctrl, dog: Watchdog, peer_name: str, end: End, size: int,
           payload_name: str) -> None:
    # Close the end explicitly: one left for interpreter shutdown to finalize is untidy under spawn.
    with contextlib.closing(end):
        _serve_commands(ctrl, dog, PEERS[peer_name].endpoint(end, size), size, payload_name)


def _serve_commands(ctrl: Ctrl, dog: Watchdog, ep: Endpoint, size: int,
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
        self._child: Optional[Child] = None
        self._end: Optional[End] = None

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise BenchError(f"{self.peer.name}: the peer process is not running")
        return self._endpoint

    def __enter__(self) -> PeerProcess:
        first, second = self.peer.make_pair()
        try:
            self._child = Child(self.peer.name, _serve,
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

    def _running(self) -> Child:
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
