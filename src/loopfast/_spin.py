"""The process-wide busy-polling budget: how long a receive, poll() or wait() checks for data in
a tight loop before it goes to sleep in the kernel.

On loopback a sleeping receiver costs ~25 us of kernel wake-up per hop; a receiver that is still
spinning when the data arrives answers at once (the 64 B round trip drops from ~70 us to ~6 us on
the 2-core development machine). Spinning uses CPU only while it waits and only up to the budget,
then the wait sleeps without using any. The compiled channel spins with the GIL released; the
pure-Python twin does not spin at all.

The default is DEFAULT_SPIN_US when this process may run on at least two CPUs, else 0 (one CPU:
spinning would only keep the peer from running). ``LOOPFAST_SPIN_US`` overrides it at import;
``set_default_spin()`` at run time; a channel's own ``spin=`` overrides both.
"""

import math
import os
from typing import Callable, List, Optional

__all__ = ["DEFAULT_SPIN_US", "get_default_spin", "set_default_spin", "usable_cpus"]

# Chosen by measurement (2-core machine, medians of 3 interleaved runs, 64 B messages):
# round trip on two CPUs 72.5 us without spinning, 5.9-6.0 us with any budget from 10 to 200 us
# (the C busy-poll floor: 5.3 us). Both ends pinned to one CPU: 6.0 us either way, because the
# spin notices that the CPU is shared (a yield that lets another thread run) and sleeps instead.
# One-way stream of plain send_bytes: within the run-to-run noise with or without spinning.
# 50 us covers a peer that answers within a few tens of microseconds and costs at most 50 us of
# CPU per wait that ends up sleeping.
DEFAULT_SPIN_US = 50.0

_ENV = "LOOPFAST_SPIN_US"


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _validated(microseconds: float) -> float:
    value = float(microseconds)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"spin must be a finite number of microseconds >= 0, got {microseconds!r}")
    return value


def _initial() -> float:
    configured = os.environ.get(_ENV, "").strip()
    if configured:
        try:
            return _validated(float(configured))
        except ValueError:
            raise ValueError(f"{_ENV}={configured!r}: expected microseconds >= 0") from None
    return DEFAULT_SPIN_US if usable_cpus() >= 2 else 0.0


_current: float = 0.0
# Where the budget goes besides _current: the compiled core keeps its own copy in C, and
# _backend adds its setter here when it loads the core (this module imports no core).
_sinks: List[Callable[[int], None]] = []


def add_sink(sink: Callable[[int], None]) -> None:
    """Call `sink(nanoseconds)` with the budget now and whenever it is set."""
    if sink not in _sinks:
        _sinks.append(sink)
        sink(int(_current * 1000))


def set_default_spin(microseconds: float) -> None:
    """Set the busy-polling budget (microseconds; 0 disables) of every channel of this process
    that has no ``spin=`` of its own."""
    global _current
    value = _validated(microseconds)
    for sink in _sinks:
        sink(int(value * 1000))
    _current = value


def get_default_spin() -> float:
    """The process-wide busy-polling budget in microseconds."""
    return _current


def channel_spin(spin: Optional[float]) -> float:
    """The budget a channel with this ``spin`` setting uses."""
    return _current if spin is None else spin


set_default_spin(_initial())
