"""The opening exchange of every connection: versioned hello, then optional mutual HMAC proof.

Both sides send first and read second, so neither waits for the other (docs/protocol.md,
"Handshake"). No frame is parsed before this finishes: the handshake reads exactly its own
bytes, and what the peer sent after it stays in the socket for the frame parser.
"""

import hashlib
import hmac
import os
import time
from typing import TYPE_CHECKING, Callable, FrozenSet, List, Optional, Type

from ._errors import AuthenticationError, ProtocolError
from ._peer import check_peer_user, local_user
from ._wire import (
    HELLO,
    HELLO_FLAG_AUTH,
    MAGIC,
    NONCE_SIZE,
    PROOF_LABEL_CONNECTOR,
    PROOF_LABEL_LISTENER,
    PROOF_SIZE,
    VERSION,
)

if TYPE_CHECKING:
    from ._core.channel import Channel

__all__ = ["Handshake", "check_authkey", "handshake_pair", "run_handshake"]

LISTENER = "listener"
CONNECTOR = "connector"


def check_authkey(authkey: object) -> None:
    """An authkey is None (no authentication) or a non-empty byte string."""
    if authkey is None:
        return
    if not isinstance(authkey, bytes):
        raise TypeError("authkey should be a byte string")
    if not authkey:
        raise ValueError(
            "authkey is empty: an empty key proves nothing (any peer knows it); give a secret "
            "such as os.urandom(32), or authkey=None for no authentication")


class _WouldBlock(Exception):
    """A read step of a nonblocking handshake (Handshake.advance) needs bytes not yet arrived."""


class Handshake:
    """One side of the handshake on one channel, split into steps so that `Pipe()` can drive
    both ends of a connection from one thread.

    `allowed` is the set of uids the peer's socket may belong to (None: any user); the peer's
    user is checked (`check_peer_user()`) before any byte of the peer is looked at: a listener
    at accept(), a connector right after connect() or, if the listener's end of the connection
    is still half-open then, when the listener's first bytes arrive (its end is then complete)."""

    def __init__(
        self, channel: "Channel", authkey: Optional[bytes], role: str, timeout: Optional[float],
        allowed: Optional[FrozenSet[int]],
    ) -> None:
        check_authkey(authkey)
        self.channel = channel
        self.allowed = allowed
        self.peer_checked = False
        self.authkey = authkey
        self.role = role
        self.deadline = None if timeout is None else time.monotonic() + timeout
        flags = HELLO_FLAG_AUTH if authkey is not None else 0
        self.hello = HELLO.pack(MAGIC, VERSION, flags, 0, os.urandom(NONCE_SIZE))
        self.peer_hello = b""
        self._partial = b""  # what a read step that would have blocked (advance()) has so far
        self._blocking = True
        self._steps: Optional[List[Callable[[], None]]] = None  # advance()'s steps still to run

    def _remaining(self) -> Optional[float]:
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the peer did not complete the loopfast handshake in time")
        return remaining

    def _read(self, size: int, what: Type[Exception]) -> bytes:
        data, self._partial = self._partial, b""
        while len(data) < size:
            timeout = self._remaining()  # TimeoutError once the deadline has passed
            try:
                data += self.channel._recv_raw(size - len(data),
                                               timeout=timeout if self._blocking else 0)
            except (EOFError, ConnectionResetError) as exc:
                raise what(f"the peer closed the connection during the handshake "
                           f"(after {len(data)} of {size} bytes: {exc})") from None
            except TimeoutError:
                if not self._blocking:
                    self._partial = data  # the step runs again when more has arrived
                    raise _WouldBlock from None
                raise TimeoutError("the peer did not complete the loopfast handshake in time") \
                    from None
            # The peer's first bytes are here (so its end of the connection is complete): who
            # it is decides before anything it sent is looked at.
            self.check_peer_user()
            if what is ProtocolError and MAGIC[:len(data)] != data[:len(MAGIC)]:
                raise ProtocolError(
                    f"the peer is not a loopfast channel: it sent {data[:len(MAGIC)]!r} "
                    f"instead of the {MAGIC!r} greeting")
        return data

    def _write(self, data: bytes, what: Type[Exception]) -> None:
        try:
            self.channel._send_raw(data, timeout=self._remaining())
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise what(f"the peer closed the connection during the handshake ({exc})") from None

    def send_hello(self) -> None:
        self._write(self.hello, ProtocolError)

    def check_peer_user(self, wait: bool = True) -> None:
        """Refuse (AuthenticationError) a peer of a user not allowed; note its uid on the
        channel (`peer_uid`). With wait=False, a peer end still half-open (just after connect())
        is left for the check that runs when its first bytes arrive."""
        if not self.peer_checked:
            uid = check_peer_user(self.channel.fileno(), self.allowed, 0.1 if wait else 0)
            if isinstance(uid, str):  # HALF_OPEN: ask again when its bytes arrive
                return
            self.channel._peer_uid = uid
            if uid == local_user():
                self.channel._trusted = True  # see check_proof
            self.peer_checked = True

    def read_hello(self) -> None:
        data = self._read(HELLO.size, ProtocolError)
        _, version, flags, _, _ = HELLO.unpack(data)
        if version != VERSION:
            raise ProtocolError(
                f"the peer speaks loopfast protocol version {version}; "
                f"this side speaks version {VERSION}")
        self.peer_hello = data
        peer_auth = bool(flags & HELLO_FLAG_AUTH)
        if peer_auth and self.authkey is None:
            raise AuthenticationError("the peer requires an authkey, and none was given")
        if self.authkey is not None and not peer_auth:
            raise AuthenticationError("the peer did not authenticate (it has no authkey)")

    def _proof(self, label: bytes, first_hello: bytes, second_hello: bytes) -> bytes:
        assert self.authkey is not None
        # The HMAC key is SHA-256(authkey), not the authkey itself: HMAC pads a key with zero
        # bytes (and hashes one longer than 64), so b"k" and b"k\0" would be one key.
        key = hashlib.sha256(self.authkey).digest()
        return hmac.new(key, label + first_hello + second_hello, "sha256").digest()

    def send_proof(self) -> None:
        if self.authkey is None:
            return
        label = PROOF_LABEL_LISTENER if self.role == LISTENER else PROOF_LABEL_CONNECTOR
        self._write(self._proof(label, self.hello, self.peer_hello), AuthenticationError)

    def check_proof(self) -> None:
        if self.authkey is None:
            return
        received = self._read(PROOF_SIZE, AuthenticationError)
        label = PROOF_LABEL_CONNECTOR if self.role == LISTENER else PROOF_LABEL_LISTENER
        expected = self._proof(label, self.peer_hello, self.hello)
        if not hmac.compare_digest(received, expected):
            raise AuthenticationError("digest received was wrong")
        # Its frames may reserve memory before their bytes arrive (the receive's fast path):
        # as may this user's, who could end this process anyway; any other peer's frames get
        # memory only as their bytes arrive.
        self.channel._trusted = True

    def start_deferred(self) -> None:
        """Send this side's hello now and leave the rest to `advance()`, run at the channel's
        first use (connection.Client without an authkey, as multiprocessing's Client returns
        once connected). Only a side without an authkey can do this: a proof needs the peer's
        hello first."""
        assert self.authkey is None
        self.send_hello()
        self._steps = [self.read_hello]
        self._blocking = False

    def advance(self) -> bool:
        """Run the steps as far as the bytes received so far allow, without waiting for more:
        True once the handshake is complete, False if it waits for the peer (call again when the
        channel's socket is readable). Raises as the blocking steps do, TimeoutError included
        once the deadline has passed. Reads are resumed where they stopped; the writes (48 and
        32 bytes on a fresh connection) always fit in the socket buffer."""
        if self._steps is None:
            self._steps = [self.send_hello, self.read_hello, self.send_proof, self.check_proof]
            self._blocking = False
        while self._steps:
            try:
                self._steps[0]()
            except _WouldBlock:
                return False
            del self._steps[0]
        return True


def _run(steps: List[Callable[[], None]], channels: List["Channel"]) -> None:
    try:
        for step in steps:
            step()
    except BaseException:
        for channel in channels:
            channel.close()
        raise


def run_handshake(side: Handshake) -> None:
    """Run the whole of `side`'s handshake, blocking; on any failure its channel is closed."""
    _run([side.send_hello, side.read_hello, side.send_proof, side.check_proof], [side.channel])


def handshake_pair(
    listener_end: "Channel", connector_end: "Channel", authkey: bytes, timeout: Optional[float]
) -> None:
    """Run both sides of one connection's handshake in this thread (for `Pipe()`: both ends are
    this process's own, so each one's peer is this user)."""
    a = Handshake(listener_end, authkey, LISTENER, timeout, None)
    b = Handshake(connector_end, authkey, CONNECTOR, timeout, None)
    for side in (a, b):
        side.channel._peer_uid = local_user()
        side.peer_checked = True
    _run([a.send_hello, b.send_hello, a.read_hello, b.read_hello,
          a.send_proof, b.send_proof, a.check_proof, b.check_proof],
         [listener_end, connector_end])
