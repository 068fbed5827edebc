"""Passing a Channel to a child process (a ``multiprocessing.Process`` argument, or inside a
message), as multiprocessing does for its own connections: the socket is duplicated into the
child under the fork, spawn and forkserver start methods. The child's copy gets the same
direction, limits and serializer. Both copies treat the socket as shared from then on: neither
trusts what it saw queued before the other may have received."""

import importlib
import socket
import sys
import types
from multiprocessing import reduction
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, Type

if TYPE_CHECKING:
    from ._core.channel import Channel

__all__ = ["rebuild_as", "register"]

_Reduced = Tuple[Callable[..., "Channel"], Tuple[Any, ...]]

# The Channel class a received channel is rebuilt as: this process's own (_backend sets it).
_rebuild_class: "Optional[Type[Channel]]" = None


class _ModuleRef:
    """A serializer that is a module (msgspec.msgpack, cloudpickle) travels by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def load(self) -> Any:
        return importlib.import_module(self.name)


def _state(channel: "Channel") -> Tuple[Any, ...]:
    channel._prepare_handover()  # first: it refuses a channel in mid-message
    serializer = channel.serializer
    if isinstance(serializer, types.ModuleType):
        serializer = _ModuleRef(serializer.__name__)
    options = {"max_message_size": channel.max_message_size, "serializer": serializer,
               "spin": channel.spin, "warn_unclosed": channel._warn_unclosed,
               "peer_uid": channel._peer_uid, "trusted": channel._trusted}
    return channel.readable, channel.writable, options


def _rebuild(fd: int, readable: bool, writable: bool, options: Dict[str, Any]) -> "Channel":
    if isinstance(options["serializer"], _ModuleRef):
        options["serializer"] = options["serializer"].load()
    warn_unclosed = options.pop("warn_unclosed", True)
    peer_uid = options.pop("peer_uid", None)
    trusted = options.pop("trusted", False)
    if _rebuild_class is None:  # loopfast._backend sets it when `import loopfast` runs
        raise RuntimeError("loopfast is not initialized in this process")
    channel = _rebuild_class(fd, readable, writable, **options)
    channel._warn_unclosed = warn_unclosed
    channel._peer_uid = peer_uid
    channel._trusted = trusted
    channel._mark_shared()
    return channel


if sys.platform == "win32":  # pragma: no cover - exercised on the Windows CI runners
    def _reduce_channel(channel: "Channel") -> _Reduced:
        from multiprocessing import resource_sharer
        state = _state(channel)
        with socket.fromfd(channel.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
            shared = resource_sharer.DupSocket(sock)
        return _rebuild_from_socket, (shared, *state)

    def _rebuild_from_socket(shared: Any, *state: Any) -> "Channel":
        return _rebuild(shared.detach().detach(), *state)
else:
    def _reduce_channel(channel: "Channel") -> _Reduced:
        state = _state(channel)
        shared = reduction.DupFd(channel.fileno())
        return _rebuild_from_fd, (shared, *state)

    def _rebuild_from_fd(shared: Any, *state: Any) -> "Channel":
        return _rebuild(shared.detach(), *state)


def register(channel_type: "Type[Channel]") -> None:
    """Let multiprocessing pass channels of `channel_type` to child processes."""
    reduction.register(channel_type, _reduce_channel)


def rebuild_as(channel_type: "Type[Channel]") -> None:
    """Rebuild the channels this process receives as `channel_type` (its own Channel class)."""
    global _rebuild_class
    _rebuild_class = channel_type
