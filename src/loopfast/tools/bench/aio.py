"""The asyncio round trip: ``loopfast.aio.AsyncChannel`` beside the sync channel and asyncio
streams.

One echo peer process (fork on Linux, spawn elsewhere) serves every row: on command it echoes n
messages on its loopfast channel (a sync ``Channel`` with ``spin=0``: it sleeps in poll() like
the rows it serves), or accepts one TCP connection on 127.0.0.1 and echoes n messages framed with
a 4-byte length prefix (a plain blocking socket with TCP_NODELAY). The rows, measured in this
process in the same run, interleaved (the order rotated each round):

- ``sync_spin0``: ``Channel.send_bytes`` then ``recv_bytes`` on the parent's end, ``spin=0``;
- ``aio``: ``AsyncChannel.send_bytes`` then ``recv_bytes`` on the same end, default event loop;
- ``aio_uvloop``: the same under uvloop (when installed);
- ``streams``: ``asyncio.open_connection('127.0.0.1', port)``, ``writer.write(prefix + payload)``,
  ``await writer.drain()``, ``await reader.readexactly(4)`` and ``readexactly(n)``;
- ``streams_uvloop``: the same under uvloop.

Each measurement times every round trip alone (``perf_counter_ns``) and keeps the median; a
row's figure is the median of its measurements over the rounds, and the ratios compare those
medians. Run it alone: ``python -m loopfast.tools.bench.aio [--rounds N] [--count N] [--json]``;
``run()`` is what the bench command calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Dict, List, Optional, TypedDict

from loopfast.aio import AsyncChannel
from loopfast.connection import Pipe

if TYPE_CHECKING:
    from loopfast import Channel

__all__ = [
    "PIN_MODES",
    "ROWS",
    "AioReport",
    "EchoPeer",
    "format_report",
    "main",
    "round_trips",
    "run",
    "uvloop_unavailable",
]

PREFIX = struct.Struct("<I")
ROWS = ("sync_spin0", "aio", "aio_uvloop", "streams", "streams_uvloop")
LABELS = {
    "sync_spin0": "loopfast Channel (sync, spin=0)",
    "aio": "loopfast.aio AsyncChannel (asyncio loop)",
    "aio_uvloop": "loopfast.aio AsyncChannel (uvloop)",
    "streams": "asyncio streams, 4-byte prefix (asyncio loop)",
    "streams_uvloop": "asyncio streams, 4-byte prefix (uvloop)",
}
# The longest one command of the peer may take (s); the peer is killed after it.
COMMAND_LIMIT = 120.0


class AioReport(TypedDict):
    size: int
    count: int
    rounds: int
    pin: str
    rows: Dict[str, List[float]]     # per row, each measurement's median round trip (s)
    medians: Dict[str, float]        # per row, the median over the rounds (s)
    ratios: Dict[str, float]         # named ratios of two medians
    skipped: Dict[str, str]          # row -> why it was not measured


def uvloop_unavailable() -> Optional[str]:
    """None if uvloop can be imported, else why not."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "uvloop is not installed (pip install uvloop)"
    return None


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


# ---- the echo peer -------------------------------------------------------------------------------

def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the stream peer closed the connection")
        data += chunk
    return bytes(data)


def _peer_main(channel: Channel) -> None:
    """Serve commands from `channel` until ('stop',) or EOF."""
    channel.spin = 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        listening.settimeout(COMMAND_LIMIT)
        channel.send(("port", listening.getsockname()[1]))
        while True:
            try:
                command, n = channel.recv(timeout=COMMAND_LIMIT * 10)
            except EOFError:
                return
            if command == "stop":
                return
            if command == "echo":
                for _ in range(n):
                    channel.send_bytes(channel.recv_bytes(timeout=COMMAND_LIMIT),
                                       timeout=COMMAND_LIMIT)
            elif command == "stream":
                conn, _ = listening.accept()
                with conn:
                    conn.settimeout(COMMAND_LIMIT)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    for _ in range(n):
                        header = _recv_exact(conn, PREFIX.size)
                        payload = _recv_exact(conn, PREFIX.unpack(header)[0])
                        conn.sendall(header + payload)
                    _recv_exact(conn, 0)


class EchoPeer:
    """The echo peer process (see the module docstring); close() stops it."""

    def __init__(self) -> None:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx: Any = multiprocessing.get_context(method)
        here, there = Pipe(spin=0)
        self.process = ctx.Process(target=_peer_main, args=(there,), daemon=True)
        self.process.start()
        there.close()
        self.channel = here
        tag, port = here.recv(timeout=COMMAND_LIMIT)
        assert tag == "port"
        self.port: int = port

    def command(self, op: str, n: int) -> None:
        self.channel.send((op, n), timeout=COMMAND_LIMIT)

    def close(self) -> None:
        try:
            self.channel.send(("stop", 0), timeout=5)
        except OSError:
            pass
        self.channel.close()
        self.process.join(COMMAND_LIMIT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)


# ---- the rows ------------------------------------------------------------------------------------

def _sync_rt(peer: EchoPeer, payload: bytes, n: int) -> List[int]:
    ch = peer.channel
    times = []
    clock = time.perf_counter_ns
    peer.command("echo", n)
    for _ in range(n):
        t0 = clock()
        ch.send_bytes(payload)
        ch.recv_bytes()
        times.append(clock() - t0)
    return times


async def _aio_rt(peer: EchoPeer, payload: bytes, n: int) -> List[int]:
    channel = AsyncChannel(peer.channel)  # a view for this loop; it is not closed here
    times = []
    clock = time.perf_counter_ns
    peer.command("echo", n)
    for _ in range(n):
        t0 = clock()
        await channel.send_bytes(payload)
        await channel.recv_bytes()
        times.append(clock() - t0)
    return times


async def _streams_rt(peer: EchoPeer, payload: bytes, n: int) -> List[int]:
    peer.command("stream", n)
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
    times = []
    clock = time.perf_counter_ns
    message = PREFIX.pack(len(payload)) + payload
    try:
        for _ in range(n):
            t0 = clock()
            writer.write(message)
            await writer.drain()
            header = await reader.readexactly(PREFIX.size)
            await reader.readexactly(PREFIX.unpack(header)[0])
            times.append(clock() - t0)
    finally:
        writer.close()
        await writer.wait_closed()
    return times


def _on_loop(factory: Callable[[], asyncio.AbstractEventLoop],
             coro: Coroutine[Any, Any, List[int]]) -> List[int]:
    loop = factory()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, COMMAND_LIMIT))
    finally:
        loop.close()


def round_trips(row: str, peer: EchoPeer, payload: bytes, n: int) -> List[int]:
    """n round trips of `payload` the way `row` says (aio rows: on a new event loop); returns
    each one's time in ns."""
    if row == "sync_spin0":
        return _sync_rt(peer, payload, n)
    factory = _uvloop_factory() if row.endswith("uvloop") else asyncio.new_event_loop
    if row.startswith("aio"):
        return _on_loop(factory, _aio_rt(peer, payload, n))
    return _on_loop(factory, _streams_rt(peer, payload, n))


PIN_MODES = ("none", "split", "same")


def _pin(peer: EchoPeer, mode: str) -> Optional[str]:
    """Pin this process and the peer to two different CPUs ("split") or to one ("same"); returns
    why not, if it cannot be done here."""
    if mode == "none":
        return None
    if not hasattr(os, "sched_setaffinity"):
        return "CPU pinning needs os.sched_setaffinity (Linux)"
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "split" and len(cpus) < 2:
        return "--pin split needs two usable CPUs"
    ours = cpus[0]
    theirs = cpus[1] if mode == "split" else cpus[0]
    os.sched_setaffinity(0, {ours})
    assert peer.process.pid is not None
    os.sched_setaffinity(peer.process.pid, {theirs})
    return None


def run(rounds: int = 5, count: int = 2000, size: int = 64, warmup: int = 200,
        progress: Optional[Callable[[str], None]] = None, pin: str = "none") -> AioReport:
    """Measure every row `rounds` times, interleaved; `count` timed round trips of `size` bytes
    per measurement, after `warmup` untimed ones. `pin`: "none", "split" (this process and the
    peer on two different CPUs) or "same" (both on one): on loopback, where the two processes
    run decides what a wake-up costs, so the sync round trip swings between ~6 and ~75 us
    unpinned, while the asyncio layer adds a roughly fixed cost."""
    if pin not in PIN_MODES:
        raise ValueError(f"pin must be one of {PIN_MODES}, got {pin!r}")
    skipped: Dict[str, str] = {}
    reason = uvloop_unavailable()
    rows = list(ROWS)
    if reason:
        for row in ("aio_uvloop", "streams_uvloop"):
            skipped[row] = reason
            rows.remove(row)
    payload = os.urandom(size)
    samples: Dict[str, List[float]] = {row: [] for row in rows}
    peer = EchoPeer()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        why = _pin(peer, pin)
        if why:
            raise ValueError(why)
        peer.channel.spin = 0
        for r in range(rounds):
            order = rows[r % len(rows):] + rows[:r % len(rows)]
            for row in order:
                if progress:
                    progress(f"round {r + 1}/{rounds}: {row}")
                round_trips(row, peer, payload, warmup)
                times = round_trips(row, peer, payload, count)
                samples[row].append(statistics.median(times) / 1e9)
    finally:
        peer.close()
        if affinity is not None and pin != "none":
            os.sched_setaffinity(0, affinity)
    medians = {row: statistics.median(values) for row, values in samples.items()}
    ratios: Dict[str, float] = {}

    def ratio(name: str, top: str, bottom: str) -> None:
        if top in medians and bottom in medians:
            ratios[name] = medians[top] / medians[bottom]

    ratio("aio / sync_spin0", "aio", "sync_spin0")
    ratio("aio_uvloop / sync_spin0", "aio_uvloop", "sync_spin0")
    ratio("aio / streams", "aio", "streams")
    ratio("aio_uvloop / streams_uvloop", "aio_uvloop", "streams_uvloop")
    ratio("aio_uvloop / streams", "aio_uvloop", "streams")
    return {"size": size, "count": count, "rounds": rounds, "pin": pin, "rows": samples,
            "medians": medians, "ratios": ratios, "skipped": skipped}


def format_report(report: AioReport) -> str:
    lines = [f"asyncio round trip, {report['size']} B: median of {report['rounds']} "
             f"measurements × {report['count']} round trips",
             f"(echo peer: another process; pin: {report['pin']})"]
    for row, median in report["medians"].items():
        spread = report["rows"][row]
        lines.append(f"  {LABELS[row]:<48} {median * 1e6:8.1f} µs   "
                     f"(min {min(spread) * 1e6:.1f}, max {max(spread) * 1e6:.1f})")
    for row, why in report["skipped"].items():
        # (wrapped: a reason such as uvloop's would run past 100 columns)
        lines.extend(textwrap.wrap(f"{LABELS[row]:<48} skipped: {why}", 98,
                                   initial_indent="  ", subsequent_indent=" " * 51))
    lines.append("  ratios (targets: aio / sync_spin0 ≤ 1.5, aio / streams < 1):")
    for name, value in report["ratios"].items():
        lines.append(f"    {name:<30} {value:6.2f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loopfast.tools.bench.aio",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--pin", choices=PIN_MODES, default="none",
                        help="split: this process and the peer on two CPUs; same: on one")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = run(args.rounds, args.count, args.size, pin=args.pin,
                     progress=lambda message: print(message, file=sys.stderr))
    except ValueError as exc:
        print(f"loopfast.tools.bench.aio: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
