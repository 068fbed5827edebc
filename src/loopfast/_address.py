"""Where an address is checked: loopfast binds and connects to loopback addresses only.

A service bound to 127.0.0.0/8 or ::1 is reachable only from this machine; 0.0.0.0, ``::`` or any
other address would expose it to the network. ``localhost`` is accepted but resolved and checked,
because /etc/hosts can map it elsewhere. No other host name is resolved (that could send a DNS
query off the machine).
"""

import ipaddress
import socket
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
SockAddr = Union[Tuple[str, int], Tuple[str, int, int, int]]
Resolver = Callable[..., Sequence[Tuple[Any, ...]]]

__all__ = ["check_peer", "family_from_name", "resolve"]

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


def _is_loopback(ip: IPAddress) -> bool:
    if ip.is_loopback:
        return True
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped is not None and mapped.is_loopback


def _parse_ip(host: str) -> Optional[IPAddress]:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve(
    address: Any, family: Union[str, int, None] = None, *, resolver: Optional[Resolver] = None
) -> Tuple[int, SockAddr]:
    """Check a (host, port) address and return (socket family, sockaddr) to bind or connect.

    Raises ValueError for anything that is not loopback. `resolver` defaults to
    socket.getaddrinfo (tests pass their own to map 'localhost' elsewhere).
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

    if host.rstrip(".").lower() == "localhost":
        return _resolve_localhost(host, port, fam, resolver or socket.getaddrinfo)

    ip = _parse_ip(host)
    if ip is None:
        raise ValueError(_REFUSED.format(what=f"the host name {host!r}, which is not resolved"))
    if not _is_loopback(ip):
        raise ValueError(_REFUSED.format(what=repr(host)))
    ip_family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    if fam is not None and fam != ip_family:
        raise ValueError(f"address {host!r} does not match family {family!r}")
    if ip_family == socket.AF_INET6:
        return ip_family, (str(ip), port, 0, 0)
    return ip_family, (str(ip), port)


def _resolve_localhost(
    host: str, port: int, fam: Optional[int], resolver: Resolver
) -> Tuple[int, SockAddr]:
    try:
        infos = resolver(host, port, fam or 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    found: List[Tuple[int, Any, Optional[IPAddress]]] = []
    for info in infos:
        info_family, sockaddr = info[0], info[4]
        if info_family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = _parse_ip(str(sockaddr[0]).split("%")[0])
        found.append((info_family, sockaddr, ip))
    outside = [str(sa[0]) for _, sa, ip in found if ip is None or not _is_loopback(ip)]
    if outside:
        raise ValueError(_REFUSED.format(
            what=f"{host!r}, which resolves to {', '.join(outside)} on this machine "
                 "(check /etc/hosts); use 127.0.0.1 or ::1"))
    if not found:
        raise ValueError(f"{host!r} does not resolve to any IPv4 or IPv6 address")
    info_family, sockaddr, ip = found[0]
    assert ip is not None
    if info_family == socket.AF_INET6:
        return info_family, (str(ip), port, 0, 0)
    return info_family, (str(ip), port)


def check_peer(sockaddr: Sequence[Any]) -> None:
    """Defense in depth: refuse an accepted connection whose peer is not a loopback address."""
    ip = _parse_ip(str(sockaddr[0]).split("%")[0])
    if ip is None or not _is_loopback(ip):
        raise ValueError(_REFUSED.format(what=f"a connection from {sockaddr[0]!r}"))
