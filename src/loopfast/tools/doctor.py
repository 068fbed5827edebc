"""``python -m loopfast doctor``: why loopback "doesn't work" here, and what decides its speed.

Every check returns a `Check`: a status ("ok", "warning" or "error"), a one-line message, a hint
(what to do) and details for scripts. `run()` runs them all and returns the report that
``doctor --json`` prints; `format_text()` turns it into the table the command prints.

Network traffic goes to 127.0.0.1 and ::1 only. The `localhost` check reads /etc/hosts only
(loopfast never resolves a name, so there is no lookup to try).
``--port N`` connects to 127.0.0.1:N and [::1]:N, reads at most the 48-byte loopfast hello and
closes again without sending a byte.

docs/cli/doctor.md describes every check, the JSON and the exit status.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from loopfast import _backend as _implementation
from loopfast import _peer
from loopfast._address import is_loopback, parse_ip
from loopfast._spin import DEFAULT_SPIN_US, get_default_spin, usable_cpus
from loopfast._version import __version__
from loopfast._wire import HELLO, HELLO_FLAG_AUTH, MAGIC, VERSION

__all__ = ["Check", "check_localhost", "check_loopback", "check_peer_identity", "check_port",
           "format_text", "machine_facts", "measure_round_trips", "run"]

OK, WARNING, ERROR = "ok", "warning", "error"
STATUSES = (OK, WARNING, ERROR)
DEFAULT_TIMEOUT = 2.0
MESSAGE_SIZE = 64
ROUND_TRIPS = 2000
# Each measurement stops after ROUND_TRIPS round trips or this many seconds, whichever comes first.
MEASURE_BUDGET_S = 0.6
# Below these, the checks warn (see docs/cli/doctor.md).
MIN_TCP_BUFFER_MAX = 1024 * 1024
MIN_EPHEMERAL_PORTS = 1024

_IPV6_UNAVAILABLE = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)
_TIMEOUTS = (socket.timeout, TimeoutError)  # one class from 3.10 on, two on 3.9


@dataclass
class Check:
    """One finding: `name` is stable (scripts key on it), `title` what a person reads."""

    name: str
    title: str
    status: str
    message: str
    hint: str = ""
    details: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "title": self.title, "status": self.status,
                "message": self.message, "hint": self.hint, "details": self.details}


def _family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{name}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


# ---- 127.0.0.1 and ::1 ---------------------------------------------------------------------------

def _socket_probe(family: int, host: str, timeout: float, steps: List[str]) -> None:
    """Plain sockets on `host`: bind, listen, connect, accept. Appends each step that worked to
    `steps`; raises the OSError of the first one that did not."""
    with socket.socket(family, socket.SOCK_STREAM) as server:
        steps.append("socket")
        server.bind((host, 0))
        steps.append("bind")
        server.listen(1)
        steps.append("listen")
        with socket.socket(family, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(server.getsockname())
            steps.append("connect")
            server.settimeout(timeout)
            accepted, _ = server.accept()
            accepted.close()
            steps.append("accept")


def _ipv6_unavailable_check(reason: str, details: Dict[str, Any]) -> Check:
    return Check(
        "ipv6", "::1", WARNING, f"IPv6 loopback is not available: {reason}",
        "loopfast works over 127.0.0.1 (the default); only family='AF_INET6' and ('::1', port) "
        "fail here. IPv6 is often disabled in containers; to turn it on: "
        "sysctl -w net.ipv6.conf.lo.disable_ipv6=0 (docker: --sysctl "
        "net.ipv6.conf.all.disable_ipv6=0)",
        {**details, "available": False})


def check_loopback(host: str, timeout: float = DEFAULT_TIMEOUT) -> Check:
    """Can we bind, listen, connect, handshake (with an authkey) and round-trip a 64 B message
    over loopfast on `host` ("127.0.0.1" or "::1")?"""
    family = _family_of(host)
    name = "ipv6" if family == socket.AF_INET6 else "ipv4"
    steps: List[str] = []
    details: Dict[str, Any] = {"host": host, "steps": steps, "failed_step": None}
    if family == socket.AF_INET6 and not socket.has_ipv6:
        details["failed_step"] = "socket"
        return _ipv6_unavailable_check("this Python was built without IPv6 "
                                       "(socket.has_ipv6 is False)", details)
    try:
        _socket_probe(family, host, timeout, steps)
    except OSError as exc:
        failed = "socket" if not steps else {"socket": "bind", "bind": "listen",
                                             "listen": "connect", "connect": "accept"}[steps[-1]]
        details["failed_step"] = failed
        details["error"] = _error_text(exc)
        if family == socket.AF_INET6 and failed in ("socket", "bind") \
                and exc.errno in _IPV6_UNAVAILABLE:
            return _ipv6_unavailable_check(f"{failed} failed with {_error_text(exc)}", details)
        return Check(name, host, ERROR, f"{failed} on {host} failed: {_error_text(exc)}",
                     _loopback_hint(host, failed, exc), details)
    return _loopfast_round_trip(name, host, timeout, details)


def _loopback_hint(host: str, step: str, exc: OSError) -> str:
    if step in ("socket", "bind", "listen"):
        return (f"the loopback interface may be down or {host} not configured: check "
                f"`ip addr show lo` (bring it up with `ip link set lo up`)")
    if isinstance(exc, _TIMEOUTS):
        return ("a firewall rule drops loopback traffic: look for rules on the lo interface "
                "(`iptables -S`, `ip6tables -S`, `nft list ruleset`) and accept it")
    return ("something refuses connections on loopback: check the firewall rules "
            "(`iptables -S`, `nft list ruleset`) and security modules (SELinux, AppArmor)")


def _loopfast_round_trip(name: str, host: str, timeout: float,
                         details: Dict[str, Any]) -> Check:
    from loopfast.connection import Client, Listener

    steps: List[str] = details["steps"]
    authkey = os.urandom(32)
    message = os.urandom(MESSAGE_SIZE)
    served: Dict[str, BaseException] = {}
    with Listener((host, 0), authkey=authkey, handshake_timeout=timeout) as listener:
        def serve() -> None:
            try:
                with listener.accept() as channel:
                    channel.send_bytes(channel.recv_bytes(timeout=timeout))
            except BaseException as exc:  # reported with the client's view below
                served["error"] = exc

        server = threading.Thread(target=serve, name="loopfast-doctor-echo", daemon=True)
        server.start()
        step = "handshake"
        try:
            with Client(listener.address, authkey=authkey, timeout=timeout) as channel:
                steps.append("handshake")
                step = "round trip"
                channel.send_bytes(message)
                if channel.recv_bytes(timeout=timeout) != message:
                    raise OSError("the echoed message differs from the one sent")
                steps.append("round trip")
        except Exception as exc:
            details["failed_step"] = step
            details["error"] = _error_text(exc)
            if "error" in served:
                details["server_error"] = _error_text(served["error"])
            return Check(name, host, ERROR,
                         f"loopfast {step} on {host} failed: {_error_text(exc)}",
                         "plain sockets work here but the loopfast exchange did not: another "
                         "program may intercept loopback connections (a proxy, a sandbox), or "
                         "this is a loopfast bug: please report it with this output", details)
        finally:
            if server.is_alive() and step == "handshake":
                _unblock_accept(listener.address, timeout)
            server.join(timeout + 1.0)
    return Check(name, host, OK,
                 f"bind, listen, connect, authenticated handshake and a {MESSAGE_SIZE} B round "
                 f"trip on {host} work", "", details)


def _unblock_accept(address: Tuple[str, int], timeout: float) -> None:
    """Connect to our own listener and hang up, so that an accept() left waiting returns."""
    try:
        with socket.create_connection(address, timeout=timeout):
            pass
    except OSError:
        pass


# ---- localhost -----------------------------------------------------------------------------------

def _hosts_entries(path: str) -> List[Tuple[str, str]]:
    """(address, line) for each line of the hosts file that names localhost."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        words = line.split("#", 1)[0].split()
        if len(words) > 1 and any(w.rstrip(".").lower() == "localhost" for w in words[1:]):
            found.append((words[0], line.strip()))
    return found


HOSTS_FILE = "/etc/hosts"


def check_localhost(hosts_file: Optional[str] = None) -> Check:
    """What loopfast makes of `localhost` (127.0.0.1, or ::1 with AF_INET6: never a lookup, so
    never a DNS query), and what the hosts file says other programs get. Reads the file only."""
    hosts_file = hosts_file or HOSTS_FILE
    entries = _hosts_entries(hosts_file)
    addresses: List[Dict[str, Any]] = []
    for address, _ in entries:
        ip = parse_ip(address.split("%")[0])
        addresses.append({"address": address, "loopback": ip is not None and is_loopback(ip)})
    details: Dict[str, Any] = {"uses": {"AF_INET": "127.0.0.1", "AF_INET6": "::1"},
                               "hosts_file": {"path": hosts_file,
                                              "lines": [line for _, line in entries]},
                               "addresses": addresses}
    ours = "loopfast takes 'localhost' as 127.0.0.1 (::1 with family='AF_INET6'), without a lookup"
    outside = [a["address"] for a in addresses if not a["loopback"]]
    if outside:
        return Check("localhost", "localhost", WARNING,
                     f"{hosts_file} maps localhost to {', '.join(outside)} (not loopback); "
                     f"{ours}",
                     "programs that resolve 'localhost' (a multiprocessing peer, a browser) "
                     f"reach {', '.join(outside)}: map localhost to 127.0.0.1 and ::1 only. "
                     "Lines: " + " | ".join(line for _, line in entries), details)
    mapping = ", ".join(a["address"] for a in addresses) or f"nothing in {hosts_file}"
    return Check("localhost", "localhost", OK, f"{ours} ({hosts_file}: {mapping})", "", details)


def check_peer_identity(timeout: float = DEFAULT_TIMEOUT, queries: int = 200) -> Check:
    """Whether this machine tells loopfast which user is at the other end of a loopback
    connection (the same-user rule of Listener and Client), how, and what one query costs."""
    how = _peer.mechanism()
    refused = ("Listener and Client refuse every peer they cannot identify: pass "
               "allow_users='any' (and an authkey) to accept local peers")
    if how is None:
        return Check("peer-identity", "peer identity", WARNING,
                     f"this platform ({sys.platform}) cannot tell a TCP peer's user to loopfast",
                     refused, {"mechanism": None})
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname(), timeout=timeout):
            accepted, _ = server.accept()
            with accepted:
                try:
                    first = _peer.peer_identity(accepted.fileno(), timeout)
                    started = time.perf_counter()
                    for _ in range(queries):
                        _peer.peer_identity(accepted.fileno(), timeout)
                    cost_us = (time.perf_counter() - started) / queries * 1e6
                except OSError as exc:
                    return Check("peer-identity", "peer identity", ERROR,
                                 f"the {how} query fails here: {_error_text(exc)}",
                                 f"{refused}; on Linux the kernel needs inet_diag "
                                 "(modprobe inet_diag) and a sandbox must allow NETLINK_SOCK_DIAG",
                                 {"mechanism": how, "error": _error_text(exc)})
    me = _peer.local_user()
    details = {"mechanism": how, "query_us": round(cost_us, 1), "uid": me,
               "peer_uid": getattr(first, "uid", None)}
    if not isinstance(first, _peer.PeerIdentity) or first.uid != me:
        return Check("peer-identity", "peer identity", ERROR,
                     f"the {how} query did not name this process's own socket (got {first!r})",
                     f"{refused}; this is unexpected: please report it with this output",
                     details)
    return Check("peer-identity", "peer identity", OK,
                 f"{how}: a peer's user is known at accept and connect ({cost_us:.0f} µs per "
                 f"query); peers of another user than uid {me} are refused unless allow_users= "
                 "allows them", "", details)


# ---- a given port --------------------------------------------------------------------------------

def _probe_port(host: str, port: int, timeout: float) -> Dict[str, Any]:
    """Connect to host:port, read at most the 48-byte hello (never send anything), close."""
    result: Dict[str, Any] = {"host": host, "port": port, "outcome": None,
                              "speaks_loopfast": None}
    family = _family_of(host)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        result.update(outcome="unavailable", error=_error_text(exc))
        return result
    with sock:
        started = time.monotonic()
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError as exc:
            result.update(outcome="refused", error=_error_text(exc))
            return result
        except _TIMEOUTS:
            result.update(outcome="dropped", error=f"no answer within {timeout:g} s")
            return result
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            result.update(outcome="reset", error=_error_text(exc))
            return result
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                outcome = "blocked"
            elif family == socket.AF_INET6 and exc.errno in _IPV6_UNAVAILABLE:
                outcome = "unavailable"
            else:
                outcome = "unreachable"
            result.update(outcome=outcome, error=_error_text(exc))
            return result
        result["outcome"] = "listening"
        result["connect_ms"] = round((time.monotonic() - started) * 1000, 3)
        data = b""
        deadline = time.monotonic() + timeout
        ended = "silent"
        while len(data) < HELLO.size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(HELLO.size - len(data))
            except _TIMEOUTS:
                break
            except (ConnectionResetError, ConnectionAbortedError) as exc:
                result.update(outcome="reset", error=_error_text(exc), received=len(data))
                return result
            if not chunk:
                ended = "closed"
                break
            data += chunk
            if data[:len(MAGIC)] != MAGIC[:len(data)]:
                break  # not a loopfast hello: no need to wait for more
    result["received"] = len(data)
    if len(data) == HELLO.size and data.startswith(MAGIC):
        _, version, flags, _, _ = HELLO.unpack(data)
        result.update(speaks_loopfast=True, protocol_version=version,
                      authkey_required=bool(flags & HELLO_FLAG_AUTH))
    else:
        result["speaks_loopfast"] = False
        result["first_bytes"] = repr(data[:32])
        result["ended"] = ended if data == MAGIC[:len(data)] else "other bytes"
    return result


def _port_check(probe: Dict[str, Any], other: Optional[Dict[str, Any]], timeout: float,
                ephemeral: Optional[Tuple[int, int]]) -> Check:
    host, port = probe["host"], probe["port"]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = f"port {where}"
    outcome = probe["outcome"]
    other_where = None
    if other is not None and other["outcome"] == "listening":
        other_where = f"[{other['host']}]:{port}" if ":" in other["host"] else \
            f"{other['host']}:{port}"
    if outcome == "listening" and probe["speaks_loopfast"]:
        version, auth = probe["protocol_version"], probe["authkey_required"]
        if version != VERSION:
            return Check(name, where, ERROR,
                         f"a loopfast listener speaking protocol version {version} "
                         f"(this loopfast speaks {VERSION})",
                         "use the same loopfast version on both sides", probe)
        return Check(name, where, OK,
                     f"a loopfast listener (protocol {version}, "
                     f"{'authkey required' if auth else 'no authkey'}) answered at once", "",
                     probe)
    if outcome == "listening":
        ended = probe["ended"]
        if ended == "other bytes":
            text = f"listening, but not loopfast: it sent {probe['first_bytes']}"
        elif ended == "closed":
            text = "listening, but it closed the connection without sending a loopfast hello"
        else:
            text = (f"listening, but silent for {timeout:g} s "
                    f"(received {probe['received']} bytes, a loopfast hello has {HELLO.size})")
        return Check(name, where, WARNING, text,
                     "a loopfast Listener sends its 48-byte hello as soon as its accept() runs: "
                     "this is another kind of service, or a loopfast Listener that is not "
                     "calling accept() (busy, or its backlog is full)", probe)
    if outcome == "refused":
        if other_where is not None:
            return Check(name, where, OK,
                         f"connection refused: the service listens on {other_where} only",
                         f"connect to {other_where} (a Listener binds one address)", probe)
        return Check(name, where, ERROR, "connection refused: nothing is listening there",
                     "start the service, or check the port number (a Listener bound to port 0 "
                     "gets a new port on every start: read it from listener.address)"
                     + _ephemeral_note(port, ephemeral), probe)
    if outcome == "dropped":
        return Check(name, where, ERROR,
                     f"dropped: no answer at all within {timeout:g} s",
                     "a firewall rule silently drops these packets (a DROP rule: look at "
                     "`iptables -S`, `ip6tables -S`, `nft list ruleset`); a listener whose "
                     "backlog is full can also stay silent while it is busy", probe)
    if outcome == "reset":
        return Check(name, where, ERROR,
                     "reset: the connection was accepted, then reset (RST) at once",
                     "the service (or a firewall REJECT --reject-with tcp-reset rule, or a "
                     "proxy) closes connections abortively: check its log, its allow-list and "
                     "the firewall rules", probe)
    if outcome == "blocked":
        return Check(name, where, ERROR, f"blocked by this machine: {probe['error']}",
                     "a local firewall rule on outgoing packets (OUTPUT chain) or a security "
                     "module forbids the connection: check `iptables -S OUTPUT`, "
                     "`nft list ruleset`", probe)
    if outcome == "unavailable":
        return Check(name, where, WARNING, f"IPv6 is not available here ({probe['error']})",
                     "only 127.0.0.1 can be used on this machine", probe)
    return Check(name, where, ERROR, f"unreachable: {probe['error']}",
                 "a firewall REJECT rule (ICMP unreachable) or a routing problem on loopback: "
                 "check `iptables -S`, `nft list ruleset` and `ip route show table local`",
                 probe)


def _ephemeral_note(port: int, ephemeral: Optional[Tuple[int, int]]) -> str:
    if ephemeral is not None and ephemeral[0] <= port <= ephemeral[1]:
        return (f"; note: port {port} is inside the ephemeral range {ephemeral[0]}-"
                f"{ephemeral[1]}, where outgoing connections take their ports: a service that "
                f"binds a fixed port there can find it taken")
    return ""


def check_port(port: int, timeout: float = DEFAULT_TIMEOUT,
               hosts: Sequence[str] = ("127.0.0.1", "::1")) -> List[Check]:
    """One check per host: refused, dropped (timed out), reset, unreachable, or listening (and
    whether a loopfast hello comes back)."""
    ports = ephemeral_port_range()
    probes = [_probe_port(host, port, timeout) for host in hosts]
    checks = []
    for i, probe in enumerate(probes):
        others = [p for j, p in enumerate(probes) if j != i and p["outcome"] == "listening"]
        checks.append(_port_check(probe, others[0] if others else None, timeout, ports))
    return checks


# ---- machine facts -------------------------------------------------------------------------------

def _read_ints(path: str) -> Optional[List[int]]:
    try:
        with open(path, encoding="ascii") as f:
            return [int(word) for word in f.read().split()]
    except (OSError, ValueError):
        return None


def ephemeral_port_range() -> Optional[Tuple[int, int]]:
    values = _read_ints("/proc/sys/net/ipv4/ip_local_port_range")
    return (values[0], values[1]) if values and len(values) == 2 else None


def socket_buffers() -> Dict[str, Any]:
    """The kernel's socket buffer limits (Linux; None where the file is missing)."""
    found: Dict[str, Any] = {}
    for key, path in (("rmem_max", "/proc/sys/net/core/rmem_max"),
                      ("wmem_max", "/proc/sys/net/core/wmem_max"),
                      ("tcp_rmem", "/proc/sys/net/ipv4/tcp_rmem"),
                      ("tcp_wmem", "/proc/sys/net/ipv4/tcp_wmem")):
        values = _read_ints(path)
        found[key] = None if values is None else values[0] if len(values) == 1 else values
    return found


def machine_facts() -> Dict[str, Any]:
    spin_env = os.environ.get("LOOPFAST_SPIN_US", "").strip()
    ports = ephemeral_port_range()
    return {
        "loopfast_version": __version__,
        "implementation": _implementation.implementation,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "spin_us": get_default_spin(),
        "spin_source": "LOOPFAST_SPIN_US" if spin_env else "default",
        "socket_buffers": socket_buffers(),
        "ephemeral_ports": None if ports is None else
        {"low": ports[0], "high": ports[1], "count": ports[1] - ports[0] + 1},
    }


def _cpu_check(facts: Dict[str, Any]) -> Check:
    usable, spin = facts["usable_cpus"], facts["spin_us"]
    source = "set by LOOPFAST_SPIN_US" if facts["spin_source"] != "default" else "the default"
    polling = f"busy-polling {spin:g} µs ({source})" if spin else f"busy-polling off ({source})"
    if facts["implementation"] != "compiled":
        polling += "; the pure-Python implementation never busy-polls"
    text = f"{usable} usable CPU{'s' if usable != 1 else ''} of {facts['cpu_count']}; {polling}"
    details = {"usable_cpus": usable, "cpu_count": facts["cpu_count"], "spin_us": spin,
               "spin_source": facts["spin_source"]}
    if usable < 2:
        return Check("cpus", "CPUs", WARNING, text,
                     "with one CPU the two ends of a channel take turns and every round trip "
                     "waits for a kernel wake-up (busy-polling is off for that reason): give "
                     "the processes two or more CPUs (taskset, cpuset, docker --cpuset-cpus)",
                     details)
    hint = "" if spin else ("busy-polling shortens a round trip about tenfold when both ends "
                            "have a CPU: loopfast.set_default_spin(50) or LOOPFAST_SPIN_US=50")
    return Check("cpus", "CPUs", OK, text, hint, details)


def _implementation_check(facts: Dict[str, Any]) -> Check:
    details = {"implementation": facts["implementation"]}
    if facts["implementation"] == "compiled":
        return Check("implementation", "implementation", OK,
                     "the compiled core (loopfast._core.channel) is in use", "", details)
    if _implementation._pure_requested():
        why = ("LOOPFAST_NO_EXTENSIONS is set"
               if os.environ.get("LOOPFAST_NO_EXTENSIONS", "") not in ("", "0")
               else f"{platform.python_implementation()} is not CPython")
        return Check("implementation", "implementation", OK,
                     f"the pure-Python implementation, by choice ({why})",
                     "unset LOOPFAST_NO_EXTENSIONS for the faster compiled core", details)
    return Check("implementation", "implementation", WARNING,
                 "the pure-Python implementation: the compiled core is missing",
                 "install a loopfast wheel for this platform, or build from source with a C "
                 "compiler (pip install --no-binary loopfast loopfast); it is several times "
                 "faster and busy-polls", details)


def _buffers_check(facts: Dict[str, Any]) -> Check:
    buffers = facts["socket_buffers"]
    details = dict(buffers)
    known = {key: value for key, value in buffers.items() if value is not None}
    if not known:
        return Check("socket-buffers", "socket buffers", OK,
                     "limits not readable on this platform (no /proc/sys/net)", "", details)
    parts = []
    for key in ("tcp_rmem", "tcp_wmem", "rmem_max", "wmem_max"):
        value = buffers.get(key)
        if isinstance(value, list):
            parts.append(f"{key} {' '.join(_size(v) for v in value)}")
        elif value is not None:
            parts.append(f"{key} {_size(value)}")
    text = ", ".join(parts)
    small = [key for key in ("tcp_rmem", "tcp_wmem")
             if isinstance(buffers.get(key), list) and len(buffers[key]) == 3
             and buffers[key][2] < MIN_TCP_BUFFER_MAX]
    if small:
        return Check("socket-buffers", "socket buffers", WARNING,
                     f"{text}: the largest automatic TCP buffer ({', '.join(small)}) is below "
                     f"{_size(MIN_TCP_BUFFER_MAX)}",
                     "large messages then move in small pieces (more system calls, lower GB/s): "
                     "raise the third value, e.g. sysctl -w net.ipv4.tcp_rmem='4096 131072 "
                     "6291456' net.ipv4.tcp_wmem='4096 16384 4194304'", details)
    return Check("socket-buffers", "socket buffers", OK, text,
                 "loopfast leaves buffer sizes to the kernel's autotuning (tcp_rmem/tcp_wmem); "
                 "rmem_max/wmem_max only cap sizes a program sets itself", details)


def _size(value: int) -> str:
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if value >= scale and value % (scale // 4) == 0:
            return f"{value / scale:g} {unit}"
    return f"{value} B"


def _ports_check(facts: Dict[str, Any]) -> Check:
    ports = facts["ephemeral_ports"]
    if ports is None:
        return Check("ephemeral-ports", "ephemeral ports", OK,
                     "range not readable on this platform", "", {})
    text = f"{ports['low']}-{ports['high']} ({ports['count']} ports)"
    if ports["count"] < MIN_EPHEMERAL_PORTS:
        return Check("ephemeral-ports", "ephemeral ports", WARNING,
                     f"{text}: a small range",
                     "every Pipe() and Client takes an ephemeral port, which stays in TIME_WAIT "
                     "for a minute after close: many short-lived channels can run out; widen it "
                     "(sysctl -w net.ipv4.ip_local_port_range='32768 60999')", dict(ports))
    return Check("ephemeral-ports", "ephemeral ports", OK, text, "", dict(ports))


# ---- round trip ----------------------------------------------------------------------------------

def _echo(channels: Sequence[Any], timeout: float, cpu: Optional[int]) -> None:
    """The child process: echo every message on each channel in turn until it is closed."""
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:  # the parent's pin may fail too; the figures then say so
            pass
    for channel in channels:
        with channel:
            try:
                while True:
                    channel.send_bytes(channel.recv_bytes(timeout=timeout))
            except (EOFError, OSError):
                pass


def _two_cpus() -> Optional[Tuple[int, int]]:
    """Two CPUs this process may use, to put the two ends of the measurement on (Linux)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    return (cpus[-2], cpus[-1]) if len(cpus) >= 2 else None


def measure_round_trips(spins: Sequence[float], *, size: int = MESSAGE_SIZE,
                        count: int = ROUND_TRIPS, budget_s: float = MEASURE_BUDGET_S,
                        timeout: float = 10.0, pin: bool = True) -> List[Dict[str, Any]]:
    """Median round trip of a `size`-byte message to an echoing child process over a loopfast
    Pipe, once per busy-polling budget in `spins` (microseconds, both ends).

    With `pin` and two usable CPUs, this thread and the child run on two different CPUs (the
    case busy-polling is for; on one CPU a blocking round trip is about as fast as a spinning
    one, and the scheduler's choice varies from run to run). This thread's affinity is restored.
    """
    from loopfast.connection import Pipe

    cpus = _two_cpus() if pin else None
    pairs = [Pipe(spin=spin) for spin in spins]
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_echo, args=([b for _, b in pairs], timeout,
                                                cpus[1] if cpus else None),
                            daemon=True, name="loopfast-doctor-echo")
    try:
        child.start()
    finally:
        for _, theirs in pairs:
            theirs.close()
    results = []
    message = os.urandom(size)
    placement = "two CPUs (pinned)" if cpus else "the scheduler's choice"
    saved = os.sched_getaffinity(0) if cpus else None
    try:
        if saved is not None and cpus is not None:
            try:
                os.sched_setaffinity(0, {cpus[0]})
            except OSError:
                saved, placement = None, "the scheduler's choice"
        for spin, (ours, _) in zip(spins, pairs):
            samples: List[int] = []
            with ours:
                for _ in range(50):  # warm-up: caches, the child's first pass through the loop
                    ours.send_bytes(message)
                    ours.recv_bytes(timeout=timeout)
                end = time.perf_counter() + budget_s
                while len(samples) < count and time.perf_counter() < end:
                    start = time.perf_counter_ns()
                    ours.send_bytes(message)
                    ours.recv_bytes(timeout=timeout)
                    samples.append(time.perf_counter_ns() - start)
            results.append({"spin_us": spin, "message_size": size, "round_trips": len(samples),
                            "median_us": round(statistics.median(samples) / 1000, 2),
                            "min_us": round(min(samples) / 1000, 2),
                            "placement": placement})
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)
        for ours, _ in pairs:
            ours.close()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join(timeout)
    return results


def _round_trip_check(facts: Dict[str, Any]) -> Check:
    if facts["implementation"] != "compiled":  # the twin never busy-polls: one figure
        blocking, = measure_round_trips([0.0])
        facts["round_trip"] = {"blocking": blocking, "spinning": None}
        return Check("round-trip", "round trip", OK,
                     f"{MESSAGE_SIZE} B to a child process and back: "
                     f"{blocking['median_us']:.1f} µs (median of {blocking['round_trips']}, "
                     f"{blocking['placement']}; the pure-Python implementation never "
                     "busy-polls)", "", dict(facts["round_trip"]))
    spin = facts["spin_us"] or DEFAULT_SPIN_US
    blocking, spinning = measure_round_trips([0.0, spin])
    facts["round_trip"] = {"blocking": blocking, "spinning": spinning}
    text = (f"{MESSAGE_SIZE} B to a child process and back: {blocking['median_us']:.1f} µs "
            f"blocking (spin=0), {spinning['median_us']:.1f} µs busy-polling (spin={spin:g}); "
            f"medians of {blocking['round_trips']} and {spinning['round_trips']}, "
            f"{blocking['placement']}")
    hint = "" if facts["spin_us"] else (
        "busy-polling is off in this process: channels get the first figure "
        "(loopfast.set_default_spin() or spin= turns it on)")
    return Check("round-trip", "round trip", OK, text, hint, dict(facts["round_trip"]))


# ---- everything ----------------------------------------------------------------------------------

def _guarded(name: str, title: str, fn: Callable[[], Any]) -> Any:
    """Run a check; an unexpected exception becomes an error finding, not a traceback."""
    try:
        return fn()
    except Exception as exc:
        return Check(name, title, ERROR, f"the check itself failed: {_error_text(exc)}",
                     "this is a bug in loopfast doctor: please report it with this output",
                     {"error": _error_text(exc)})


def run(port: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT,
        measure: bool = True) -> Dict[str, Any]:
    """Run every check; the report ``doctor --json`` prints (docs/cli/doctor.md)."""
    started = time.monotonic()
    facts = machine_facts()
    checks: List[Check] = [
        _guarded("implementation", "implementation", lambda: _implementation_check(facts)),
        _guarded("cpus", "CPUs", lambda: _cpu_check(facts)),
        _guarded("ipv4", "127.0.0.1", lambda: check_loopback("127.0.0.1", timeout)),
        _guarded("ipv6", "::1", lambda: check_loopback("::1", timeout)),
        _guarded("localhost", "localhost", check_localhost),
        _guarded("peer-identity", "peer identity", lambda: check_peer_identity(timeout)),
    ]
    if port is not None:
        found = _guarded(f"port {port}", f"port {port}", lambda: check_port(port, timeout))
        checks.extend(found if isinstance(found, list) else [found])
    checks.append(_guarded("socket-buffers", "socket buffers", lambda: _buffers_check(facts)))
    checks.append(_guarded("ephemeral-ports", "ephemeral ports", lambda: _ports_check(facts)))
    if measure:
        if next(c for c in checks if c.name == "ipv4").status == OK:
            checks.append(_guarded("round-trip", "round trip", lambda: _round_trip_check(facts)))
        else:
            checks.append(Check("round-trip", "round trip", ERROR,
                                "not measured: 127.0.0.1 does not work", "fix 127.0.0.1 first"))
    counts = {status: sum(c.status == status for c in checks) for status in STATUSES}
    status = ERROR if counts[ERROR] else WARNING if counts[WARNING] else OK
    return {"loopfast_version": __version__, "status": status, "counts": counts,
            "timeout_s": timeout, "port": port, "machine": facts,
            "checks": [c.as_dict() for c in checks],
            "duration_s": round(time.monotonic() - started, 3)}


def exit_status(report: Dict[str, Any], strict: bool = False) -> int:
    """0: healthy (warnings allowed unless `strict`); 1: an error (or, with `strict`, a
    warning)."""
    if report["status"] == ERROR or (strict and report["status"] == WARNING):
        return 1
    return 0


def format_text(report: Dict[str, Any]) -> str:
    """The report as the list `python -m loopfast doctor` prints."""
    facts = report["machine"]
    lines = [f"loopfast {report['loopfast_version']} doctor: {facts['implementation']} "
             f"implementation, {facts['python']}, {facts['platform']}", ""]
    width = max(len(check["title"]) for check in report["checks"])
    for check in report["checks"]:
        lines.append(f"{check['status'].upper():<8} {check['title']:<{width}}  "
                     f"{check['message']}")
        if check["hint"] and check["status"] != OK:
            indent = " " * (width + 11)
            lines += textwrap.wrap(f"hint: {check['hint']}", width=max(100, width + 51),
                                   initial_indent=indent, subsequent_indent=indent + "      ",
                                   break_on_hyphens=False, break_long_words=False)
    counts = report["counts"]
    verdict = {OK: "healthy", WARNING: "healthy, with warnings", ERROR: "NOT healthy"}
    lines += ["", f"{verdict[report['status']]}: {counts[OK]} ok, {counts[WARNING]} "
                  f"warning{'s' if counts[WARNING] != 1 else ''}, {counts[ERROR]} "
                  f"error{'s' if counts[ERROR] != 1 else ''} ({report['duration_s']:.1f} s)"]
    return "\n".join(lines)
