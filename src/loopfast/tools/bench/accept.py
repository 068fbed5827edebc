"""The accept path under load: what identifying a peer costs, and how a Listener fares under a
flood of silent connections (``python -m loopfast.tools.bench.accept``). Loopback only.

Figures: one peer-identity query (sock_diag) against reading /proc/net/tcp for the same answer;
a good client's connect-and-echo time with no load and with N silent connections pending (p50,
p99; target: <= 50 ms p99 with 2,000); a server limited to 128 descriptors flooded with 300
silent connections: good clients served, and the server's CPU while it is out of descriptors.
The server runs in a process of its own (``--serve``).
"""

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from loopfast import Channel
from loopfast.connection import Client, Listener


def _report(served: int, errors: Dict[str, int], started: float) -> bytes:
    return json.dumps({"served": served, "errors": errors,
                       "cpu": time.process_time() - started}).encode()


def _serve_sync(timeout: float) -> None:
    listener = Listener(backlog=4096, handshake_timeout=timeout)
    print(listener.address[1], flush=True)
    served, started = 0, time.process_time()
    errors: Dict[str, int] = {}
    while True:
        try:
            channel = listener.accept()
        except Exception as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        with channel:
            try:
                message = channel.recv_bytes(timeout=30)
            except Exception:
                continue
            if message in (b"report", b"stop"):
                channel.send_bytes(_report(served, errors, started))
                if message == b"stop":
                    return
                continue
            channel.send_bytes(message)
            served += 1


async def _serve_aio(timeout: float) -> None:
    from loopfast import aio
    listener = await aio.start_listener(backlog=4096, handshake_timeout=timeout)
    print(listener.address[1], flush=True)
    served, started = 0, time.process_time()
    errors: Dict[str, int] = {}
    while True:
        try:
            channel = await listener.accept()
        except Exception as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        async with channel:
            try:
                message = await asyncio.wait_for(channel.recv_bytes(), 30)
            except Exception:
                continue
            if message in (b"report", b"stop"):
                await channel.send_bytes(_report(served, errors, started))
                if message == b"stop":
                    return
                continue
            await channel.send_bytes(message)
            served += 1


def serve(nofile: int, timeout: float, mode: str = "sync") -> None:
    """A Listener (``mode`` "sync" or "aio") echoing clients in this process, limited to
    `nofile` descriptors (0: all allowed); prints its port, then serves. b"report" gets a JSON
    report (clients served, accept()'s exceptions by type, CPU seconds used); b"stop" the same,
    and the server ends. The bench's server, and the load tests'
    (tests/api/test_listener_load.py)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # A given limit (the exhaustion probe), else all the descriptors allowed (a flood of 2,000).
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile or hard, hard))
    if mode == "aio":
        asyncio.run(_serve_aio(timeout))
    else:
        _serve_sync(timeout)


class _Server:
    def __init__(self, nofile: int = 0, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loopfast.tools.bench.accept", "--serve", str(nofile),
             str(timeout)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.address = ("127.0.0.1", int(self.process.stdout.readline()))

    def echo(self, timeout: float = 30.0) -> float:
        start = time.perf_counter()
        with Client(self.address, timeout=timeout) as client:
            client.send_bytes(b"ping")
            client.recv_bytes(timeout=timeout)
        return time.perf_counter() - start

    def state(self) -> Dict[str, Any]:
        with Client(self.address, timeout=60) as client:
            client.send_bytes(b"report")
            result: Dict[str, Any] = json.loads(client.recv_bytes(timeout=60))
            return result

    def close(self) -> None:
        try:
            with Client(self.address, timeout=5) as client:
                client.send_bytes(b"stop")
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _proc_net_tcp_uid(sock: socket.socket) -> Optional[int]:
    host, port = sock.getpeername()[:2]
    want = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f:
            fields = line.split()
            if fields[1] == want:
                return int(fields[7])
    return None


def identity_costs(count: int = 2000) -> Dict[str, float]:
    """µs per query: sock_diag (what loopfast uses) and a /proc/net/tcp scan."""
    from loopfast import _peer
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()):
        accepted, _ = server.accept()
        with accepted:
            result: Dict[str, float] = {}
            if _peer.mechanism() is not None:
                times = []
                for _ in range(count):
                    t = time.perf_counter()
                    _peer.peer_identity(accepted.fileno())
                    times.append(time.perf_counter() - t)
                result["sock_diag_us"] = statistics.median(times) * 1e6
            if os.path.exists("/proc/net/tcp"):
                times = []
                for _ in range(max(1, count // 10)):
                    t = time.perf_counter()
                    _proc_net_tcp_uid(accepted)
                    times.append(time.perf_counter() - t)
                result["proc_net_tcp_us"] = statistics.median(times) * 1e6
    return result


def flood(silent: int, clients: int = 200) -> Dict[str, Any]:
    """A good client's connect-and-echo time with `silent` connections pending."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this side holds them all
    server = _Server()
    held: List[socket.socket] = []
    try:
        server.echo()
        before = server.state()["cpu"]
        for _ in range(silent):
            held.append(socket.create_connection(server.address, timeout=30))
        times = [server.echo() for _ in range(clients)]
        cpu = server.state()["cpu"] - before
    finally:
        for sock in held:
            sock.close()
        server.close()
    return {"silent": silent, "p50_ms": _percentile(times, 0.5) * 1e3,
            "p99_ms": _percentile(times, 0.99) * 1e3, "max_ms": max(times) * 1e3,
            "server_cpu_s": cpu}


def exhaustion(nofile: int = 128, silent: int = 300, good: int = 17,
               timeout: float = 10.0) -> Dict[str, Any]:
    """The descriptor-exhaustion probe: a server limited to `nofile` descriptors, `silent`
    connections, then `good` clients one after another (each may wait up to 2 handshake
    timeouts); then the flood leaves and `good` more clients come."""
    server = _Server(nofile, timeout)
    held: List[socket.socket] = []
    served_during = 0
    try:
        for _ in range(silent):
            held.append(socket.create_connection(server.address, timeout=30))
        start = time.perf_counter()
        waits = []
        for _ in range(good):
            try:
                waits.append(server.echo(timeout=2 * timeout))
                served_during += 1
            except Exception:
                pass
        during = time.perf_counter() - start
        for sock in held:
            sock.close()
        held = []
        after = []
        for _ in range(good):
            try:
                after.append(server.echo(timeout=2 * timeout))
            except Exception:
                pass
        state = server.state()
    finally:
        for sock in held:
            sock.close()
        server.close()
    return {"nofile": nofile, "silent": silent, "good": good,
            "served_during_flood": served_during, "seconds_during_flood": during,
            "worst_wait_s": max(waits) if waits else None,
            "served_after_flood": len(after),
            "server_cpu_s": state["cpu"], "accept_errors": state["errors"]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loopfast.tools.bench.accept",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("NOFILE", "TIMEOUT"),
                        help="run the echo server (NOFILE descriptors, 0: all) and exit")
    parser.add_argument("--aio", action="store_true", help="with --serve: loopfast.aio's Listener")
    parser.add_argument("--silent", type=int, nargs="*", default=[0, 500, 1000, 2000])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), float(args.serve[1]), "aio" if args.aio else "sync")
        return 0
    report: Dict[str, Any] = {"identity": identity_costs(),
              "flood": [flood(n) for n in args.silent],
              "exhaustion": exhaustion(),
              "implementation": Channel.__module__}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ident = report["identity"]
    print("peer identity, µs per query: " + ", ".join(f"{k[:-3]} {v:.1f}"
                                                    for k, v in ident.items()))
    print("good client connect + echo with N silent connections pending:")
    for row in report["flood"]:
        print(f"  N={row['silent']:5d}  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms"
              f"  max {row['max_ms']:6.2f} ms  server CPU {row['server_cpu_s']:.2f} s")
    ex = report["exhaustion"]
    print(f"server limited to {ex['nofile']} descriptors, {ex['silent']} silent connections: "
          f"{ex['served_during_flood']} of {ex['good']} good clients served in "
          f"{ex['seconds_during_flood']:.1f} s (worst wait {ex['worst_wait_s'] or 0:.2f} s), "
          f"{ex['served_after_flood']} of {ex['good']} after the flood left; server CPU "
          f"{ex['server_cpu_s']:.2f} s; accept() raised {ex['accept_errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
