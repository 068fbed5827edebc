"""loopfast: fast, authenticated message channels between processes over loopback TCP.

A drop-in superset of ``multiprocessing.connection``::

    from loopfast import Pipe          # instead of: from multiprocessing import Pipe
    a, b = Pipe()
    a.send({"hello": "world"})
    print(b.recv())
"""

from ._backend import Channel, implementation
from ._errors import AuthenticationError, BufferTooShort, ProtocolError
from ._spin import get_default_spin, set_default_spin
from ._version import __version__
from ._wire import DEFAULT_MAX_MESSAGE_SIZE
from .connection import Client, Connection, Listener, Pipe, wait
from .context import get_context, install, installed, uninstall

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "AuthenticationError",
    "BufferTooShort",
    "Channel",
    "Client",
    "Connection",
    "Listener",
    "Pipe",
    "ProtocolError",
    "__version__",
    "get_context",
    "get_default_spin",
    "implementation",
    "install",
    "installed",
    "set_default_spin",
    "uninstall",
    "wait",
]
