"""Where the user at the other end of a loopback connection is found (the platform seam).

A Unix socket tells its peer's uid (SO_PEERCRED); TCP does not. On loopback both ends of a
connection live in this machine's kernel, which knows who owns each socket: Linux answers a
``NETLINK_SOCK_DIAG`` query for the exact 4-tuple (what ``ss -e`` uses) with the owner's uid and
the socket's inode. Measured here (python -m loopfast._bench_accept), one query takes ~13 µs
from Python; scanning /proc/net/tcp for the same answer took 1.0-1.8 ms, a cost that grows
with every TCP socket of the machine, so the query is what loopfast uses.

Other platforms: macOS (libproc) and Windows (GetExtendedTcpTable, then the owning process's
token) are not implemented yet; there ``peer_identity`` returns None ("cannot tell") and the
same-user check fails closed unless the application allowed any peer (README, "Security").
"""

import atexit
import errno
import os
import socket
import struct
import sys
import threading
import time
from typing import Any, FrozenSet, Iterable, NamedTuple, Optional, Sequence, Union

from ._errors import AuthenticationError, ProtocolError

__all__ = ["HALF_OPEN", "AllowUsers", "PeerIdentity", "allowed_users", "check_peer_user",
           "local_user", "mechanism", "peer_identity", "peer_pid"]

AllowUsers = Union[str, Iterable[int], None]


class PeerIdentity(NamedTuple):
    uid: int
    inode: int  # the peer socket's inode (Linux), for peer_pid()


# ---- Linux: NETLINK_SOCK_DIAG -------------------------------------------------------------------

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_DIAG_REQUEST = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_NO_COOKIE = struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)
# inet_diag_msg after the netlink header: family, state, timer, retrans, id (48 bytes),
# expires, rqueue, wqueue, uid, inode.
_DIAG_MESSAGE = struct.Struct("=BBBB48xIIIII")
# TCP states of a full socket (one that has an owner): ESTABLISHED, FIN_WAIT1, FIN_WAIT2,
# CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING. SYN_RECV (3) and NEW_SYN_RECV (12) are half-open
# connections the kernel reports with uid 0, TIME_WAIT (6) one already closed: neither says who.
_FULL_STATES = frozenset({1, 4, 5, 7, 8, 9, 11})
_HALF_OPEN_STATES = frozenset({3, 12})


class _HalfOpen(Exception):
    """The peer's socket is still a half-open connection: ask again in a moment."""


def _packed_address(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host).ljust(16, b"\0")


def _ipv4_if_mapped(host: str) -> Optional[str]:
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return None


_netlink_lock = threading.Lock()
_netlink: Optional[socket.socket] = None
_netlink_pid = 0
_sequence = 0


def _query(request: bytes) -> bytes:
    """Send one sock_diag request and return its answer. The netlink socket is opened once per
    process and kept: a query needs no new descriptor, so it works when the process has run out
    of them (a flood of connections), and costs two system calls."""
    global _netlink, _netlink_pid, _sequence
    with _netlink_lock:
        if _netlink is None or _netlink_pid != os.getpid():  # first use, or a forked child
            if _netlink is not None:
                _netlink.close()  # the parent's, inherited: this process's copy only
            _netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
            _netlink.settimeout(5.0)  # the kernel answers at once; never wait for ever
            _netlink_pid = os.getpid()
        _sequence = (_sequence + 1) & 0xFFFFFFFF
        header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY,
                                    _NLM_F_REQUEST, _sequence, 0)
        _netlink.sendto(header + request, (0, 0))
        while True:
            reply = _netlink.recv(8192)
            if _NLMSG_HEADER.unpack_from(reply)[3] == _sequence:
                return reply  # (an answer to an earlier, interrupted query is skipped)


def _after_fork_in_child() -> None:
    # A fork while another thread held the lock would leave it held for ever in the child.
    global _netlink_lock
    _netlink_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_netlink() -> None:
    global _netlink
    if _netlink is not None and _netlink_pid == os.getpid():
        _netlink.close()
        _netlink = None


def _sock_diag(family: int, src: Sequence[Any], dst: Sequence[Any]) -> Optional[PeerIdentity]:
    """Owner of the TCP socket whose local address is `src` and remote address `dst`; None if
    the kernel has no such socket (closed)."""
    request = (_DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
               + struct.pack("!HH", src[1], dst[1])
               + _packed_address(family, src[0]) + _packed_address(family, dst[0])
               + struct.pack("=I", 0) + _NO_COOKIE)
    reply = _query(request)
    _, kind, _, _, _ = _NLMSG_HEADER.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, _NLMSG_HEADER.size)
        if code in (-errno.ENOENT, -errno.ESRCH):
            return None
        raise OSError(-code, f"sock_diag query failed: {os.strerror(-code)}")
    _, state, _, _, _, _, _, uid, inode = _DIAG_MESSAGE.unpack_from(reply, _NLMSG_HEADER.size)
    if state in _HALF_OPEN_STATES:
        raise _HalfOpen
    if state not in _FULL_STATES:
        return None
    return PeerIdentity(uid, inode)


def _linux_peer(sock: socket.socket) -> Optional[PeerIdentity]:
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return None  # the peer has gone (reset)
        raise
    family = sock.family
    mapped = _ipv4_if_mapped(remote[0]), _ipv4_if_mapped(local[0])
    if family == socket.AF_INET6 and mapped[0] and mapped[1]:
        family, remote, local = socket.AF_INET, (mapped[0], remote[1]), (mapped[1], local[1])
    # The peer's socket has our remote address as its local one, and ours as its remote.
    return _sock_diag(family, remote, local)


def _linux_pid_of_inode(inode: int) -> Optional[int]:
    target = f"socket:[{inode}]"
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                if os.readlink(f"/proc/{name}/fd/{fd}") == target:
                    return int(name)
        except OSError:
            continue  # gone, or another user's process
    return None


# ---- the seam -----------------------------------------------------------------------------------

def mechanism() -> Optional[str]:
    """How this platform tells the peer's user: 'sock_diag' (Linux), or None (cannot tell)."""
    if sys.platform.startswith("linux") and hasattr(socket, "AF_NETLINK"):
        return "sock_diag"
    return None


_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

HALF_OPEN = "half-open"  # peer_identity(): the peer's end is not complete yet (ask again later)


def peer_identity(fd: int, timeout: float = 0.1) -> Union[PeerIdentity, str, None]:
    """Who owns the socket at the other end of the connected TCP socket `fd`: None when the
    platform cannot tell or the peer's socket is gone. A peer end still half-open (our connect()
    has returned, the listener's kernel not yet processed the last ACK) is asked again, up to
    `timeout` seconds, then HALF_OPEN is returned. loopfast asks at accept() (a client's end is
    always complete) and right after connect(), or else once the listener has sent bytes."""
    if mechanism() != "sock_diag":
        return None
    sock = socket.socket(fileno=fd)
    try:
        delay, end = 1e-5, time.monotonic() + timeout
        while True:
            try:
                return _linux_peer(sock)
            except _HalfOpen:
                if time.monotonic() >= end:
                    return HALF_OPEN
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
    finally:
        sock.detach()


def peer_pid(fd: int) -> Optional[int]:
    """The pid of a process that holds the peer's socket, where this process may see it (the
    same user, or root); None otherwise. Scans /proc: milliseconds, for applications only."""
    try:
        identity = peer_identity(fd)
    except OSError:
        return None
    if not isinstance(identity, PeerIdentity):
        return None
    return _linux_pid_of_inode(identity.inode)


def _user_name(uid: int) -> str:
    try:
        import pwd
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_peer_user(fd: int, allowed: Optional[FrozenSet[int]],
                    timeout: float = 0.1) -> Union[int, str, None]:
    """The uid of the peer of `fd`, checked against `allowed` (None: any peer). Raises
    AuthenticationError, naming both users, for a peer of another user, and when the platform
    cannot tell who the peer is (fail closed) unless any peer is allowed. With timeout=0, a peer
    end still half-open gives HALF_OPEN (the caller asks again later)."""
    try:
        identity = peer_identity(fd, timeout)
    except OSError as exc:
        if allowed is None:
            return None
        if exc.errno in _OUT_OF_RESOURCES:
            raise  # no descriptor or memory for the query: the caller's error, as for socket()
        raise AuthenticationError(
            f"cannot tell which user the peer is ({exc}): refused. Pass allow_users='any' to "
            f"accept any local peer") from None
    if identity == HALF_OPEN:
        if timeout == 0:
            return HALF_OPEN
        raise ProtocolError(
            f"the peer's end of the connection was still not established after {timeout} s: "
            f"its user cannot be checked")
    if not isinstance(identity, PeerIdentity):
        if allowed is None:
            return None
        if mechanism() is None:
            raise AuthenticationError(
                f"cannot tell which user the peer is on this platform ({sys.platform}): "
                f"refused, as loopfast accepts peers of the same user only by default. Pass "
                f"allow_users='any' to accept any local peer (python -m loopfast doctor)")
        raise ProtocolError(
            "the peer closed the connection during the handshake (before its user could be "
            "checked)")
    if allowed is not None and identity.uid not in allowed:
        others = sorted(allowed - {local_user()})
        extra = f" or {', '.join(map(_user_name, others))}" if others else ""
        raise AuthenticationError(
            f"the peer is {_user_name(identity.uid)}, this process runs as "
            f"{_user_name(local_user())}: loopfast accepts peers of the same user{extra} only "
            f"(allow_users= on Listener and Client allows others)")
    return identity.uid


def local_user() -> int:
    """The uid this process acts as (the owner of the sockets it creates)."""
    return os.geteuid() if hasattr(os, "geteuid") else 0


def allowed_users(allow_users: AllowUsers) -> Optional[FrozenSet[int]]:
    """The uids a peer may have (this process's own always included), or None for any peer."""
    if allow_users is None:
        return frozenset({local_user()})
    if isinstance(allow_users, str):
        if allow_users != "any":
            raise ValueError(f"allow_users must be 'any', None or a collection of uids, "
                             f"got {allow_users!r}")
        return None
    try:
        uids = frozenset(allow_users)
    except TypeError:
        raise TypeError(f"allow_users must be 'any', None or a collection of uids, "
                        f"got {allow_users!r}") from None
    for uid in uids:
        if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
            raise ValueError(f"allow_users: {uid!r} is not a uid (an int >= 0)")
    return uids | {local_user()}

