"""Which channel implementation this process uses.

The compiled core (``loopfast._core.channel``) by default; its pure-Python twin
(``loopfast._core.channel_py``, same API and wire protocol) when ``LOOPFAST_NO_EXTENSIONS`` is set
to a value other than ``""`` or ``"0"``, on interpreters other than CPython, and when the compiled
extension is missing (a platform without a wheel or a compiler). ``loopfast.implementation`` says
which: ``"compiled"`` or ``"python"``.

The compiled module is not even imported when the twin is asked for (LOOPFAST_NO_EXTENSIONS),
so a broken or crashing build can be stepped around with that switch alone.
"""

import os
import platform
import sys
import warnings
from typing import TYPE_CHECKING, List, Type

from . import _reduction, _spin

__all__ = ["CHANNEL_TYPES", "Channel", "adopt", "implementation"]


_WARNED = "_LOOPFAST_TWIN_WARNED"  # set once the missing core was reported in this process tree


def _pure_requested() -> bool:
    return (os.environ.get("LOOPFAST_NO_EXTENSIONS", "") not in ("", "0")
            or platform.python_implementation() != "CPython")


if TYPE_CHECKING:
    from ._core.channel import Channel

    implementation: str
    CHANNEL_TYPES: List[Type[Channel]]
else:
    from ._core.channel_py import Channel as _PureChannel

    _CompiledChannel = None
    if not _pure_requested():
        try:
            from ._core.channel import Channel as _CompiledChannel
        except ImportError as exc:  # no extension for this platform: the twin does the job
            # On CPython that is an install that could not build it (pip hides the build's own
            # warning unless -v): say it where it is seen, once per process tree (the children
            # of this process inherit the mark and stay quiet: a pool of workers says it once).
            if not os.environ.get(_WARNED):
                os.environ[_WARNED] = "1"
                warnings.warn(
                    f"loopfast: the compiled core is not installed ({exc}); running on the "
                    f"pure-Python twin, which is slower. Reinstall with a C compiler and the "
                    f"Python headers for the compiled core, or set LOOPFAST_NO_EXTENSIONS=1 to "
                    f"choose the twin (and silence this)", RuntimeWarning, stacklevel=2)

    if _CompiledChannel is None:
        Channel = _PureChannel
        implementation = "python"
    else:
        Channel = _CompiledChannel
        implementation = "compiled"

    # The Channel classes this process knows (wait(), handover to children, the queues): its
    # own, the twin (a channel can always be rebuilt as one), and any adopted since.
    CHANNEL_TYPES = list(dict.fromkeys([Channel, _PureChannel]))


def adopt(cls: "Type[Channel]") -> None:
    """Make the Channel class `cls` known to this process too (wait(), passing to children),
    for a program that uses both implementations side by side: the test suite, which imports
    the compiled class itself while the twin is this process's own."""
    if cls not in CHANNEL_TYPES:
        CHANNEL_TYPES.append(cls)
        _reduction.register(cls)
        _follow_default_spin(cls)


def _follow_default_spin(cls: "Type[Channel]") -> None:
    """A compiled Channel class reads the process's spin budget from a C global of its module."""
    setter = getattr(sys.modules[cls.__module__], "_set_default_spin_ns", None)
    if setter is not None:
        _spin.add_sink(setter)


_follow_default_spin(Channel)
# multiprocessing passes every known Channel class to children, rebuilt there as their own.
_reduction.rebuild_as(Channel)
for _cls in CHANNEL_TYPES:
    _reduction.register(_cls)
