"""Exceptions raised by loopfast.

They subclass the matching ``multiprocessing`` exceptions, so ``except`` clauses written for
``multiprocessing.connection`` keep working unchanged.
"""

import multiprocessing

__all__ = ["AuthenticationError", "BufferTooShort", "ProtocolError"]


class BufferTooShort(multiprocessing.BufferTooShort):
    """``recv_bytes_into`` got a message larger than the buffer.

    ``args[0]`` is the whole message.
    """


class AuthenticationError(multiprocessing.AuthenticationError):
    """The peer failed the authkey challenge, or the two sides disagree about using one."""


class ProtocolError(ConnectionError):
    """The peer broke the wire protocol: not a loopfast peer, an unsupported version, a malformed
    or oversized frame, or a connection that ended in the middle of a message.

    The channel is closed when this is raised: the byte stream can no longer be trusted.
    """
