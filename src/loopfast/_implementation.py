"""Which channel implementation this process uses.

The compiled core (``loopfast._channel``) by default; its pure-Python twin
(``loopfast._channel_py``, same API and wire protocol) when ``LOOPFAST_NO_EXTENSIONS`` is set to a
value other than ``""`` or ``"0"``, on interpreters other than CPython, and when the compiled
extension is missing (a platform without a wheel or a compiler). ``loopfast.implementation`` says
which: ``"compiled"`` or ``"python"``.
"""

import os
import platform
from typing import TYPE_CHECKING, Tuple, Type

__all__ = ["CHANNEL_TYPES", "Channel", "implementation"]


def _pure_requested() -> bool:
    return (os.environ.get("LOOPFAST_NO_EXTENSIONS", "") not in ("", "0")
            or platform.python_implementation() != "CPython")


if TYPE_CHECKING:
    from ._channel import Channel

    implementation: str
    CHANNEL_TYPES: Tuple[Type[Channel], ...]
else:
    from ._channel_py import Channel as _PureChannel

    try:
        from ._channel import Channel as _CompiledChannel
    except ImportError:  # no extension for this platform: the twin does the job
        _CompiledChannel = None

    if _CompiledChannel is None or _pure_requested():
        Channel = _PureChannel
        implementation = "python"
    else:
        Channel = _CompiledChannel
        implementation = "compiled"

    # Both classes can meet in one process (a channel handed over from a process that uses the
    # other one, interop tests): reduction and wait() know them both.
    CHANNEL_TYPES = tuple(
        cls for cls in (_CompiledChannel, _PureChannel) if cls is not None)
