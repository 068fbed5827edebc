"""loopfast.get_context() and loopfast.install(): multiprocessing's queues, pools and
ProcessPoolExecutor on loopfast channels (issue 12).

install() changes the whole process, so its scenarios run in a fresh interpreter each
(tests/api/context_checks.py, for every start method); the queue semantics are checked here, in
process, on queues of a loopfast context (which changes nothing outside them). Both run on the
compiled channel and on the twin (LOOPFAST_NO_EXTENSIONS=1 reaches the child interpreters too).
"""

import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from queue import Empty, Full

import pytest
from conftest import Background

import loopfast
from loopfast import _queues

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIO_TIMEOUT = 240
TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(300)

METHODS = [m for m in ("fork", "spawn", "forkserver")
           if m in multiprocessing.get_all_start_methods()]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scenario", ["context", "install", "install_late"])
def test_scenario_in_a_fresh_interpreter(scenario, method):
    """Queues (3 writer processes), JoinableQueue, SimpleQueue, ProcessPoolExecutor (map, submit,
    an argument that cannot be pickled, a killed worker: BrokenProcessPool), Pool (map with
    chunksize=1, numpy arrays both ways, maxtasksperchild), children that make their own queues
    (on loopfast under install(), on multiprocessing after uninstall())."""
    env = dict(os.environ, CHECK_HANG_AFTER=str(SCENARIO_TIMEOUT - 20))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "context_checks.py"), scenario,
                           method], capture_output=True, text=True, timeout=SCENARIO_TIMEOUT,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}")


# ---- contexts ----------------------------------------------------------------------------------

def test_get_context_is_multiprocessing_s_context_with_loopfast_pipes():
    for method in METHODS:
        ctx = loopfast.get_context(method)
        assert ctx is loopfast.get_context(method)
        assert ctx.get_start_method() == method
        assert isinstance(ctx, type(multiprocessing.get_context(method)))
        assert ctx.get_context() is ctx and ctx.get_context(method) is ctx
        assert ctx.Process is multiprocessing.get_context(method).Process
        assert method in repr(ctx)
        assert pickle.loads(pickle.dumps(ctx)) is ctx
        a, b = ctx.Pipe()
        with a, b:
            assert type(a) in loopfast._backend.CHANNEL_TYPES
            a.send("x")
            assert b.recv(timeout=TIMEOUT) == "x"


def test_get_context_default_and_unknown_method():
    default = multiprocessing.get_start_method(allow_none=True) or \
        multiprocessing.get_context()._name
    assert loopfast.get_context().get_start_method() == default
    assert loopfast.get_context(None) is loopfast.get_context(default)
    with pytest.raises(ValueError):
        loopfast.get_context("no-such-method")


def test_stock_queues_are_untouched_by_loopfast():
    ctx = multiprocessing.get_context()
    for queue in (ctx.Queue(), ctx.SimpleQueue(), ctx.JoinableQueue()):
        assert type(queue._reader).__module__.startswith("multiprocessing")
        assert type(getattr(queue, "_buffer", None)) is not _queues._FeedBuffer
    q = ctx.Queue()
    q.put({"k": 1})
    assert q.get(timeout=TIMEOUT) == {"k": 1}
    q.close()
    q.join_thread()
    assert not loopfast.installed()


# ---- Queue semantics on a loopfast pipe (in process: feeder thread and reader in one) --------

@pytest.fixture
def ctx():
    return loopfast.get_context()


@pytest.fixture
def queue(ctx):
    q = ctx.Queue()
    yield q
    q.close()
    q.join_thread()


def test_queue_is_on_loopfast(queue):
    assert type(queue._reader) in loopfast._backend.CHANNEL_TYPES
    assert type(queue._buffer) is _queues._FeedBuffer


def test_small_put_is_written_by_the_caller(queue):
    """A put after a pause, an idle feeder, an uncontended lock and room in the socket: put()
    writes the message itself, so it is readable the moment put() returns (through the feeder it
    would not be yet, every time)."""
    for i in range(200):
        time.sleep(_queues.DIRECT_PUT_IDLE_NS / 1e9 * 2)
        queue.put(i)
        assert queue._reader.poll(0), i
        assert queue.get(timeout=TIMEOUT) == i
    assert len(queue._buffer) == 0


def test_order_and_content_across_every_path(queue):
    """Small messages written at once, a socket that fills up (nobody reads while 20 MB are put:
    put() never blocks, writes go partly out and the feeder finishes them), large ones through
    the feeder, in one writer's order."""
    items = []
    for i in range(3000):
        size = (i * 7919) % 70_000 if i % 10 else 300_000
        items.append((i, bytes([i % 251]) * size))
    started = time.monotonic()
    for item in items:
        queue.put(item)
    assert time.monotonic() - started < TIMEOUT  # put() did not wait for a reader
    got = [queue.get(timeout=TIMEOUT) for _ in items]
    assert got == items
    assert queue.empty()


def test_threads_putting_keep_each_thread_s_order(queue):
    def put_many(tag):
        for i in range(2000):
            queue.put((tag, i, b"z" * (i % 5000)))

    threads = [threading.Thread(target=put_many, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    seen = {t: [] for t in range(4)}
    for _ in range(8000):
        tag, i, _pad = queue.get(timeout=TIMEOUT)
        seen[tag].append(i)
    for t in threads:
        t.join(TIMEOUT)
    assert all(seen[t] == list(range(2000)) for t in range(4))


def test_numpy_array_crosses_out_of_band(queue):
    np = pytest.importorskip("numpy")
    array = np.arange(3_000_000, dtype=np.float64).reshape(1000, 3000)
    queue.put({"a": array, "tag": 1})
    queue.put(2)
    got = queue.get(timeout=TIMEOUT)
    assert got["tag"] == 1 and got["a"].shape == array.shape and (got["a"] == array).all()
    assert got["a"].flags.writeable
    assert queue.get(timeout=TIMEOUT) == 2


class Unpicklable:
    def __reduce__(self):
        raise AttributeError("cannot pickle this")


def test_unpicklable_object_takes_the_feeder_error_path(ctx):
    """As multiprocessing: put() returns, the feeder reports the error to
    _on_queue_feeder_error(exc, obj) (concurrent.futures relies on it), the slot is given
    back and the queue goes on working."""
    reported = []

    class ReportingQueue(multiprocessing.queues.Queue):
        def _on_queue_feeder_error(self, exc, obj):
            reported.append((type(exc), type(obj)))

    q = ReportingQueue(maxsize=2, ctx=ctx)
    try:
        q.put(Unpicklable())
        q.put(1)
        assert q.get(timeout=TIMEOUT) == 1
        deadline = time.monotonic() + TIMEOUT
        while not reported and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reported == [(AttributeError, Unpicklable)]
        q.put(2, timeout=TIMEOUT)  # both slots are free again
        q.put(3, timeout=TIMEOUT)
        assert [q.get(timeout=TIMEOUT), q.get(timeout=TIMEOUT)] == [2, 3]
    finally:
        q.close()
        q.join_thread()


def test_get_timeout_full_and_closed(ctx):
    q = ctx.Queue(maxsize=2)
    started = time.monotonic()
    with pytest.raises(Empty):
        q.get(timeout=0.2)
    assert 0.15 <= time.monotonic() - started < TIMEOUT
    with pytest.raises(Empty):
        q.get(block=False)
    with pytest.raises(Empty):
        q.get_nowait()
    q.put(1)
    q.put_nowait(2)
    assert q.full()
    with pytest.raises(Full):
        q.put(3, block=False)
    with pytest.raises(Full):
        q.put(3, timeout=0.1)
    if sys.platform != "darwin":
        assert q.qsize() == 2
    assert q.get(timeout=TIMEOUT) == 1 and q.get(timeout=TIMEOUT) == 2
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.put(4)
    with pytest.raises(ValueError, match="is closed"):
        q.get()
    q.join_thread()


def test_joinable_queue(ctx):
    q = ctx.JoinableQueue()
    assert type(q._buffer) is _queues._FeedBuffer
    for i in range(50):
        q.put(i)
    for i in range(50):
        assert q.get(timeout=TIMEOUT) == i
        q.task_done()
    q.join()
    with pytest.raises(ValueError):
        q.task_done()
    q.close()
    q.join_thread()


def test_simple_queue(ctx):
    np = pytest.importorskip("numpy")
    q = ctx.SimpleQueue()
    assert q.empty()
    q.put("first")
    assert not q.empty()
    # 4 MB is more than the socket buffers need hold (under memory pressure the kernel stops
    # growing them): as with multiprocessing's pipe, the put waits for the get.
    putting = Background(lambda: (q.put(np.ones(500_000)), q.put("after")))
    assert q.get() == "first"
    assert float(q.get().sum()) == 500_000.0 and q.get() == "after"
    putting.result()
    assert q.empty()
    q.close()


def test_cancel_join_thread_leaves_without_waiting(ctx):
    q = ctx.Queue()
    q.put("x")
    q.cancel_join_thread()
    q.close()
    q.join_thread()  # returns at once: the join was cancelled


@pytest.mark.skipif(sys.platform == "win32", reason="Unix handle passing")
def test_handle_passing_refuses_a_loopfast_channel_clearly():
    """multiprocessing.reduction.send_handle writes a byte with SCM_RIGHTS straight into the
    socket: over TCP the descriptor is lost and the byte lands in the frame stream. On a loopfast
    channel both ends refuse, before anything is written."""
    from multiprocessing import reduction
    a, b = loopfast.Pipe()
    with a, b:
        with pytest.raises(OSError, match="SCM_RIGHTS"):
            reduction.send_handle(a, a.fileno(), os.getpid())
        with pytest.raises(OSError, match="SCM_RIGHTS"):
            reduction.recv_handle(b)
        a.send_bytes(b"still in step")
        assert b.recv_bytes(timeout=TIMEOUT) == b"still in step"
    r, w = multiprocessing.Pipe()  # multiprocessing's own connections keep passing handles
    with r, w, open(os.devnull, "rb") as f:
        reduction.send_handle(w, f.fileno(), os.getpid())
        fd = reduction.recv_handle(r)
        os.close(fd)
