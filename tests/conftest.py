"""Fixtures and helpers shared by the channel, process and large-message tests.

Everything here talks to 127.0.0.1 or ::1 only, and every wait is bounded.
"""

import contextlib
import multiprocessing
import os
import signal
import socket
import struct
import threading
import time

import pytest

import loopfast
from loopfast._core import channel_py as _channel_py
from loopfast._handshake import handshake_pair

try:
    from loopfast._core import channel as _channel
except ImportError:  # no compiled extension: only the twin can be tested
    _channel = None
else:
    # Under LOOPFAST_NO_EXTENSIONS loopfast itself never imports the compiled core; the suite
    # tests both side by side, so it makes the compiled class known to this process too.
    from loopfast._backend import adopt
    adopt(_channel.Channel)

# Upper bounds for waits that should normally end within milliseconds. They only stop a broken
# test from hanging; no test outcome depends on how long anything takes.
RECV_TIMEOUT = 30.0
JOIN_TIMEOUT = 60.0

FAMILIES = ["AF_INET", "AF_INET6"]
START_METHODS = [m for m in ("fork", "spawn") if m in multiprocessing.get_all_start_methods()]

# The wire format, written out from docs/protocol.md rather than imported from loopfast, so that
# the tests check the specification and not merely agree with the code.
HELLO = struct.Struct("<8sHHI32s")
MAGIC = b"LOOPFAST"
PROTOCOL_VERSION = 1
FRAME_HEADER = struct.Struct("<BBHIQ")
KIND_BYTES = 1
KIND_PICKLE = 2


def pytest_collection_modifyitems(config, items):
    """Tests marked `compiled` are skipped, with the reason, where the extension is not built."""
    if _channel is not None:
        return
    skip = pytest.mark.skip(reason="the compiled extension is not built")
    for item in items:
        if "compiled" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    """Which channel implementation this run tests (LOOPFAST_NO_EXTENSIONS=1: the pure one)."""
    return f"loopfast {loopfast.__version__}, implementation: {loopfast.implementation}"


def _ipv6_loopback_available():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


IPV6_AVAILABLE = _ipv6_loopback_available()


def skip_if_family_unavailable(family):
    if family == "AF_INET6" and not IPV6_AVAILABLE:
        pytest.skip("IPv6 loopback (::1) is not available on this machine")


@pytest.fixture(params=FAMILIES)
def family(request):
    """'AF_INET' or 'AF_INET6' (skipped when ::1 is unavailable)."""
    skip_if_family_unavailable(request.param)
    return request.param


@pytest.fixture(params=START_METHODS)
def start_method(request):
    """A multiprocessing start method: 'fork' and 'spawn' where the platform has them."""
    return request.param


@pytest.fixture
def pipe(family):
    """A duplex loopfast.Pipe over the parametrized family; both ends closed on teardown."""
    a, b = loopfast.Pipe(family=family)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


# ---- both implementations ----------------------------------------------------------------------

# The Channel classes: the compiled core and its pure-Python twin. Tests of channel behaviour take
# the `impl` fixture and run on both.
IMPLEMENTATIONS = {"pure": _channel_py.Channel}
if _channel is not None:
    IMPLEMENTATIONS["compiled"] = _channel.Channel


def connected_pair(first_cls, second_cls, first_options=None, second_options=None):
    """Two handshaken channels over 127.0.0.1 (as connection.Pipe builds them): `first_cls` wraps
    the accepted socket (the listener side of the handshake), `second_cls` the connecting one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        listening.settimeout(RECV_TIMEOUT)
        connecting = socket.create_connection(listening.getsockname(), timeout=RECV_TIMEOUT)
        try:
            accepted, _ = listening.accept()
        except BaseException:
            connecting.close()
            raise
    try:
        first = first_cls(accepted.fileno(), **(first_options or {}))
    except BaseException:
        accepted.close()
        connecting.close()
        raise
    accepted.detach()
    try:
        second = second_cls(connecting.fileno(), **(second_options or {}))
    except BaseException:
        first.close()
        connecting.close()
        raise
    connecting.detach()
    handshake_pair(first, second, os.urandom(32), RECV_TIMEOUT)
    return first, second


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
    """The Channel class under test: the compiled one or the pure-Python twin."""
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
def make_pair(impl):
    """make_pair(first_options, second_options) -> a connected pair of `impl` channels, closed
    on teardown."""
    made = []

    def make(first_options=None, second_options=None):
        pair = connected_pair(impl, impl, first_options, second_options)
        made.extend(pair)
        return pair

    yield make
    for channel in made:
        channel.close()


# ---- a hand-written peer: a raw socket that speaks the wire protocol itself ----------------------

def frame(payload, kind=KIND_BYTES):
    """One complete frame (header + payload) as the protocol spells it."""
    return FRAME_HEADER.pack(kind, 0, 0, 0, len(payload)) + bytes(payload)


def recv_exact(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"peer closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def raw_connection(family):
    """Return (channel, raw_socket): a loopfast Channel accepted by a Listener, and the plain
    socket on the other end, which did the (unauthenticated) handshake by hand. The socket has
    TCP_NODELAY, so each send() of it reaches the channel as its own segment."""
    with loopfast.Listener(family=family) as listener:
        fam = socket.AF_INET6 if family == "AF_INET6" else socket.AF_INET
        raw = socket.socket(fam, socket.SOCK_STREAM)
        try:
            raw.settimeout(RECV_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.connect(listener.address)
            raw.sendall(HELLO.pack(MAGIC, PROTOCOL_VERSION, 0, 0, os.urandom(32)))
            channel = listener.accept()
            magic, version, flags, _, _ = HELLO.unpack(recv_exact(raw, HELLO.size))
            assert (magic, version, flags) == (MAGIC, PROTOCOL_VERSION, 0)
        except BaseException:
            raw.close()
            raise
    return channel, raw


@pytest.fixture
def raw_peer(family):
    """(channel, raw socket peer) over the parametrized family; both closed on teardown."""
    channel, raw = raw_connection(family)
    try:
        yield channel, raw
    finally:
        channel.close()
        raw.close()


# ---- background work with bounded joins ----------------------------------------------------------

class Background:
    """Run fn(*args, **kwargs) in a daemon thread; result() joins (bounded) and re-raises its
    exception."""

    def __init__(self, fn, *args, **kwargs):
        self._result = None
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self._result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test thread by result()
            self._error = exc

    def done(self):
        return not self._thread.is_alive()

    def result(self, timeout=JOIN_TIMEOUT):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"background thread still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


def send_all_bytes(channel, messages, timeout=RECV_TIMEOUT):
    for message in messages:
        channel.send_bytes(message, timeout=timeout)


def recv_n_bytes(channel, count, timeout=RECV_TIMEOUT):
    return [channel.recv_bytes(timeout=timeout) for _ in range(count)]


# ---- Ctrl-C --------------------------------------------------------------------------------------

def _sigint_main_thread():
    # What Ctrl-C does to a single-threaded program. pthread_kill makes sure the main thread (the
    # one blocked in the channel, and the one Python runs signal handlers in) gets the signal even
    # on systems that would hand a process-wide signal to the timer thread.
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        os.kill(os.getpid(), signal.SIGINT)


def call_with_ctrl_c(fn, delay=0.2):
    """Run fn() while SIGINT reaches the main thread `delay` s in; return (what fn raised or
    returned, seconds fn took). A KeyboardInterrupt that only fires after fn() is done (fn
    ignored the signal) is caught here and reported as "late", so it cannot abort the session."""
    # Python's own Ctrl-C handler, even when the test run started with SIGINT ignored (as a
    # background job of a non-interactive shell does).
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(delay, _sigint_main_thread)
    outcome, elapsed = "late KeyboardInterrupt", None
    try:
        start = time.monotonic()
        try:
            timer.start()
            outcome = ("returned", fn())
        except BaseException as exc:  # the test inspects it
            outcome = exc
        finally:
            elapsed = time.monotonic() - start
            timer.cancel()
            timer.join(RECV_TIMEOUT)  # a call: a pending SIGINT is handled by now, in this try
    except KeyboardInterrupt:
        outcome = "late KeyboardInterrupt"
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    return outcome, elapsed


def assert_interrupted_promptly(outcome, elapsed):
    assert isinstance(outcome, KeyboardInterrupt), f"expected KeyboardInterrupt, got {outcome!r}"
    # Only proves that the 60 s timeout was not waited out; not a speed requirement.
    assert elapsed < 50



# ---- child processes -----------------------------------------------------------------------------

@contextlib.contextmanager
def child_process(method, target, *args, exitcode=0, close_after_start=()):
    """Start target(*args) in a child process with the given start method and yield it.

    The objects in `close_after_start` (the parent's copies of the child's channel ends) are
    closed right after start(), so that the child's exit is seen as EOF. On leaving the block the
    child is joined with a bounded wait (and killed if it overstays) and its exit code checked
    (exitcode=None: not checked). If the block raises, the child is killed.
    """
    ctx = multiprocessing.get_context(method)
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    for obj in close_after_start:
        obj.close()
    try:
        yield proc
    except BaseException:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        raise
    proc.join(JOIN_TIMEOUT)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
        pytest.fail(f"child process did not exit within {JOIN_TIMEOUT} s")
    if exitcode is not None:
        assert proc.exitcode == exitcode, f"child exited with {proc.exitcode}, expected {exitcode}"


def run_in_child(method, target, *args, timeout=JOIN_TIMEOUT):
    """Run target(*args) to completion in a child process; return its exit code."""
    ctx = multiprocessing.get_context(method)
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
        pytest.fail(f"child process did not exit within {timeout} s")
    return proc.exitcode


_payload_cache = {}


def make_payload(size, seed=0):
    """`size` pseudo-random bytes, the same for the same (size, seed) (cached: the big ones are
    reused by several tests)."""
    key = (size, seed)
    if key not in _payload_cache:
        import random

        if len(_payload_cache) > 16:
            _payload_cache.clear()
        _payload_cache[key] = random.Random(f"{size}-{seed}").randbytes(size)
    return _payload_cache[key]


def buffer_rich_object(np, big=0):
    """An object whose pickle-5 form carries out-of-band buffers (numpy arrays in C and Fortran
    order, bytearrays, empty ones) next to in-band data. `big` adds a numpy array of that many
    bytes."""
    obj = {
        "floats": np.arange(300_000, dtype=np.float64),
        "fortran": np.asfortranarray(np.arange(20_000, dtype=np.int32).reshape(100, 200)),
        "bytearray": bytearray(make_payload(200 * 1024)),
        "tiny": bytearray(b"ab"),
        "empty": bytearray(),
        "empty_array": np.zeros(0, dtype=np.int16),
        "bytes": make_payload(100 * 1024, seed=3),
        "nested": [1, {"x": np.arange(5, dtype=np.uint8)}, ("t", None)],
    }
    if big:
        obj["big"] = np.frombuffer(make_payload(big, seed=4), dtype=np.uint8).copy()
    return obj


def assert_same_object(got, expected):
    """Deep equality that understands numpy arrays (dtype, shape, order and values)."""
    try:
        import numpy as np
    except ImportError:
        np = None
    assert type(got) is type(expected), f"{type(got)} is not {type(expected)}"
    if np is not None and isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.flags.f_contiguous == expected.flags.f_contiguous
        assert got.flags.c_contiguous == expected.flags.c_contiguous
        assert np.array_equal(got, expected)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_same_object(got[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_same_object(g, e)
    else:
        assert got == expected


# ---- the machine ---------------------------------------------------------------------------------

MiB = 1024 * 1024


def socket_buffer_bound():
    """More than the kernel can hold in the send and receive buffers of one loopback connection,
    so that sending that much to a peer that does not read must stop part-way."""
    total = 0
    for name in ("tcp_wmem", "tcp_rmem"):
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                total += int(f.read().split()[2])
        except (OSError, ValueError, IndexError):
            total += 16 * MiB
    return max(32 * MiB, 4 * total)


def available_memory():
    """Bytes of memory available to a new allocation (0 if the system does not say)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
