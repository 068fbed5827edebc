"""Passing a Channel to a child process (a ``multiprocessing.Process`` argument, or inside a
message), as multiprocessing does for its own connections: the socket is duplicated into the
child under the fork, spawn and forkserver start methods. The child's copy gets the same
direction, limits and serializer, and the bytes already received but not yet read."""

import importlib
import socket
import sys
import types
from multiprocessing import reduction
from typing import Any, Callable, Dict, Tuple

from ._implementation import CHANNEL_TYPES, Channel

_Reduced = Tuple[Callable[..., Channel], Tuple[Any, ...]]


class _ModuleRef:
    """A serializer that is a module (msgspec.msgpack, cloudpickle) travels by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def load(self) -> Any:
        return importlib.import_module(self.name)


def _state(channel: Channel) -> Tuple[Any, ...]:
    buffered = channel._buffered()  # first: it refuses a channel in mid-message
    serializer = channel.serializer
    if isinstance(serializer, types.ModuleType):
        serializer = _ModuleRef(serializer.__name__)
    options = {"max_message_size": channel.max_message_size, "serializer": serializer,
               "spin": channel.spin}
    return channel.readable, channel.writable, options, buffered


def _rebuild(fd: int, readable: bool, writable: bool, options: Dict[str, Any],
             buffered: bytes) -> Channel:
    if isinstance(options["serializer"], _ModuleRef):
        options["serializer"] = options["serializer"].load()
    channel = Channel(fd, readable, writable, **options)
    if buffered:
        channel._prefill(buffered)
    return channel


if sys.platform == "win32":  # pragma: no cover - exercised on the Windows CI runners
    def _reduce_channel(channel: Channel) -> _Reduced:
        from multiprocessing import resource_sharer
        state = _state(channel)
        with socket.fromfd(channel.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
            shared = resource_sharer.DupSocket(sock)
        return _rebuild_from_socket, (shared, *state)

    def _rebuild_from_socket(shared: Any, *state: Any) -> Channel:
        return _rebuild(shared.detach().detach(), *state)
else:
    def _reduce_channel(channel: Channel) -> _Reduced:
        state = _state(channel)
        shared = reduction.DupFd(channel.fileno())
        return _rebuild_from_fd, (shared, *state)

    def _rebuild_from_fd(shared: Any, *state: Any) -> Channel:
        return _rebuild(shared.detach(), *state)


for _channel_type in CHANNEL_TYPES:
    reduction.register(_channel_type, _reduce_channel)
