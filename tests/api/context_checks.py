"""Scenarios for tests/api/test_context.py, each run in a fresh interpreter (install() changes the
whole process): python tests/api/context_checks.py SCENARIO START_METHOD. Prints "ok" at the
end; any
failed check raises. Every wait is bounded."""

import multiprocessing
import multiprocessing.connection
import multiprocessing.queues
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import loopfast

TIMEOUT = 60.0


class Unpicklable:
    def __reduce__(self):
        raise AttributeError("cannot pickle this")


def double(x):
    return x * 2


def total(array):
    return float(array.sum())


def die(_):
    os.kill(os.getpid(), signal.SIGKILL)


def pid_of(_):
    return os.getpid()


def queue_kind(queue):
    return type(queue._reader).__module__.split(".")[0]


def child_makes_queue(result):
    """In the child: the queue it makes is on loopfast when install() reached the child."""
    result.put(queue_kind(multiprocessing.Queue()))


def feed(queue, count):
    for i in range(count):
        queue.put(("item", i, b"x" * (i % 300)))


def is_loopfast(queue):
    return queue_kind(queue) == "loopfast"


def check_pools(ctx):
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        assert list(ex.map(double, range(3000))) == [2 * x for x in range(3000)]
        assert ex.submit(double, 21).result(timeout=TIMEOUT) == 42
        # An argument that cannot be pickled fails its future, not the pool.
        bad = ex.submit(double, Unpicklable())
        try:
            bad.result(timeout=TIMEOUT)
        except AttributeError:
            pass
        else:
            raise AssertionError("an unpicklable argument did not fail its future")
        assert ex.submit(double, 4).result(timeout=TIMEOUT) == 8
        assert is_loopfast(ex._call_queue) and is_loopfast(ex._result_queue)
    with ctx.Pool(2) as pool:
        assert pool.map(double, range(3000), chunksize=1) == [2 * x for x in range(3000)]
        assert is_loopfast(pool._inqueue) and is_loopfast(pool._outqueue)
        try:
            import numpy
        except ImportError:
            pass
        else:  # large buffers travel out of band, in both directions
            arrays = [numpy.arange(200_000, dtype=numpy.float64) for _ in range(4)]
            assert pool.map(total, arrays) == [float(a.sum()) for a in arrays]
            back = pool.apply_async(numpy.ones, (300_000,)).get(TIMEOUT)
            assert back.shape == (300_000,) and float(back.sum()) == 300_000.0
    with ctx.Pool(2, maxtasksperchild=3) as pool:
        pids = pool.map(pid_of, range(30), chunksize=1)
        assert len(set(pids)) >= 10, pids  # each worker takes 3 tasks, then is replaced


def check_queues(ctx):
    q = ctx.Queue()
    assert is_loopfast(q)
    writers = [ctx.Process(target=feed, args=(q, 500)) for _ in range(3)]
    for w in writers:
        w.start()
    got = [q.get(timeout=TIMEOUT) for _ in range(1500)]
    for w in writers:
        w.join(TIMEOUT)
    assert sorted(i for _, i, _ in got) == sorted(list(range(500)) * 3)
    assert q.empty()
    try:
        q.get(timeout=0.05)
    except multiprocessing.queues.Empty:
        pass
    else:
        raise AssertionError("an empty queue returned an item")
    q.close()
    q.join_thread()
    jq = ctx.JoinableQueue()
    assert is_loopfast(jq)
    jq.put(1)
    assert jq.get(timeout=TIMEOUT) == 1
    jq.task_done()
    jq.join()
    sq = ctx.SimpleQueue()
    assert is_loopfast(sq)
    sq.put({"a": 1})
    assert sq.get() == {"a": 1} and sq.empty()
    sq.close()


def check_broken_pool(ctx):
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        future = ex.submit(die, None)
        try:
            future.result(timeout=TIMEOUT)
        except BrokenProcessPool:
            pass
        else:
            raise AssertionError("a killed worker did not break the pool")


def scenario_context(method):
    ctx = loopfast.get_context(method)
    assert ctx.get_start_method() == method and ctx.get_context() is ctx
    assert loopfast.get_context(method) is ctx
    assert type(ctx.Pipe()[0]).__module__.startswith("loopfast")
    assert not loopfast.installed()
    check_queues(ctx)
    check_pools(ctx)
    check_broken_pool(ctx)
    # A stock context is untouched.
    assert queue_kind(multiprocessing.get_context(method).Queue()) == "multiprocessing"
    assert queue_kind(multiprocessing.get_context(method).SimpleQueue()) == "multiprocessing"


def scenario_install(method):
    before = multiprocessing.get_context(method).Queue()
    loopfast.install()
    loopfast.install()  # idempotent
    assert loopfast.installed()
    ctx = multiprocessing.get_context(method)
    assert type(multiprocessing.Pipe()[0]).__module__.startswith("loopfast")
    assert type(multiprocessing.connection.Pipe(False)[0]).__module__.startswith("loopfast")
    check_queues(ctx)
    check_pools(ctx)
    check_broken_pool(ctx)
    # The children started under install() run it too.
    result = ctx.Queue()
    child = ctx.Process(target=child_makes_queue, args=(result,))
    child.start()
    assert result.get(timeout=TIMEOUT) == "loopfast"
    child.join(TIMEOUT)
    # What existed before is not switched, and still works.
    assert queue_kind(before) == "multiprocessing"
    before.put(1)
    assert before.get(timeout=TIMEOUT) == 1
    kept = ctx.Queue()
    loopfast.uninstall()
    loopfast.uninstall()  # idempotent
    assert not loopfast.installed()
    assert queue_kind(ctx.Queue()) == "multiprocessing"
    assert type(multiprocessing.Pipe()[0]).__module__.startswith("multiprocessing")
    kept.put("still")  # made while installed: keeps its loopfast pipe, keeps working
    assert kept.get(timeout=TIMEOUT) == "still" and is_loopfast(kept)
    child = ctx.Process(target=child_makes_queue, args=(result,))
    child.start()
    assert result.get(timeout=TIMEOUT) == "multiprocessing"
    child.join(TIMEOUT)


def scenario_install_late(method):
    """install() with a pool already running (and, for forkserver, the server started): it
    says what it does not switch, the old pool keeps working on multiprocessing's pipes, and
    what is made afterwards (also in children of an already running forkserver) is on
    loopfast."""
    import warnings
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(1) as pool:
        assert pool.apply(double, (1,)) == 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loopfast.install()
        messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
        assert len(messages) == 1 and "not switched" in messages[0], messages
        assert queue_kind(pool._inqueue) == "multiprocessing"
        assert pool.map(double, range(100)) == [2 * x for x in range(100)]
    result = ctx.Queue()
    child = ctx.Process(target=child_makes_queue, args=(result,))
    child.start()
    assert result.get(timeout=TIMEOUT) == "loopfast"
    child.join(TIMEOUT)
    check_queues(ctx)


if __name__ == "__main__":
    import faulthandler
    # A hang shows where, then ends the run.
    faulthandler.dump_traceback_later(int(os.environ.get('CHECK_HANG_AFTER', 240)), exit=True)
    scenario, start_method = sys.argv[1], sys.argv[2]
    started = time.monotonic()
    globals()["scenario_" + scenario](start_method)
    print("ok", round(time.monotonic() - started, 1))
