"""The peak-memory part of ``python -m loopfast bench``: a sender and a receiver process each
reset their peak RSS (``/proc/self/clear_refs``), move one large message, and report how far
``VmHWM`` rose (Linux only; skipped elsewhere with a note).
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Callable, Optional, Union

from .children import PAYLOADS, Child, Watchdog, make_payload, received_size
from .peers import PEERS, BenchError, Endpoint, Peer, as_buffer
from .report import MemorySection, format_size

if TYPE_CHECKING:
    from .children import Ctrl
    from .peers import End

__all__ = ["measure_memory", "memory_unsupported_reason", "run_memory"]

MiB = 1024 * 1024

# ==== memory ======================================================================================

MEMORY_SIZE = 256 * MiB
QUICK_MEMORY_SIZE = 64 * MiB
MEMORY_PEERS = ("loopfast", "mp_pipe")
# How the receiving side takes the message in; each transfer also measures the sending side (with
# send_bytes, or with send for "recv_obj", whose message is a float64 array: issue 4).
MEMORY_RECEIVE_APIS = ("recv", "recv_into", "recv_obj")
_SENDER_API = {"recv": "send", "recv_into": "send", "recv_obj": "send_obj"}
_API_NAMES = {"send": "send_bytes", "recv": "recv_bytes", "recv_into": "recv_bytes_into",
              "send_obj": "send", "recv_obj": "recv"}
_OBJECT_PAYLOAD = "float64_array"
MEMORY_METHOD = ("rise of the peak RSS (VmHWM in /proc/self/status) during the call, after "
                 "resetting it through /proc/self/clear_refs; the message to send (and "
                 "recv_bytes_into's buffer) is allocated and written before the reset")


def memory_unsupported_reason() -> Optional[str]:
    """None if peak memory can be measured here, else why not."""
    if not sys.platform.startswith("linux"):
        return "peak-memory figures need Linux (/proc/self/clear_refs and VmHWM)"
    try:
        reset_peak()
        peak_rss()
    except (OSError, ValueError) as exc:
        return f"cannot reset or read the peak RSS here ({exc})"
    return None


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ValueError("no VmHWM in /proc/self/status")


def _memory_side(ctrl: Ctrl, dog: Watchdog, peer_name: str, end: End, api: str,
                 size: int) -> None:
    with contextlib.closing(end):
        _memory_transfer(ctrl, dog, PEERS[peer_name].endpoint(end, size), api, size)


def _memory_transfer(ctrl: Ctrl, dog: Watchdog, ep: Endpoint, api: str, size: int) -> None:
    # What the call needs beforehand is allocated and written before the peak is reset: only the
    # call's own memory counts.
    data: object = None
    if api == "send":
        data = make_payload(size)
    elif api == "send_obj":
        data = PAYLOADS[_OBJECT_PAYLOAD].make(size)
    elif api == "recv_into":
        data = bytearray(size)
    reset_peak()
    base = peak_rss()
    ctrl.send(("ready", base))
    if not ctrl.poll(dog.seconds):
        raise TimeoutError("no go from the benchmark process")
    ctrl.recv()
    if api == "send":
        ep.send(as_buffer(data))
        moved = size
    elif api == "send_obj":
        ep.send_obj(data)
        moved = size
    elif api == "recv":
        moved = received_size(ep.recv())
    elif api == "recv_into":
        assert isinstance(data, bytearray)
        moved = ep.recv_into(data)
    else:
        moved = received_size(ep.recv_obj())
    peak = peak_rss()
    ctrl.send(("result", {"base": base, "peak": peak, "moved": moved}))
    if not ctrl.poll(dog.seconds):
        raise TimeoutError("no stop from the benchmark process")
    ctrl.recv()
    ctrl.send(("bye", None))


def _side_result(value: object, name: str) -> dict[str, int]:
    if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
        raise BenchError(f"{name}: unexpected result from the peer process: {value!r}")
    return {str(key): int(v) for key, v in value.items()}


def measure_memory(peer: Union[Peer, str], size: int, receive_api: str = "recv") -> dict[str, int]:
    """Move one `size`-byte message between two new processes, the receiver using
    `receive_api` ("recv", "recv_into", or "recv_obj": a float64 array sent with send and
    received with recv); return how much each one's peak RSS rose, in bytes:
    {"send": ..., "receive": ...}."""
    peer = PEERS[peer] if isinstance(peer, str) else peer
    first, second = peer.make_pair()
    sides: dict[str, Child] = {}
    try:
        sides["receive"] = Child(f"{peer.name} receiver", _memory_side,
                                  (peer.name, first, receive_api, size), inherited=(second,))
        first.close()
        sides["send"] = Child(f"{peer.name} sender", _memory_side,
                               (peer.name, second, _SENDER_API[receive_api], size),
                               inherited=(sides["receive"].ctrl,))
        second.close()
        for side in sides.values():
            side.arm()
        for side in sides.values():
            side.expect("ready")
        for side in sides.values():
            side.command("go")
        results = {name: _side_result(side.expect("result"), side.name)
                   for name, side in sides.items()}
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


def run_memory(quick: bool, progress: Callable[[str], None]) -> MemorySection:
    reason = memory_unsupported_reason()
    size = QUICK_MEMORY_SIZE if quick else MEMORY_SIZE
    repeats = 1 if quick else 3
    objects_skipped = PAYLOADS[_OBJECT_PAYLOAD].unavailable()
    section: MemorySection = {"size": size, "repeats": repeats, "method": MEMORY_METHOD,
                              "skipped": reason, "objects_skipped": objects_skipped, "rows": []}
    if reason:
        progress(f"memory: skipped ({reason})")
        return section
    if objects_skipped:
        progress(f"memory: objects skipped ({objects_skipped})")
    apis = [api for api in MEMORY_RECEIVE_APIS if api != "recv_obj" or not objects_skipped]
    samples: dict[tuple[str, str], list[int]] = {}
    for repeat in range(repeats):
        for peer in MEMORY_PEERS:
            for api in apis:
                extra = measure_memory(peer, size, api)
                samples.setdefault((peer, _SENDER_API[api]), []).append(extra["send"])
                samples.setdefault((peer, api), []).append(extra["receive"])
        progress(f"memory {repeat + 1}/{repeats}: one {format_size(size)} message, "
                 + ", ".join(f"{PEERS[p].label} {_API_NAMES[a]} +{v[-1] / MiB:.1f} MiB"
                             for (p, a), v in samples.items()))
    for (peer, api), values in samples.items():
        section["rows"].append({
            "peer": peer,
            "label": PEERS[peer].label,
            "side": "send" if api in ("send", "send_obj") else "receive",
            "api": _API_NAMES[api],
            "message": PAYLOADS[_OBJECT_PAYLOAD if api.endswith("_obj") else "bytes"].description,
            "samples": values,
            "worst": max(values),
            "worst_ratio": max(values) / size,
        })
    return section
