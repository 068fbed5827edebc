"""Property-based tests (hypothesis) of the handshake and authentication, for both channel
implementations.

The handshake code is shared Python, but it reads and writes through the channel: the compiled
core or its pure-Python twin. `Listener.accept()` and `Client()` build their channels from
`loopfast.connection.Channel` (the class this process picked at import); `channels_of(impl)`
points that name at the class under test for the length of an example, so the real Listener and
Client code runs over each implementation. Every test checks the type of the channels it gets,
so it notices if they stop taking the class from there.

The other end is a hand-written peer on a plain 127.0.0.1 socket that speaks docs/protocol.md
("Handshake"). The properties, each on the listening and on the connecting side:

1. a corrupted hello (byte flips, random magic, version, flags, reserved or nonce, cut short then
   closed or reset, garbage after it) has exactly the outcome of the documented checks, with the
   documented wording: ProtocolError (not a loopfast peer, cut short, another version: naming
   both), AuthenticationError (the AUTH flags disagree, or garbage where the proof belongs), or
   success when only fields the receiver ignores changed (then garbage after the handshake is a
   ProtocolError of the first receive);
2. a bad proof (wrong key, flipped bits, truncated then closed, reset or followed by frames,
   replayed from an earlier session, the other side's label, the hellos swapped, reflected back)
   is AuthenticationError on the side that checks it;
3. a real Listener and Client with any two authkeys (None, empty, random): success iff they are
   equal, otherwise AuthenticationError on both sides, with the documented wording when one side
   has no key;
4. a valid handshake written in tiny pieces succeeds and the first messages arrive intact.

Keys that HMAC alone would not tell apart (b"k" and b"k\0": it pads a key with zero bytes) are
different keys: the HMAC key is SHA-256(authkey) (docs/protocol.md; this was a bug, found here).

In 1 and 2 the peer sends frames right after its handshake bytes, one of them a pickle whose
unpickling is recorded: after a failed handshake none of them is ever delivered, the failing side
closes the connection, and the Listener then serves a good client whose first message is its own.

A Client without an authkey returns once the TCP connection is made (as multiprocessing's
does) and checks the listener's hello at the channel's first use: on that side the outcome is
the first use's (the channel, or the exception it raised, having closed the channel).

Every wait is bounded: handshake_timeout and Client(timeout=) are HANDSHAKE_TIMEOUT, raw sockets
have IO_TIMEOUT, threads are joined with JOIN_TIMEOUT, and no expected outcome is a timeout.
Examples are derandomized and no example database is used, so every run checks the same cases.
"""

import contextlib
import hashlib
import hmac
import itertools
import pickle
import socket
import struct

import pytest

hypothesis = pytest.importorskip("hypothesis")
from conftest import (  # noqa: E402
    HELLO,
    IMPLEMENTATIONS,
    KIND_PICKLE,
    MAGIC,
    PROTOCOL_VERSION,
    Background,
    frame,
    recv_exact,
)
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import loopfast  # noqa: E402
from loopfast import AuthenticationError, ProtocolError, connection  # noqa: E402

pytestmark = pytest.mark.timeout(180)

# docs/protocol.md, "Handshake"
FLAG_AUTH = 0x0001
PROOF_SIZE = 32
LISTENER_LABEL = b"loopfast-1 listener proof"
CONNECTOR_LABEL = b"loopfast-1 connector proof"

HANDSHAKE_TIMEOUT = 5.0  # bounds each attempt; never reached by an expected outcome
IO_TIMEOUT = 10.0        # raw sockets and receives
JOIN_TIMEOUT = 20.0      # background accept() / Client()

NAMES = sorted(IMPLEMENTATIONS)
each_impl = pytest.mark.parametrize("impl", [IMPLEMENTATIONS[n] for n in NAMES], ids=NAMES)


def _settings(max_examples):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow], print_blob=False)


@contextlib.contextmanager
def channels_of(impl):
    """Make Listener.accept() and Client() build `impl` channels."""
    saved = connection.Channel
    connection.Channel = impl
    try:
        yield
    finally:
        connection.Channel = saved


# ---- what the peer sends after its handshake, and whether it was delivered ----------------------

DELIVERED = []
_tags = itertools.count()


def _delivered(tag):
    DELIVERED.append(tag)
    return tag


class Tracked:
    """Unpickling this records its tag in DELIVERED: the peer's object reached the application."""

    def __init__(self, tag):
        self.tag = tag

    def __reduce__(self):
        return _delivered, (self.tag,)


class PeerFrames:
    """Two valid frames a peer sends right after its handshake bytes: bytes, then a Tracked."""

    def __init__(self):
        DELIVERED.clear()
        self.tag = f"peer-{next(_tags)}"
        self.data = f"peer message {self.tag}".encode()
        self.wire = frame(self.data) + frame(pickle.dumps(Tracked(self.tag)), kind=KIND_PICKLE)

    def assert_received_by(self, channel):
        assert channel.recv_bytes(timeout=IO_TIMEOUT) == self.data
        assert channel.recv(timeout=IO_TIMEOUT) == self.tag
        assert DELIVERED == [self.tag]

    def assert_never_delivered(self):
        assert self.tag not in DELIVERED


# ---- the protocol, written out from docs/protocol.md ---------------------------------------------

def make_hello(flags, nonce=None):
    return HELLO.pack(MAGIC, PROTOCOL_VERSION, flags, 0, nonce or _nonce())


_nonce_counter = itertools.count()


def _nonce():
    # Unique per hello, and the same in every run (the tests are derandomized).
    return struct.pack("<Q", next(_nonce_counter)).ljust(32, b"\xa5")


def proof(key, label, sender_hello, receiver_hello):
    """docs/protocol.md: HMAC-SHA256 keyed with SHA-256(authkey)."""
    return hmac.new(hashlib.sha256(key).digest(), label + sender_hello + receiver_hello,
                    "sha256").digest()


def assert_valid_hello(data, has_key):
    magic, version, flags, reserved, _ = HELLO.unpack(data)
    assert (magic, version, flags, reserved) == (
        MAGIC, PROTOCOL_VERSION, FLAG_AUTH if has_key else 0, 0)


def hello_verdict(sent, receiver_has_key):
    """What docs/protocol.md says a receiver does with `sent` as the peer's hello (followed by
    the end of the connection if it is shorter than a hello): (the exception it raises, words its
    message must contain), or (None, []) to go on."""
    if sent[:len(MAGIC)] != MAGIC[:len(sent)]:
        return ProtocolError, ["not a loopfast"]  # 1. not a loopfast peer
    if len(sent) < HELLO.size:
        return ProtocolError, ["closed"]  # the connection ended during the hello
    _, version, flags, _, _ = HELLO.unpack(sent)
    if version != PROTOCOL_VERSION:  # 2. version mismatch, "naming both versions"
        return ProtocolError, [f"version {version}", f"version {PROTOCOL_VERSION}"]
    if bool(flags & FLAG_AUTH) != receiver_has_key:
        # 3. the AUTH bits disagree: "the side with a key says the peer did not authenticate;
        # the side without says the peer requires a key"
        return AuthenticationError, [
            "did not authenticate" if receiver_has_key else "requires an authkey"]
    return None, []


# ---- raw sockets -----------------------------------------------------------------------------

def _nodelay(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def raw_connect(address):
    return _nodelay(socket.create_connection(address, timeout=IO_TIMEOUT))


@contextlib.contextmanager
def fake_listener():
    """A plain listening socket on 127.0.0.1 (for a real Client to connect to)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        sock.settimeout(IO_TIMEOUT)
        yield sock


def accept_raw(fake):
    conn, _ = fake.accept()
    conn.settimeout(IO_TIMEOUT)
    return _nodelay(conn)


def cut(data, sizes):
    """`data` in chunks of the given sizes, the rest (if any) in one last chunk."""
    chunks, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        chunks.append(data[pos:pos + size])
        pos += size
    if pos < len(data):
        chunks.append(data[pos:])
    return chunks


def send_chunks(sock, chunks):
    """One send per chunk. The other side may hang up as soon as it sees an error: then stop
    (returns False)."""
    try:
        for chunk in chunks:
            sock.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def end_writing(sock):
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def reset(sock):
    """Close `sock` with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def end_connection(sock, how):
    """End our side the way the case says: "close" (a FIN; the socket stays open for reading)
    or "reset" (an RST)."""
    if how == "reset":
        reset(sock)
    else:
        end_writing(sock)


def assert_closed_by_other_side(sock):
    """The other side closed the connection: reads end in EOF (or a reset) within IO_TIMEOUT."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def outcome_of(background):
    """What the background call returned, or the exception it raised."""
    try:
        return background.result(JOIN_TIMEOUT)
    except AssertionError:  # still running
        raise
    except Exception as exc:
        return exc


def close_if_channel(got):
    if not isinstance(got, BaseException):
        got.close()


def first_use_outcome(client, use):
    """A Client without an authkey returns once connected: the listener's hello is read and
    checked at the channel's first use, `use(client)`. Returns the channel, or the exception the
    first use raised (a failed handshake closes the channel)."""
    if isinstance(client, BaseException):
        return client
    try:
        use(client)
    except Exception as exc:
        assert client.closed, f"the failed first use ({exc!r}) left the channel open"
        return exc
    return client


def assert_outcome(got, expected, impl):
    if expected is None:
        assert type(got) is impl, f"expected a {impl.__module__}.Channel, got {got!r}"
    else:
        assert type(got) is expected, f"expected {expected.__name__}, got {got!r}"


def assert_serves_a_good_client(listener, key, impl):
    accepting = Background(listener.accept)
    with loopfast.Client(listener.address, authkey=key, timeout=HANDSHAKE_TIMEOUT) as client, \
            accepting.result(JOIN_TIMEOUT) as server:
        assert type(server) is impl and type(client) is impl
        client.send_bytes(b"good client")
        assert server.recv_bytes(timeout=IO_TIMEOUT) == b"good client"
        assert not server.poll(0)


def record_session(listener, key):
    """One successful authenticated session of a raw client with `listener`: returns (client
    hello, client proof, listener hello, listener proof), the bytes each side sent."""
    frames = PeerFrames()
    with raw_connect(listener.address) as raw:
        accepting = Background(listener.accept)
        listener_hello = recv_exact(raw, HELLO.size)
        own = make_hello(FLAG_AUTH)
        own_proof = proof(key, CONNECTOR_LABEL, own, listener_hello)
        raw.sendall(own + own_proof + frames.wire)
        listener_proof = recv_exact(raw, PROOF_SIZE)
        assert listener_proof == proof(key, LISTENER_LABEL, listener_hello, own)
        with accepting.result(JOIN_TIMEOUT) as server:
            frames.assert_received_by(server)
    return own, own_proof, listener_hello, listener_proof


# ---- strategies ------------------------------------------------------------------------------

keys = st.binary(min_size=1, max_size=40)  # an empty key is refused up front (test_auth)
chunk_sizes = st.lists(st.one_of(st.integers(1, 3), st.integers(1, 17), st.integers(1, 80)),
                       max_size=24)
tiny_chunk_sizes = st.lists(st.integers(1, 6), min_size=8, max_size=80)

MUTATIONS = ["flip", "magic", "version", "flags", "reserved", "nonce"]
HELLO_FIELDS = [(8, "magic"), (10, "version"), (12, "flags"), (16, "reserved"), (48, "nonce")]


class HelloCase:
    """A hello as a hostile peer sends it, and what follows it."""

    def __init__(self, sent, done, ending, garbage, garbage_after_proof, sizes):
        self.sent = sent          # the hello bytes, corrupted as `done` says, maybe cut short
        self.done = done          # what was done to it, for the statistics
        self.ending = ending      # after a cut: "close" or "reset"
        self.garbage = garbage    # bytes sent after the hello ...
        self.garbage_after_proof = garbage_after_proof  # ... before or after the proof
        self.sizes = sizes        # the sends the bytes are cut into

    def verdict(self, receiver_has_key):
        """(exception, message words) or (None, []); and whether the peer sends a proof."""
        expected, words = hello_verdict(self.sent, receiver_has_key)
        proves = expected is None and receiver_has_key
        if proves and self.garbage and not self.garbage_after_proof:
            expected, words = AuthenticationError, []  # garbage read as (part of) the proof
        if self.ending == "reset":
            words = []  # still ProtocolError, but the reset may overtake the bytes before it
        event(f"outcome: {'success' if expected is None else expected.__name__}")
        for what in sorted(set(self.done)) or ["none"]:
            event(f"corruption: {what}")
        return expected, words, proves

    def play(self, sock, proof_after_hello, frames):
        """Send the case on `sock`: the hello, then the garbage, the proof and the frames (or,
        after a cut hello, the end of the connection)."""
        if len(self.sent) < HELLO.size:
            send_chunks(sock, cut(self.sent, self.sizes))
            end_connection(sock, self.ending)
            return
        if self.garbage_after_proof:
            rest = proof_after_hello + self.garbage
        else:
            rest = self.garbage + proof_after_hello
        send_chunks(sock, cut(self.sent + rest + frames.wire, self.sizes))

    def check(self, got, expected, words, impl, frames, sock):
        """`got` (accept()'s or Client()'s outcome) is the expected one; the peer's frames are
        delivered only after a successful handshake; a failed one closes the connection."""
        try:
            assert_outcome(got, expected, impl)
            for word in words:
                assert word in str(got)
            if expected is None and self.garbage:
                with pytest.raises(ProtocolError):  # the garbage, read as a frame header
                    got.recv_bytes(timeout=IO_TIMEOUT)
            elif expected is None:
                frames.assert_received_by(got)
                return
        finally:
            close_if_channel(got)
        frames.assert_never_delivered()
        if self.ending != "reset":
            assert_closed_by_other_side(sock)


@st.composite
def hello_cases(draw, has_key):
    data = bytearray(make_hello(FLAG_AUTH if has_key else 0))
    done = []
    for what in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if what == "flip":
            index = draw(st.one_of(st.integers(0, HELLO.size - 1), st.integers(8, 15)))
            data[index] ^= draw(st.integers(1, 255))
            what = "flip " + next(name for end, name in HELLO_FIELDS if index < end)
        elif what == "magic":
            data[0:8] = draw(st.binary(min_size=8, max_size=8))
        elif what == "version":
            data[8:10] = struct.pack("<H", draw(st.integers(0, 0xFFFF)))
        elif what == "flags":
            data[10:12] = struct.pack("<H", draw(st.integers(0, 0xFFFF)))
        elif what == "reserved":
            data[12:16] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
        else:
            data[16:48] = draw(st.binary(min_size=32, max_size=32))
        done.append(what)
    ending, garbage, after_proof = "close", b"", False
    if draw(st.integers(0, 4)) == 0:
        data = data[:draw(st.integers(0, HELLO.size - 1))]
        ending = draw(st.sampled_from(["close", "reset"]))
        done.append(f"cut then {ending}")
    elif draw(st.integers(0, 3)) == 0:
        # The first byte is never a valid frame kind, so the garbage is never a frame.
        garbage = bytes([draw(st.sampled_from([0, *range(4, 256)]))]) + draw(st.binary(max_size=40))
        after_proof = has_key and draw(st.booleans())
        done.append("garbage after the proof" if after_proof else "garbage")
    return HelloCase(bytes(data), done, ending, garbage, after_proof, draw(chunk_sizes))


# ---- 1. corrupted hellos ---------------------------------------------------------------------

@each_impl
@_settings(max_examples=200)
@given(has_key=st.booleans(), key=keys, data=st.data())
def test_a_corrupted_client_hello_has_the_documented_outcome_at_the_listener(
        impl, has_key, key, data):
    key = key if has_key else None
    case = data.draw(hello_cases(has_key), "case")
    expected, words, proves = case.verdict(has_key)
    frames = PeerFrames()
    with channels_of(impl), \
            loopfast.Listener(authkey=key, handshake_timeout=HANDSHAKE_TIMEOUT) as listener:
        with raw_connect(listener.address) as raw:
            accepting = Background(listener.accept)
            listener_hello = recv_exact(raw, HELLO.size)  # sent without waiting for ours
            assert_valid_hello(listener_hello, has_key)
            own_proof = proof(key, CONNECTOR_LABEL, case.sent, listener_hello) if proves else b""
            case.play(raw, own_proof, frames)
            case.check(outcome_of(accepting), expected, words, impl, frames, raw)
        if expected is not None:
            assert_serves_a_good_client(listener, key, impl)


@each_impl
@_settings(max_examples=200)
@given(has_key=st.booleans(), key=keys, data=st.data())
def test_a_corrupted_listener_hello_has_the_documented_outcome_at_the_client(
        impl, has_key, key, data):
    key = key if has_key else None
    case = data.draw(hello_cases(has_key), "case")
    expected, words, proves = case.verdict(has_key)
    frames = PeerFrames()
    with channels_of(impl), fake_listener() as fake:
        connecting = Background(loopfast.Client, fake.getsockname(), authkey=key,
                                timeout=HANDSHAKE_TIMEOUT)
        with accept_raw(fake) as conn:
            client_hello = recv_exact(conn, HELLO.size)  # sent without waiting for ours
            assert_valid_hello(client_hello, has_key)
            own_proof = proof(key, LISTENER_LABEL, case.sent, client_hello) if proves else b""
            case.play(conn, own_proof, frames)
            got = outcome_of(connecting)
            if key is None:
                # Client returned a channel once connected; its first use (poll, which delivers
                # nothing) checks the hello. What follows the hello is left to case.check.
                assert type(got) is impl, f"expected a {impl.__module__}.Channel, got {got!r}"
                got = first_use_outcome(got, lambda client: client.poll(IO_TIMEOUT))
            case.check(got, expected, words, impl, frames, conn)


# ---- 2. bad proofs ---------------------------------------------------------------------------

ATTACKS = ["wrong key", "flipped bits", "truncated then close", "truncated then reset",
           "truncated then frames",
           "replayed session", "replayed proof", "other label", "swapped hellos", "reflected"]
ENDINGS = {"truncated then close": "close", "truncated then reset": "reset"}


@st.composite
def proof_attacks(draw, key):
    attack = draw(st.sampled_from(ATTACKS))
    if attack == "wrong key":
        # Any other key (b"k" against b"k\0" included: different keys make different proofs).
        return attack, draw(keys.map(lambda k: k + b"!" if k == key else k))
    if attack == "flipped bits":  # distinct bytes, each changed: never the right proof
        return attack, draw(st.dictionaries(st.integers(0, PROOF_SIZE - 1), st.integers(1, 255),
                                            min_size=1, max_size=4))
    if attack.startswith("truncated"):
        return attack, draw(st.integers(0, PROOF_SIZE - 1))
    return attack, None


def bad_proof(attack, param, key, own_label, own_hello, peer_hello):
    """The proof the attacking peer sends for `attack` (not the replay or reflection ones)."""
    right = proof(key, own_label, own_hello, peer_hello)
    if attack == "wrong key":
        return proof(param, own_label, own_hello, peer_hello)
    if attack == "flipped bits":
        flipped = bytearray(right)
        for index, mask in param.items():
            flipped[index] ^= mask
        return bytes(flipped)
    if attack.startswith("truncated"):
        return right[:param]
    if attack == "other label":
        other = LISTENER_LABEL if own_label == CONNECTOR_LABEL else CONNECTOR_LABEL
        return proof(key, other, own_hello, peer_hello)
    assert attack == "swapped hellos"
    return proof(key, own_label, peer_hello, own_hello)


def attack_with_a_bad_proof(sock, attack, param, key, own_label, peer_hello, old_hello,
                            old_proof, frames, sizes):
    """Play the attacking side on `sock` once the peer's hello (`peer_hello`) has arrived: a hello
    and a bad proof (or, for "reflected", the peer's own hello and proof sent back), then frames,
    in chunks of `sizes`; the ENDINGS attacks cut the proof and end the connection instead."""
    if attack == "reflected":  # its own hello, then its own proof, back to it
        send_chunks(sock, [peer_hello])
        stream = recv_exact(sock, PROOF_SIZE) + frames.wire
    elif attack == "replayed session":
        stream = old_hello + old_proof + frames.wire
    elif attack == "replayed proof":
        stream = make_hello(FLAG_AUTH) + old_proof + frames.wire
    else:
        own = make_hello(FLAG_AUTH)
        stream = own + bad_proof(attack, param, key, own_label, own, peer_hello)
        if attack not in ENDINGS:
            stream += frames.wire
    send_chunks(sock, cut(stream, sizes))
    if attack in ENDINGS:
        # The other side's proof: it has read our hello; a reset cannot overtake it.
        recv_exact(sock, PROOF_SIZE)
        end_connection(sock, ENDINGS[attack])


@each_impl
@_settings(max_examples=150)
@given(key=keys, data=st.data())
def test_a_bad_client_proof_is_an_authentication_error_at_the_listener(impl, key, data):
    attack, param = data.draw(proof_attacks(key), "attack")
    sizes = data.draw(chunk_sizes, "chunk sizes")
    event(f"attack: {attack}")
    with channels_of(impl), \
            loopfast.Listener(authkey=key, handshake_timeout=HANDSHAKE_TIMEOUT) as listener:
        old_hello = old_proof = old_listener_hello = b""
        if attack.startswith("replayed"):
            old_hello, old_proof, old_listener_hello, _ = record_session(listener, key)
        frames = PeerFrames()
        with raw_connect(listener.address) as raw:
            accepting = Background(listener.accept)
            listener_hello = recv_exact(raw, HELLO.size)
            assert_valid_hello(listener_hello, True)
            if attack == "replayed session":
                assert listener_hello != old_listener_hello  # a fresh nonce
            attack_with_a_bad_proof(raw, attack, param, key, CONNECTOR_LABEL, listener_hello,
                                    old_hello, old_proof, frames, sizes)
            got = outcome_of(accepting)
            close_if_channel(got)
            assert_outcome(got, AuthenticationError, impl)
            if attack != "truncated then reset":
                assert_closed_by_other_side(raw)
        frames.assert_never_delivered()
        assert_serves_a_good_client(listener, key, impl)


@each_impl
@_settings(max_examples=150)
@given(key=keys, data=st.data())
def test_a_bad_listener_proof_is_an_authentication_error_at_the_client(impl, key, data):
    attack, param = data.draw(proof_attacks(key), "attack")
    sizes = data.draw(chunk_sizes, "chunk sizes")
    event(f"attack: {attack}")
    with channels_of(impl):
        old_hello = old_proof = b""
        if attack.startswith("replayed"):  # a real Listener's hello and proof
            with loopfast.Listener(authkey=key, handshake_timeout=HANDSHAKE_TIMEOUT) as real:
                _, _, old_hello, old_proof = record_session(real, key)
        frames = PeerFrames()
        with fake_listener() as fake:
            connecting = Background(loopfast.Client, fake.getsockname(), authkey=key,
                                    timeout=HANDSHAKE_TIMEOUT)
            with accept_raw(fake) as conn:
                client_hello = recv_exact(conn, HELLO.size)
                assert_valid_hello(client_hello, True)
                attack_with_a_bad_proof(conn, attack, param, key, LISTENER_LABEL, client_hello,
                                        old_hello, old_proof, frames, sizes)
                got = outcome_of(connecting)
                close_if_channel(got)
                assert_outcome(got, AuthenticationError, impl)
                if attack != "truncated then reset":
                    assert_closed_by_other_side(conn)
        frames.assert_never_delivered()


# ---- 3. authkey combinations on a real Listener and Client -----------------------------------

optional_keys = st.one_of(st.none(), keys)


@each_impl
@_settings(max_examples=80)
@given(listener_key=optional_keys, same=st.booleans(), other_key=optional_keys)
def test_listener_and_client_connect_iff_their_authkeys_are_equal(
        impl, listener_key, same, other_key):
    client_key = listener_key if same else other_key
    event("keys: equal" if listener_key == client_key else
          "keys: listener only" if client_key is None else
          "keys: client only" if listener_key is None else "keys: different")
    with channels_of(impl), loopfast.Listener(authkey=listener_key,
                                              handshake_timeout=HANDSHAKE_TIMEOUT) as listener:
        accepting = Background(listener.accept)
        try:
            client = loopfast.Client(listener.address, authkey=client_key,
                                     timeout=HANDSHAKE_TIMEOUT)
        except Exception as exc:
            client = exc
        server = outcome_of(accepting)
        try:
            if listener_key == client_key:
                assert type(server) is impl and type(client) is impl
                client.send_bytes(b"to the listener")
                server.send_bytes(b"to the client")
                assert server.recv_bytes(timeout=IO_TIMEOUT) == b"to the listener"
                assert client.recv_bytes(timeout=IO_TIMEOUT) == b"to the client"
            else:
                if client_key is None:
                    # Client returned a channel once connected; its first use raises what the
                    # handshake found.
                    assert type(client) is impl, repr(client)
                    client = first_use_outcome(
                        client, lambda channel: channel.recv_bytes(timeout=IO_TIMEOUT))
                assert type(server) is AuthenticationError, repr(server)
                assert type(client) is AuthenticationError, repr(client)
                # docs/protocol.md: the side with a key says the peer did not authenticate; the
                # side without says the peer requires a key.
                if listener_key is None:
                    assert "requires an authkey" in str(server)
                    assert "did not authenticate" in str(client)
                elif client_key is None:
                    assert "did not authenticate" in str(server)
                    assert "requires an authkey" in str(client)
        finally:
            close_if_channel(server)
            close_if_channel(client)
        assert_serves_a_good_client(listener, listener_key, impl)


@each_impl
@pytest.mark.parametrize("listener_key, client_key", [
    (b"\0", b"\0\0"), (b"key", b"key\0\0"), (b"k" * 65, hashlib.sha256(b"k" * 65).digest())])
def test_authkeys_that_differ_only_in_trailing_zero_bytes_are_different_keys(
        impl, listener_key, client_key):
    with channels_of(impl), loopfast.Listener(authkey=listener_key,
                                              handshake_timeout=HANDSHAKE_TIMEOUT) as listener:
        accepting = Background(listener.accept)
        try:
            client = loopfast.Client(listener.address, authkey=client_key,
                                     timeout=HANDSHAKE_TIMEOUT)
        except Exception as exc:
            client = exc
        server = outcome_of(accepting)
        close_if_channel(server)
        close_if_channel(client)
        assert type(server) is AuthenticationError, repr(server)
        assert type(client) is AuthenticationError, repr(client)


# ---- 4. a valid handshake in tiny writes -----------------------------------------------------

messages = st.lists(st.binary(max_size=100), min_size=1, max_size=3)


@each_impl
@_settings(max_examples=100)
@given(key=optional_keys, sizes=tiny_chunk_sizes, msgs=messages)
def test_a_valid_client_handshake_in_tiny_writes_succeeds_at_the_listener(impl, key, sizes, msgs):
    event(f"authkey: {key is not None}")
    with channels_of(impl), \
            loopfast.Listener(authkey=key, handshake_timeout=HANDSHAKE_TIMEOUT) as listener, \
            raw_connect(listener.address) as raw:
        accepting = Background(listener.accept)
        listener_hello = recv_exact(raw, HELLO.size)
        assert_valid_hello(listener_hello, key is not None)
        own = make_hello(0 if key is None else FLAG_AUTH)
        own_proof = b"" if key is None else proof(key, CONNECTOR_LABEL, own, listener_hello)
        stream = own + own_proof + b"".join(frame(m) for m in msgs)
        assert send_chunks(raw, cut(stream, sizes))
        server = outcome_of(accepting)
        try:
            assert type(server) is impl, repr(server)
            assert [server.recv_bytes(timeout=IO_TIMEOUT) for _ in msgs] == msgs
        finally:
            close_if_channel(server)
        if key is not None:  # and the listener's proof is the documented one
            assert recv_exact(raw, PROOF_SIZE) == proof(key, LISTENER_LABEL, listener_hello, own)


@each_impl
@_settings(max_examples=100)
@given(key=optional_keys, sizes=tiny_chunk_sizes, msgs=messages)
def test_a_valid_listener_handshake_in_tiny_writes_succeeds_at_the_client(impl, key, sizes, msgs):
    event(f"authkey: {key is not None}")
    with channels_of(impl), fake_listener() as fake:
        connecting = Background(loopfast.Client, fake.getsockname(), authkey=key,
                                timeout=HANDSHAKE_TIMEOUT)
        with accept_raw(fake) as conn:
            client_hello = recv_exact(conn, HELLO.size)
            assert_valid_hello(client_hello, key is not None)
            own = make_hello(0 if key is None else FLAG_AUTH)
            own_proof = b"" if key is None else proof(key, LISTENER_LABEL, own, client_hello)
            stream = own + own_proof + b"".join(frame(m) for m in msgs)
            assert send_chunks(conn, cut(stream, sizes))
            client = outcome_of(connecting)
            try:
                assert type(client) is impl, repr(client)
                assert [client.recv_bytes(timeout=IO_TIMEOUT) for _ in msgs] == msgs
            finally:
                close_if_channel(client)
            if key is not None:  # and the client's proof is the documented one
                assert recv_exact(conn, PROOF_SIZE) == proof(key, CONNECTOR_LABEL, client_hello,
                                                             own)
