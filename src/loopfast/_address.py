"""Where an address is checked: loopfast binds and connects to loopback addresses only.

A service bound to 127.0.0.0/8 or ::1 is reachable only from this machine; 0.0.0.0, ``::`` or any
other address would expose it to the network. No name is ever resolved, so no DNS query can leave
the machine: ``localhost`` (and ``localhost.``) means 127.0.0.1, or ::1 with family 'AF_INET6'
(RFC 6761: the loopback address, whatever /etc/hosts or a resolver would say), and any other host
name is refused.
"""

import ipaddress
import os
import socket
from typing import Any, Optional, Sequence, Tuple, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
SockAddr = Union[Tuple[str, int], Tuple[str, int, int, int]]

__all__ = ["check_peer", "family_from_name", "is_loopback", "listening_socket", "parse_ip",
           "resolve"]

_FAMILIES = {"AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6}

_REFUSED = (
    "loopfast only binds and connects to loopback addresses (127.0.0.0/8, ::1 or 'localhost'), "
    "so that the channel is reachable from this machine only; got {what}"
)


def family_from_name(family: Union[str, int, None]) -> Optional[int]:
    """Map 'AF_INET' / 'AF_INET6' (multiprocessing's spelling) or None to a socket constant."""
    if family is None:
        return None
    if isinstance(family, int) and family in (socket.AF_INET, socket.AF_INET6):
        return family
    try:
        return _FAMILIES[family]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(
            f"unsupported family {family!r}: loopfast speaks TCP over loopback, "
            "use 'AF_INET' (127.0.0.1) or 'AF_INET6' (::1)"
        ) from None


def is_loopback(ip: IPAddress) -> bool:
    if ip.is_loopback:
        return True
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped is not None and mapped.is_loopback


def parse_ip(host: str) -> Optional[IPAddress]:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve(address: Any, family: Union[str, int, None] = None) -> Tuple[int, SockAddr]:
    """Check a (host, port) address and return (socket family, sockaddr) to bind or connect.

    Raises ValueError for anything that is not a loopback address, before any socket exists and
    without any name lookup.
    """
    fam = family_from_name(family)
    if isinstance(address, (str, bytes)):
        raise ValueError(
            f"unsupported address {address!r}: loopfast speaks TCP over loopback, "
            "give a (host, port) tuple such as ('127.0.0.1', 0)"
        )
    try:
        host, port = address[0], address[1]
    except (TypeError, IndexError, KeyError):
        raise ValueError(f"address must be a (host, port) tuple, got {address!r}") from None
    if isinstance(host, bytes):
        host = host.decode("ascii")
    if not isinstance(host, str):
        raise ValueError(f"address host must be a string, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"address port must be an int in 0..65535, got {port!r}")

    if host.lower() in ("localhost", "localhost."):
        if fam == socket.AF_INET6:
            return socket.AF_INET6, ("::1", port, 0, 0)
        return socket.AF_INET, ("127.0.0.1", port)
    if "%" in host:
        raise ValueError(
            f"address {host!r} has a scope (zone) id: the loopback address ::1 needs none, "
            "give '::1'")
    ip = parse_ip(host)
    if ip is None:
        raise ValueError(_REFUSED.format(what=f"the host name {host!r}, which is not resolved"))
    if not is_loopback(ip):
        raise ValueError(_REFUSED.format(what=repr(host)))
    ip_family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    if fam is not None and fam != ip_family:
        raise ValueError(f"address {host!r} does not match family {family!r}")
    if ip_family == socket.AF_INET6:
        return ip_family, (str(ip), port, 0, 0)
    return ip_family, (str(ip), port)


def check_peer(sockaddr: Sequence[Any]) -> None:
    """Defense in depth: refuse an accepted connection whose peer is not a loopback address."""
    ip = parse_ip(str(sockaddr[0]).split("%")[0])
    if ip is None or not is_loopback(ip):
        raise ValueError(_REFUSED.format(what=f"a connection from {sockaddr[0]!r}"))


def listening_socket(address: Optional[Sequence[Any]], family: Union[str, int, None],
                     backlog: int) -> socket.socket:
    """A nonblocking TCP socket listening on the loopback `address` (None: port 0 on 127.0.0.1,
    or on ::1 for family 'AF_INET6'), for the sync and the asyncio Listener alike."""
    fam = family_from_name(family)
    if address is None:
        address = ("::1", 0) if fam == socket.AF_INET6 else ("127.0.0.1", 0)
    fam, sockaddr = resolve(address, family)
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        if os.name == "posix":
            # As multiprocessing does: a restarted service can rebind its port at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)  # accept() waits in a selector or an event loop
    except BaseException:
        sock.close()
        raise
    return sock
