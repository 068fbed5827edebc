"""Passing a Channel to a child process (a ``multiprocessing.Process`` argument, or inside a
message), as multiprocessing does for its own connections: the socket is duplicated into the
child under the fork, spawn and forkserver start methods."""

import socket
import sys
from multiprocessing import reduction
from typing import Any, Callable, Optional, Tuple

from ._implementation import CHANNEL_TYPES, Channel


def _rebuild(
    fd: int, readable: bool, writable: bool, max_message_size: Optional[int], buffered: bytes
) -> Channel:
    channel = Channel(fd, readable, writable, max_message_size=max_message_size)
    if buffered:
        channel._prefill(buffered)
    return channel


if sys.platform == "win32":  # pragma: no cover - exercised on the Windows CI runners
    def _reduce_channel(channel: Channel) -> Tuple[Callable[..., Channel], Tuple[Any, ...]]:
        from multiprocessing import resource_sharer
        buffered = channel._buffered()  # first: it refuses a channel in mid-message
        with socket.fromfd(channel.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
            shared = resource_sharer.DupSocket(sock)
        return _rebuild_from_socket, (shared, channel.readable, channel.writable,
                                      channel.max_message_size, buffered)

    def _rebuild_from_socket(
        shared: Any, readable: bool, writable: bool, max_message_size: Optional[int], buffered: bytes
    ) -> Channel:
        return _rebuild(shared.detach().detach(), readable, writable, max_message_size, buffered)
else:
    def _reduce_channel(channel: Channel) -> Tuple[Callable[..., Channel], Tuple[Any, ...]]:
        buffered = channel._buffered()  # first: it refuses a channel in mid-message
        shared = reduction.DupFd(channel.fileno())
        return _rebuild_from_fd, (shared, channel.readable, channel.writable,
                                  channel.max_message_size, buffered)

    def _rebuild_from_fd(
        shared: Any, readable: bool, writable: bool, max_message_size: Optional[int], buffered: bytes
    ) -> Channel:
        return _rebuild(shared.detach(), readable, writable, max_message_size, buffered)


for _channel_type in CHANNEL_TYPES:
    reduction.register(_channel_type, _reduce_channel)
