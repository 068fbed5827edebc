"""Resources: no file descriptor, memory or reference leak over thousands of channels and a
million messages; ResourceWarning for what is dropped unclosed; a clear error at the process's
file-descriptor limit, with every descriptor of the failed call released.

File descriptors are counted in /proc/self/fd (skipped where there is none). Memory is compared
between the end of a warm-up and the end of the run, after gc.collect().
"""

import errno
import gc
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import tracemalloc
import warnings

import pytest
from conftest import (
    HELLO,
    IMPLEMENTATIONS,
    RECV_TIMEOUT,
    Background,
    connected_pair,
)

import loopfast

HAVE_PROC_FD = os.path.isdir("/proc/self/fd")
needs_proc_fd = pytest.mark.skipif(not HAVE_PROC_FD, reason="needs /proc/self/fd")


def open_fds():
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True, scope="module")
def _peer_identity_socket():
    """The netlink socket that tells a TCP peer's user is made on first use and kept for the
    process: make it before any test counts descriptors."""
    with loopfast.Listener() as listener:
        with loopfast.Client(listener.address, timeout=RECV_TIMEOUT), listener.accept():
            pass


def warmed(listener):
    """`listener` after one good connection: its selector (kept while it is open) and the
    process's peer-identity socket (kept for the process) exist before a test counts fds."""
    server = Background(listener.accept)
    loopfast.Client(listener.address, authkey=listener._authkey, timeout=RECV_TIMEOUT).close()
    server.result().close()
    return listener


# ---- file descriptors: thousands of channels --------------------------------------------------

@needs_proc_fd
def test_thousands_of_pipes_opened_and_closed_leave_no_fd():
    for end in loopfast.Pipe():  # warm-up: anything created lazily on first use
        end.close()
    gc.collect()
    before = open_fds()
    for i in range(2000):
        a, b = loopfast.Pipe(duplex=bool(i % 2))
        a.close()
        b.close()
    assert open_fds() == before


@needs_proc_fd
def test_thousands_of_channel_pairs_of_each_implementation_leave_no_fd(impl):
    before = open_fds()
    for _ in range(2000):
        a, b = connected_pair(impl, impl)
        a.close()
        b.close()
    assert open_fds() == before


@needs_proc_fd
def test_thousands_of_listener_client_connections_leave_no_fd():
    count = 2000
    before = open_fds()
    with loopfast.Listener(authkey=b"key", backlog=16) as listener:

        def serve():
            for _ in range(count):
                with listener.accept() as channel:
                    channel.send_bytes(channel.recv_bytes(timeout=RECV_TIMEOUT))

        server = Background(serve)
        for i in range(count):
            with loopfast.Client(listener.address, authkey=b"key", timeout=RECV_TIMEOUT) as c:
                c.send_bytes(b"%d" % i)
                assert c.recv_bytes(timeout=RECV_TIMEOUT) == b"%d" % i
        server.result()
    assert open_fds() == before


# ---- file descriptors: channels ended by errors -------------------------------------------------

@needs_proc_fd
def test_a_protocol_error_closes_the_channel_and_its_fd(make_pair):
    a, b = make_pair()
    before = open_fds()
    os.write(a.fileno(), b"\xee" * 16)  # not a frame header
    with pytest.raises(loopfast.ProtocolError):
        b.recv_bytes(timeout=RECV_TIMEOUT)
    assert b.closed
    assert open_fds() == before - 1


@needs_proc_fd
def test_a_channel_closed_after_eof_leaves_no_fd(make_pair):
    a, b = make_pair()
    before = open_fds()
    a.close()
    with pytest.raises(EOFError):
        b.recv_bytes(timeout=RECV_TIMEOUT)
    b.close()
    assert open_fds() == before - 2


@needs_proc_fd
def test_a_garbage_handshake_leaves_no_fd_on_the_listening_side():
    with warmed(loopfast.Listener()) as listener:
        before = open_fds()
        with socket.create_connection(listener.address, timeout=RECV_TIMEOUT) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * HELLO.size)
            with pytest.raises(loopfast.ProtocolError):
                listener.accept()
        assert open_fds() == before


@needs_proc_fd
def test_a_garbage_handshake_leaves_no_fd_on_the_connecting_side():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def answer_garbage():
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"\x00" * HELLO.size)
                conn.recv(HELLO.size)

        peer = Background(answer_garbage)
        before = open_fds()
        # Without an authkey Client returns once connected; the first use reads the garbage
        # hello, raises, and closes the channel.
        client = loopfast.Client(server.getsockname(), timeout=RECV_TIMEOUT)
        try:
            with pytest.raises(loopfast.ProtocolError):
                client.recv(timeout=RECV_TIMEOUT)
            peer.result()  # the peer thread's own socket is closed too before counting
            assert open_fds() == before
        finally:
            client.close()


@needs_proc_fd
def test_a_refused_authkey_leaves_no_fd_on_either_side():
    with warmed(loopfast.Listener(authkey=b"right")) as listener:
        before = open_fds()
        server = Background(listener.accept)
        with pytest.raises(loopfast.AuthenticationError):
            loopfast.Client(listener.address, authkey=b"wrong", timeout=RECV_TIMEOUT)
        with pytest.raises(loopfast.AuthenticationError):
            server.result()
        assert open_fds() == before


@needs_proc_fd
def test_a_handshake_timeout_leaves_no_fd():
    with warmed(loopfast.Listener(handshake_timeout=0.2)) as listener:
        before = open_fds()
        with socket.create_connection(listener.address, timeout=RECV_TIMEOUT):
            with pytest.raises(TimeoutError):
                listener.accept()  # the client never says hello
            assert open_fds() == before + 1  # only the silent client's own socket
        assert open_fds() == before


# ---- memory and references over a million messages ----------------------------------------------

SMALL = b"m" * 48


def _exchange(a, b, scale):
    """About `scale` * 1,000,000 messages a -> b, through every send and receive method."""
    batch = [SMALL] * 1000
    for _ in range(int(800 * scale)):  # 800k: send_bytes_many / recv_bytes_many
        a.send_bytes_many(batch, timeout=RECV_TIMEOUT)
        got = 0
        while got < len(batch):
            got += len(b.recv_bytes_many(timeout=RECV_TIMEOUT))
    for _ in range(int(1500 * scale)):  # 150k: send_bytes / recv_bytes
        for _ in range(100):
            a.send_bytes(SMALL, timeout=RECV_TIMEOUT)
        for _ in range(100):
            b.recv_bytes(timeout=RECV_TIMEOUT)
    buf = bytearray(64)
    for _ in range(int(500 * scale)):  # 50k: recv_bytes_into
        for _ in range(100):
            a.send_bytes(SMALL, timeout=RECV_TIMEOUT)
        for _ in range(100):
            b.recv_bytes_into(buf, timeout=RECV_TIMEOUT)
    for _ in range(int(200 * scale)):  # 20k: pickled objects, in band
        for _ in range(100):
            a.send(("obj", 1, 2.0), timeout=RECV_TIMEOUT)
        for _ in range(100):
            b.recv(timeout=RECV_TIMEOUT)
    oob = bytearray(8192)
    for _ in range(int(5000 * scale)):  # 5k: pickle-5 with an out-of-band PickleBuffer
        a.send(pickle.PickleBuffer(oob), timeout=RECV_TIMEOUT)
        assert len(b.recv(timeout=RECV_TIMEOUT)) == len(oob)


def _rss():
    """Resident set size in bytes (None where /proc/self/statm is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _usage():
    gc.collect()
    refs = sys.gettotalrefcount() if hasattr(sys, "gettotalrefcount") else None
    return {"blocks": sys.getallocatedblocks(), "objects": len(gc.get_objects()), "refs": refs,
            "rss": _rss()}


# Bounds on growth over the million messages, after a warm-up of 50,000. A leak of one object, one
# reference or one small block per message, even in the rarest path exercised (5,000 object
# messages), grows these counts by >= 5,000; what is left is noise (caches, the test's own
# locals). RSS: a leak of 8 bytes per message would add 8 MB; an 8 KiB buffer leaked per object
# message 40 MB. 8 MiB leaves room for the allocator keeping freed pages.
MAX_BLOCKS = 2000
MAX_OBJECTS = 500
MAX_REFS = 2000
MAX_RSS = 8 * 1024 * 1024
# The compiled channel's C buffers (PyMem_Malloc) are traced by tracemalloc, not counted by
# getallocatedblocks(): their net growth over the run must stay under 64 KiB (one 256 KiB
# receive buffer leaked per channel, or 16 bytes per message, would be far more).
MAX_TRACED = 64 * 1024


def test_a_million_messages_leak_no_memory_and_no_references(impl):
    a, b = connected_pair(impl, impl)
    try:
        traced = impl is IMPLEMENTATIONS.get("compiled")  # the pure one runs ~10x slower traced
        if traced:
            tracemalloc.start()
        _exchange(a, b, 0.05)  # warm-up
        start = _usage()
        start_traced = tracemalloc.get_traced_memory()[0] if traced else 0
        _exchange(a, b, 1.0)
        end = _usage()
        end_traced = tracemalloc.get_traced_memory()[0] if traced else 0
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        a.close()
        b.close()
    growth = {key: end[key] - start[key] for key in start if start[key] is not None}
    print("growth over 1,025,000 messages:", growth, "traced:", end_traced - start_traced)
    assert growth["blocks"] < MAX_BLOCKS, growth
    assert growth["objects"] < MAX_OBJECTS, growth
    if "refs" in growth:
        assert growth["refs"] < MAX_REFS, growth
    if "rss" in growth:
        assert growth["rss"] < MAX_RSS, growth
    assert end_traced - start_traced < MAX_TRACED


# ---- ResourceWarning ----------------------------------------------------------------------------

def _resource_warnings(drop):
    """Run drop() (which lets go of the last references) and return the ResourceWarnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drop()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_pipe_ends_dropped_without_close_warn_and_release_their_fds():
    holder = list(loopfast.Pipe())
    fds = [end.fileno() for end in holder]
    messages = _resource_warnings(holder.clear)
    assert sorted(messages) == sorted(
        f"unclosed <loopfast.Channel fd={fd} mode='rw'>" for fd in fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_channel_pair_dropped_without_close_warns_for_each_end(impl):
    holder = list(connected_pair(impl, impl))
    fds = [end.fileno() for end in holder]
    messages = _resource_warnings(holder.clear)
    assert sorted(messages) == sorted(
        f"unclosed <loopfast.Channel fd={fd} mode='rw'>" for fd in fds)


def test_closed_channels_give_no_warning(impl):
    holder = list(connected_pair(impl, impl))

    def close_and_drop():
        for end in holder:
            end.close()
        holder.clear()

    assert _resource_warnings(close_and_drop) == []


def test_a_listener_dropped_without_close_warns():
    holder = [loopfast.Listener()]
    messages = _resource_warnings(holder.clear)
    assert len(messages) == 1
    assert messages[0].startswith("unclosed <socket.socket")


def test_a_closed_listener_gives_no_warning():
    holder = [loopfast.Listener()]

    def close_and_drop():
        holder[0].close()
        holder.clear()

    assert _resource_warnings(close_and_drop) == []


# ---- the file-descriptor limit ------------------------------------------------------------------

# Run in a child process with RLIMIT_NOFILE lowered to LIMIT. For 0..4 free descriptors, the call
# either succeeds or raises OSError(EMFILE), and then every descriptor it opened is closed again.
# Descriptors are counted with fstat over 0..LIMIT-1 (listing /proc/self/fd needs one itself).
_AT_THE_LIMIT = textwrap.dedent("""
    import errno, json, os, resource, sys
    import loopfast

    LIMIT = 64
    what, address = sys.argv[1], json.loads(sys.argv[2])

    def count():
        n = 0
        for fd in range(LIMIT):
            try:
                os.fstat(fd)
            except OSError:
                continue
            n += 1
        return n

    def call():
        if what == "Pipe":
            return loopfast.Pipe()
        if what == "Listener":
            return [loopfast.Listener()]
        return [loopfast.Client(tuple(address), timeout=30)]

    if what == "Client":  # the peer-identity socket is made once and kept for the process
        for channel in call():
            channel.close()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, hard))
    results = []
    for free in range(5):
        filler = []
        while True:
            try:
                filler.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                break
        for fd in filler[:free]:
            os.close(fd)
        before = count()
        try:
            objects = call()
        except OSError as exc:
            after = count()
            results.append([free, "error", exc.errno, str(exc), type(exc).__name__,
                            before, after])
        else:
            for obj in objects:
                obj.close()
            results.append([free, "ok", None, "", "", before, count()])
        for fd in filler[free:]:
            os.close(fd)
    print(json.dumps(results))
""")


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "fork"),
                    reason="RLIMIT_NOFILE is POSIX")
@pytest.mark.parametrize("what", ["Pipe", "Listener", "Client"])
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_the_file_descriptor_limit_is_a_clear_oserror_that_leaks_nothing(what, implementation):
    pytest.importorskip("resource")
    env = dict(os.environ)
    env["LOOPFAST_NO_EXTENSIONS"] = "1" if implementation == "pure" else "0"
    with loopfast.Listener() as listener:
        stop = []

        def serve():
            while True:
                try:
                    channel = listener.accept()
                except loopfast.ProtocolError:
                    continue  # a client that hit the limit after connecting gave up
                with channel:
                    if stop:
                        return

        server = Background(serve) if what == "Client" else None
        try:
            child = subprocess.run(
                [sys.executable, "-c", _AT_THE_LIMIT, what, json.dumps(listener.address)],
                env=env, capture_output=True, text=True, timeout=120)
        finally:
            if server is not None:
                stop.append(True)
                loopfast.Client(listener.address, timeout=RECV_TIMEOUT).close()
                server.result()
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout)
    assert results[0][1] == "error", results  # no descriptor free: the call must fail
    for free, outcome, code, message, kind, before, after in results:
        assert after == before, f"{what} with {free} free fds leaked {after - before}: {results}"
        if outcome == "error":
            assert code == errno.EMFILE, results
            assert kind == "OSError", results
            assert "Too many open files" in message, results
