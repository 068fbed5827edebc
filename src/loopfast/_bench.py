"""The benchmark engine behind ``python -m loopfast bench`` (and the files in benchmarks/).

Vocabulary:

- a *peer* is one way of moving messages between two processes: ``loopfast.Pipe()``,
  ``multiprocessing.Pipe()``, ``multiprocessing.Pipe(duplex=False)``, a plain Python socket loop.
  Each gives an `Endpoint` (send / recv / recv_into) on both ends of a connection;
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
`register_case(Case(...))`. To add a kind: a measuring function in `KINDS`, plus any loop the peer
process needs in `SERVICE_OPS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import multiprocessing
import os
import platform
import socket
import statistics
import struct
import sys
import threading
import time
import traceback
from typing import Callable, NamedTuple

__all__ = [
    "CASES",
    "KINDS",
    "PEERS",
    "SERVICE_OPS",
    "BenchError",
    "Case",
    "Endpoint",
    "Peer",
    "PeerProcess",
    "environment",
    "format_size",
    "format_value",
    "make_payload",
    "measure",
    "measure_memory",
    "memory_unsupported_reason",
    "received_size",
    "receiver",
    "register_case",
    "register_peer",
    "run",
]

SCHEMA = "loopfast-bench/1"
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


class BenchError(RuntimeError):
    """A measurement could not be completed (a peer process failed, hung or exited early)."""


# ==== peers =======================================================================================

class Endpoint(NamedTuple):
    """The three operations a case needs on one end of a connection."""

    send: Callable       # send(buffer): send one message
    recv: Callable       # recv() -> one message: new bytes, or a view of a reused buffer
    recv_into: Callable  # recv_into(buffer) -> the size of the message written at its start


@dataclasses.dataclass(frozen=True)
class Peer:
    """One way of connecting two processes.

    `make_pair()` returns (first, second): the first end stays in this process and must be
    readable; the second goes to the peer process and must be writable (for a one-way peer, data
    flows only from second to first). `endpoint(end, max_size)` builds the Endpoint of one end in
    the process that uses it; `max_size` is the largest message it will receive. `unavailable()`
    returns why the peer cannot run here (a missing module...), or None.
    """

    name: str
    label: str
    make_pair: Callable[[], tuple[object, object]]
    endpoint: Callable[[object, int], Endpoint]
    duplex: bool = True
    unavailable: Callable[[], str | None] = lambda: None


PEERS: dict[str, Peer] = {}


def register_peer(peer):
    """Add (or replace) a peer in the registry; returns it."""
    PEERS[peer.name] = peer
    return peer


def _connection_endpoint(conn, max_size):
    """loopfast Channels and multiprocessing Connections share the API the cases use."""
    return Endpoint(conn.send_bytes, conn.recv_bytes, conn.recv_bytes_into)


def _loopfast_pair():
    import loopfast
    return loopfast.Pipe()


def _mp_pair():
    return multiprocessing.Pipe()


def _mp_simplex_pair():
    return multiprocessing.Pipe(duplex=False)  # (read-only end, write-only end)


def _tcp_socket_pair():
    """Two connected TCP sockets over 127.0.0.1 with TCP_NODELAY, as a plain program would make."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        connecting = socket.create_connection(listening.getsockname(), timeout=10.0)
        listening.settimeout(10.0)
        accepted, _ = listening.accept()
    for sock in (accepted, connecting):
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return accepted, connecting


_LENGTH = struct.Struct("<Q")
# The plain loop sends header and payload in one sendall() up to this size (one syscall, as any
# careful socket program does for small messages), and in two above it (no copy of a big payload).
_SOCKET_JOIN_LIMIT = 16 * KiB


def _socket_endpoint(sock, max_size):
    """The plain Python socket loop the issue compares against: an 8-byte length header,
    ``sendall`` to send, ``recv_into`` a preallocated buffer to receive."""
    sendall = sock.sendall
    sock_recv_into = sock.recv_into
    pack = _LENGTH.pack
    unpack_from = _LENGTH.unpack_from
    header = bytearray(_LENGTH.size)
    header_view = memoryview(header)
    own = bytearray(max(max_size, 1))
    own_view = memoryview(own)

    def read_exact(view, n):
        got = 0
        while got < n:
            k = sock_recv_into(view[got:n], n - got)
            if not k:
                raise EOFError("the peer closed the socket")
            got += k

    def send(payload):
        n = len(payload)
        if n <= _SOCKET_JOIN_LIMIT:
            sendall(pack(n) + payload)
        else:
            sendall(pack(n))
            sendall(payload)

    def recv_into(target):
        read_exact(header_view, _LENGTH.size)
        (n,) = unpack_from(header)
        view = memoryview(target).cast("B")
        if n > len(view):
            raise ValueError(f"a {n}-byte message does not fit in a {len(view)}-byte buffer")
        read_exact(view, n)
        return n

    def recv():
        return own_view[:recv_into(own_view)]

    return Endpoint(send, recv, recv_into)


register_peer(Peer("loopfast", "loopfast.Pipe()", _loopfast_pair, _connection_endpoint))
register_peer(Peer("mp_pipe", "multiprocessing.Pipe()", _mp_pair, _connection_endpoint))
register_peer(Peer("mp_pipe_simplex", "multiprocessing.Pipe(duplex=False)", _mp_simplex_pair,
                   _connection_endpoint, duplex=False))
register_peer(Peer("socket", "plain socket loop (TCP 127.0.0.1)", _tcp_socket_pair,
                   _socket_endpoint))


# ==== processes ===================================================================================

def _context():
    """fork on Linux (cheap, and what the issue measures with); spawn where fork is unsafe."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class _Watchdog:
    """Calls `action` once if not re-armed within the armed time. A sleeping thread: it takes
    the GIL only when it wakes, so it does not disturb what is being timed."""

    def __init__(self, action, seconds):
        self._action = action
        self.seconds = seconds
        self._deadline = None
        self._stopped = threading.Event()
        self._thread = None

    def arm(self, seconds=None):
        self._deadline = time.monotonic() + (self.seconds if seconds is None else seconds)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loopfast-bench-watchdog",
                                            daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stopped.wait(max(0.0, self._deadline - time.monotonic())):
            if time.monotonic() >= self._deadline:
                self._action()
                return

    def cancel(self):
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)


def _child_entry(target, ctrl, args, inherited, limit):
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

    def __init__(self, name, target, args, *, ends=(), inherited=(), limit=COMMAND_LIMIT,
                 cpus=None):
        ctx = _context()
        self.name = name
        self.limit = limit
        self.ctrl, child_ctrl = ctx.Pipe()
        forked = ctx.get_start_method() == "fork"
        inherited = tuple(inherited) + (self.ctrl,) if forked else ()
        self.process = ctx.Process(target=_child_entry, name=f"loopfast-bench {name}",
                                   args=(target, child_ctrl, args, inherited, limit), daemon=True)
        self.process.start()
        child_ctrl.close()
        for end in ends:
            end.close()
        if cpus is not None:
            os.sched_setaffinity(self.process.pid, cpus)
        self._killer = _Watchdog(self.process.kill, limit + KILL_GRACE)
        self._error = None

    def arm(self):
        """(Re)start the countdown after which this process kills the child."""
        self._killer.arm()

    def command(self, op, arg=None):
        self._killer.arm()
        self.ctrl.send((op, arg))

    def expect(self, tag, timeout=None):
        """Wait (bounded) for a `tag` message from the child and return its value."""
        timeout = self.limit if timeout is None else timeout
        try:
            if not self.ctrl.poll(timeout):
                raise BenchError(f"{self.name}: no {tag!r} from the peer process in {timeout:g} s")
            got, value = self.ctrl.recv()
        except (EOFError, OSError):
            raise BenchError(f"{self.name}: {self.failure()}") from None
        if got == "error":
            self._error = value
            raise BenchError(f"{self.name}: the peer process failed:\n{value}")
        if got != tag:
            raise BenchError(f"{self.name}: expected {tag!r} from the peer process, got {got!r}")
        return value

    def failure(self):
        """Why the child stopped answering: its traceback if it sent one, else its exit status."""
        if self._error is None:
            with contextlib.suppress(EOFError, OSError, ValueError):
                if self.ctrl.poll(1.0):
                    got, value = self.ctrl.recv()
                    if got == "error":
                        self._error = value
        if self._error is not None:
            return f"the peer process failed:\n{self._error}"
        self.process.join(2.0)
        code = self.process.exitcode
        if code == WATCHDOG_EXIT:
            return f"the peer process timed out (no progress within {self.limit:g} s)"
        if code is None:
            return "the peer process stopped answering"
        return f"the peer process exited early (exit status {code})"

    def stop(self, clean=True):
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
def _gc_paused():
    """Timed loops run without the cyclic garbage collector (as timeit does)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def make_payload(size):
    """`size` bytes, every page written (so that the memory is really there)."""
    pattern = bytes(range(256))
    return pattern * (size // 256) + pattern[:size % 256]


def received_size(received):
    return received if isinstance(received, int) else len(received)


# ---- the peer process's side: fixed-count loops run on command ---------------------------------

def _op_send(ep, payload, buffer, n):
    send = ep.send
    for _ in range(n):
        send(payload)


def _op_recv(ep, payload, buffer, n):
    recv = ep.recv
    for _ in range(n):
        recv()


def _op_recv_into(ep, payload, buffer, n):
    recv_into = ep.recv_into
    for _ in range(n):
        recv_into(buffer)


def _op_echo(ep, payload, buffer, n):
    send, recv = ep.send, ep.recv
    for _ in range(n):
        send(recv())


def _op_echo_into(ep, payload, buffer, n):
    send, recv_into = ep.send, ep.recv_into
    view = memoryview(buffer)
    for _ in range(n):
        send(view[:recv_into(buffer)])


# Loops a peer process runs on command, each exactly `n` messages: op(endpoint, payload of the
# case's size, a preallocated buffer of that size, n).
SERVICE_OPS = {
    "send": _op_send,
    "recv": _op_recv,
    "recv_into": _op_recv_into,
    "echo": _op_echo,
    "echo_into": _op_echo_into,
}


def _serve(ctrl, dog, peer_name, end, size):
    # Close the end explicitly: one left for interpreter shutdown to finalize is untidy under spawn.
    with contextlib.closing(end):
        _serve_commands(ctrl, dog, PEERS[peer_name].endpoint(end, size), size)


def _serve_commands(ctrl, dog, ep, size):
    payload = make_payload(size)
    buffer = bytearray(size)
    ctrl.send(("ready", os.getpid()))
    while True:
        dog.arm()
        if not ctrl.poll(dog.seconds):
            raise TimeoutError("no command from the benchmark process")
        op, n = ctrl.recv()
        if op == "stop":
            ctrl.send(("bye", None))
            return
        with _gc_paused():
            SERVICE_OPS[op](ep, payload, buffer, n)


class PeerProcess:
    """A connection of `peer` whose far end is served by a new process (context manager).

    ``endpoint`` is this process's end; ``request(op, n)`` starts one of `SERVICE_OPS` in the peer
    process (it returns at once; the caller then does its side of the n messages). Used by the
    bench and by the pytest-benchmark files in benchmarks/.
    """

    def __init__(self, peer, size, *, limit=COMMAND_LIMIT, cpus=None):
        self.peer = PEERS[peer] if isinstance(peer, str) else peer
        self.size = size
        self.limit = limit
        self.cpus = cpus
        self.endpoint = None
        self._child = None
        self._end = None

    def __enter__(self):
        first, second = self.peer.make_pair()
        try:
            self._child = _Child(self.peer.name, _serve, (self.peer.name, second, self.size),
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
        self.endpoint = self.peer.endpoint(first, self.size)
        return self

    def request(self, op, n):
        self._child.command(op, n)

    def failure(self):
        return BenchError(f"{self.peer.name}: {self._child.failure()}")

    def __exit__(self, exc_type, exc, tb):
        self.close(clean=exc_type is None)

    def close(self, clean=True):
        if self._child is None:
            return
        child, self._child = self._child, None
        self.endpoint = None
        self._end.close()
        child.stop(clean=clean)


# ==== cases =======================================================================================

@dataclasses.dataclass(frozen=True)
class Case:
    """One workload. `count` messages (round trips) per measurement, `quick_count` with --quick;
    `warmup` of them go first, untimed. `receive` is how this process takes messages in:
    "recv" (recv_bytes(): a new bytes object each) or "recv_into" (recv_bytes_into() one
    preallocated buffer). `references` are the peers the others are compared with."""

    name: str
    title: str
    kind: str
    size: int
    unit: str
    count: int
    quick_count: int
    peers: tuple[str, ...]
    references: tuple[str, ...] = ("mp_pipe",)
    receive: str = "recv"
    default: bool = True
    note: str = ""

    def counts(self, quick):
        count = self.quick_count if quick else self.count
        return count, max(2, count // 10)


CASES: dict[str, Case] = {}


def register_case(case):
    """Add (or replace) a case in the registry; returns it."""
    if case.kind not in KINDS:
        raise ValueError(f"unknown kind {case.kind!r}")
    CASES[case.name] = case
    return case


def receiver(ep, case):
    """The receive call a case uses on endpoint `ep` (see `Case.receive`)."""
    if case.receive == "recv_into":
        return functools.partial(ep.recv_into, bytearray(case.size))
    return ep.recv


def _check_size(case, received, peer):
    if received_size(received) != case.size:
        raise BenchError(f"{peer.name}: {case.title}: received a {received_size(received)}-byte "
                         f"message, expected {case.size}")


def _round_trips(send, recv, payload, n, clock):
    times = [0] * n
    reply = None
    for i in range(n):
        t0 = clock()
        send(payload)
        reply = recv()
        times[i] = clock() - t0
    return times, reply


def measure_roundtrip(pp, case, count, warmup):
    """`count` round trips, each timed alone; the figure is their median in µs."""
    ep = pp.endpoint
    payload = make_payload(case.size)
    recv = receiver(ep, case)
    pp.request("echo" if case.receive == "recv" else "echo_into", warmup + count)
    clock = time.perf_counter_ns
    with _gc_paused():
        _round_trips(ep.send, recv, payload, warmup, clock)
        times, reply = _round_trips(ep.send, recv, payload, count, clock)
    _check_size(case, reply, pp.peer)
    times.sort()
    return {
        "value": times[len(times) // 2] / 1e3,
        "median_us": times[len(times) // 2] / 1e3,
        "mean_us": sum(times) / len(times) / 1e3,
        "p99_us": times[len(times) * 99 // 100] / 1e3,
        "count": count,
    }


def _drain(recv, n):
    received = None
    for _ in range(n):
        received = recv()
    return received


def measure_stream(pp, case, count, warmup):
    """The peer process sends `count` messages back to back; timed from the command that starts
    them to the last one received here."""
    recv = receiver(pp.endpoint, case)
    pp.request("send", warmup)
    _drain(recv, warmup)
    clock = time.perf_counter
    with _gc_paused():
        t0 = clock()
        pp.request("send", count)
        last = _drain(recv, count)
        elapsed = clock() - t0
    _check_size(case, last, pp.peer)
    rates = {"msg/s": count / elapsed, "GB/s": count * case.size / elapsed / 1e9}
    return {"value": rates[case.unit], "seconds": elapsed, "count": count,
            "msg_per_s": rates["msg/s"], "gb_per_s": rates["GB/s"]}


class Kind(NamedTuple):
    measure: Callable  # measure(peer_process, case, count, warmup) -> {"value": ..., ...}
    lower_is_better: bool
    unit_label: dict[str, str]


KINDS: dict[str, Kind] = {
    "roundtrip": Kind(measure_roundtrip, True, {"µs": "µs per round trip (median)"}),
    "stream": Kind(measure_stream, False, {"msg/s": "messages per second",
                                           "GB/s": "GB/s (10^9 bytes per second)"}),
}

_RT_PEERS = ("loopfast", "mp_pipe", "socket")
_STREAM_PEERS = ("loopfast", "mp_pipe", "mp_pipe_simplex", "socket")
_BULK_REFERENCES = ("mp_pipe", "mp_pipe_simplex", "socket")

register_case(Case("rt64", "64 B round trip", "roundtrip", 64, "µs", 10_000, 3000, _RT_PEERS,
                   note="send_bytes, then recv_bytes of the echo"))
register_case(Case("stream64", "64 B stream", "stream", 64, "msg/s", 300_000, 100_000,
                   _STREAM_PEERS, ("mp_pipe", "socket"),
                   note="one send_bytes / recv_bytes per message"))
register_case(Case("stream1m", "1 MiB stream", "stream", MiB, "GB/s", 800, 300, _STREAM_PEERS,
                   _BULK_REFERENCES, receive="recv_into",
                   note="recv_bytes_into one preallocated buffer, as the socket loop's recv_into"))
register_case(Case("stream16m", "16 MiB stream", "stream", 16 * MiB, "GB/s", 50, 20,
                   _STREAM_PEERS, _BULK_REFERENCES, receive="recv_into",
                   note="recv_bytes_into one preallocated buffer, as the socket loop's recv_into"))
# Not in the default run (select with --case): the same bulk streams through recv_bytes(), which
# allocates a new bytes object per message.
register_case(Case("stream1m_bytes", "1 MiB stream, recv_bytes", "stream", MiB, "GB/s", 800, 300,
                   ("loopfast", "mp_pipe", "mp_pipe_simplex"), ("mp_pipe", "mp_pipe_simplex"),
                   default=False, note="recv_bytes: a new bytes object per message"))
register_case(Case("stream16m_bytes", "16 MiB stream, recv_bytes", "stream", 16 * MiB, "GB/s",
                   50, 20, ("loopfast", "mp_pipe", "mp_pipe_simplex"),
                   ("mp_pipe", "mp_pipe_simplex"), default=False,
                   note="recv_bytes: a new bytes object per message"))


def measure(case, peer, quick=False, *, cpus=None):
    """One measurement of `case` with `peer` (names or objects), in a fresh peer process (pinned
    to `cpus` if given)."""
    case = CASES[case] if isinstance(case, str) else case
    peer = PEERS[peer] if isinstance(peer, str) else peer
    count, warmup = case.counts(quick)
    with PeerProcess(peer, case.size, cpus=cpus) as pp:
        try:
            return KINDS[case.kind].measure(pp, case, count, warmup)
        except (EOFError, OSError) as exc:
            raise pp.failure() from exc


# ==== memory ======================================================================================

MEMORY_SIZE = 256 * MiB
QUICK_MEMORY_SIZE = 64 * MiB
MEMORY_PEERS = ("loopfast", "mp_pipe")
# How the receiving side takes the message in; each transfer also measures the sending side.
MEMORY_RECEIVE_APIS = ("recv", "recv_into")
_API_NAMES = {"send": "send_bytes", "recv": "recv_bytes", "recv_into": "recv_bytes_into"}


def memory_unsupported_reason():
    """None if peak memory can be measured here, else why not."""
    if not sys.platform.startswith("linux"):
        return "peak-memory figures need Linux (/proc/self/clear_refs and VmHWM)"
    try:
        _reset_peak()
        _peak_rss()
    except (OSError, ValueError) as exc:
        return f"cannot reset or read the peak RSS here ({exc})"
    return None


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ValueError("no VmHWM in /proc/self/status")


def _memory_side(ctrl, dog, peer_name, end, role, api, size):
    with contextlib.closing(end):
        _memory_transfer(ctrl, dog, PEERS[peer_name].endpoint(end, size), role, api, size)


def _memory_transfer(ctrl, dog, ep, role, api, size):
    data = make_payload(size) if role == "send" else bytearray(size) if api == "recv_into" else None
    _reset_peak()
    base = _peak_rss()
    ctrl.send(("ready", base))
    if not ctrl.poll(dog.seconds):
        raise TimeoutError("no go from the benchmark process")
    ctrl.recv()
    if role == "send":
        ep.send(data)
        moved = size
    elif api == "recv":
        moved = len(ep.recv())
    else:
        moved = ep.recv_into(data)
    peak = _peak_rss()
    ctrl.send(("result", {"base": base, "peak": peak, "moved": moved}))
    if not ctrl.poll(dog.seconds):
        raise TimeoutError("no stop from the benchmark process")
    ctrl.recv()
    ctrl.send(("bye", None))


def measure_memory(peer, size, receive_api="recv"):
    """Move one `size`-byte message between two new processes, the receiver using
    `receive_api` ("recv" or "recv_into"); return how much each one's peak RSS rose, in bytes:
    {"send": ..., "receive": ...}."""
    peer = PEERS[peer] if isinstance(peer, str) else peer
    first, second = peer.make_pair()
    sides = {}
    try:
        sides["receive"] = _Child(f"{peer.name} receiver", _memory_side,
                                  (peer.name, first, "recv", receive_api, size),
                                  inherited=(second,))
        first.close()
        sides["send"] = _Child(f"{peer.name} sender", _memory_side,
                               (peer.name, second, "send", None, size),
                               inherited=(sides["receive"].ctrl,))
        second.close()
        for side in sides.values():
            side.arm()
        for side in sides.values():
            side.expect("ready")
        for side in sides.values():
            side.command("go")
        results = {name: side.expect("result") for name, side in sides.items()}
    except BaseException:
        first.close()
        second.close()
        for side in sides.values():
            side.stop(clean=False)
        raise
    for side in sides.values():
        side.stop()
    for name, result in results.items():
        if result["moved"] != size:
            raise BenchError(f"{peer.name}: the {name} side moved {result['moved']} bytes, "
                             f"expected {size}")
    return {name: result["peak"] - result["base"] for name, result in results.items()}


def _run_memory(quick, progress):
    reason = memory_unsupported_reason()
    size = QUICK_MEMORY_SIZE if quick else MEMORY_SIZE
    repeats = 1 if quick else 3
    section = {"size": size, "repeats": repeats, "skipped": reason, "rows": []}
    if reason:
        progress(f"memory: skipped ({reason})")
        return section
    samples = {}
    for repeat in range(repeats):
        for peer in MEMORY_PEERS:
            for api in MEMORY_RECEIVE_APIS:
                extra = measure_memory(peer, size, api)
                samples.setdefault((peer, "send"), []).append(extra["send"])
                samples.setdefault((peer, api), []).append(extra["receive"])
        progress(f"memory {repeat + 1}/{repeats}: one {format_size(size)} message, "
                 + ", ".join(f"{PEERS[p].label} {_API_NAMES[a]} +{v[-1] / MiB:.1f} MiB"
                             for (p, a), v in samples.items()))
    for (peer, api), values in samples.items():
        section["rows"].append({
            "peer": peer,
            "label": PEERS[peer].label,
            "side": "send" if api == "send" else "receive",
            "api": _API_NAMES[api],
            "samples": values,
            "worst": max(values),
            "worst_ratio": max(values) / size,
        })
    return section


# ==== a whole run =================================================================================

def environment():
    """Facts about this machine and build, for the report header."""
    import loopfast
    from loopfast import _channel
    cpu_model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "loopfast_version": loopfast.__version__,
        "loopfast_core": os.path.basename(_channel.__file__),
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


def pinning(mode):
    """(CPUs for this process, CPUs for peer processes) under a pin mode: "none" leaves placement
    to the scheduler; "split" puts the two processes on two different CPUs; "same" on one CPU.
    (On loopback the placement decides whether a wake-up costs a few µs or tens of µs.)"""
    if mode == "none":
        return None, None
    if mode not in PIN_MODES:
        raise ValueError(f"unknown pin mode {mode!r} (one of {', '.join(PIN_MODES)})")
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("pinning processes to CPUs needs Linux (sched_setaffinity)")
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "same":
        return {cpus[0]}, {cpus[0]}
    if len(cpus) < 2:
        raise ValueError("pin mode 'split' needs two usable CPUs")
    return {cpus[0]}, {cpus[1]}


@contextlib.contextmanager
def _pinned(cpus):
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _rotated(items, by):
    by %= len(items)
    return items[by:] + items[:by]


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


def run(case_names=None, *, quick=False, rounds=None, memory=True, pin="none",
        progress=_stderr):
    """Run the bench and return its report (a JSON-ready dict; `format_report` prints it)."""
    own_cpus, peer_cpus = pinning(pin)
    if case_names:
        unknown = [name for name in case_names if name not in CASES]
        if unknown:
            raise ValueError(f"unknown case(s): {', '.join(unknown)}")
        cases = [CASES[name] for name in case_names]
    else:
        cases = [case for case in CASES.values() if case.default]
    rounds = rounds or (QUICK_ROUNDS if quick else FULL_ROUNDS)
    started = time.time()
    t0 = time.perf_counter()
    report = {
        "schema": SCHEMA,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "environment": environment(),
        "settings": {"quick": quick, "rounds": rounds, "cases": [c.name for c in cases],
                     "memory": memory, "pin": pin},
        "peers": {name: peer.label for name, peer in PEERS.items()},
        "skipped_peers": {},
        "cases": [],
        "memory": None,
    }
    skipped = report["skipped_peers"]
    for case in cases:
        for name in case.peers:
            reason = PEERS[name].unavailable()
            if reason:
                skipped[name] = reason
    progress(f"loopfast bench: {len(cases)} cases, {rounds} rounds"
             f"{' (quick)' if quick else ''}; medians and ratios at the end")

    runs = {case.name: {name: [] for name in case.peers if name not in skipped} for case in cases}
    with _pinned(own_cpus):
        for r in range(rounds):
            for case in cases:
                peers = _rotated([p for p in case.peers if p not in skipped], r)
                for position, name in enumerate(peers):
                    result = measure(case, name, quick, cpus=peer_cpus)
                    runs[case.name][name].append(dict(result, round=r, position=position))
                progress(f"round {r + 1}/{rounds}  {case.title:<16} " + ", ".join(
                    f"{name} {format_value(runs[case.name][name][-1]['value'], case.unit)}"
                    for name in peers) + f" {case.unit}")

    for case in cases:
        report["cases"].append(_summarize(case, runs[case.name], quick))
    if memory:
        report["memory"] = _run_memory(quick, progress)
    report["duration_s"] = time.perf_counter() - t0
    return report


def _summarize(case, runs, quick):
    count, warmup = case.counts(quick)
    kind = KINDS[case.kind]
    results = {}
    for name, peer_runs in runs.items():
        values = [run["value"] for run in peer_runs]
        results[name] = {
            "label": PEERS[name].label,
            "samples": values,
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "runs": peer_runs,
        }
    ratios = {}
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

def format_value(value, unit):
    """A figure as the tables print it."""
    if unit == "msg/s":
        return f"{value:,.0f}"
    if unit == "GB/s":
        return f"{value:.2f}"
    return f"{value:.1f}"


def format_size(size):
    """A byte count as "256 MiB" (exact units only)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"
