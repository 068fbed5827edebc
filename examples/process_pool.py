"""An existing concurrent.futures program put on loopfast with one line.

``transform()`` is ordinary ProcessPoolExecutor code: it sends many small tasks and some numpy
arrays to worker processes and collects the results. ``main()`` runs it twice, once on
multiprocessing's own pipes and once after ``loopfast.install()`` (the one line; the code that
uses the pool does not change), checks that both give the same results, and prints how long each
took. (``loopfast.get_context()`` does the same for one executor only:
``ProcessPoolExecutor(mp_context=loopfast.get_context())``.)

Run it::

    python examples/process_pool.py                   # 20000 small tasks, 8 arrays of 8 MiB
    python examples/process_pool.py --tasks 100000 --arrays 32 --workers 4

It prints one line, such as ``process pool ok: 20000 tasks and 8 arrays on 2 workers,
multiprocessing 1.91 s, loopfast 1.02 s (1.87x)``, and exits 0 when both runs agree. The times
are one run each, on whatever else the machine is doing: ``python -m loopfast bench`` measures
this properly (interleaved rounds, medians).
"""

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import loopfast

try:
    import numpy
except ImportError:  # the arrays are left out without numpy
    numpy = None

TIMEOUT = 120.0  # seconds: no wait in this example is unbounded


def score(n: int) -> int:
    """A small task: the kind a pool gets by the thousand."""
    return (n * 2654435761) % 1000003


def column_means(array):
    """A large one: a numpy array crosses to the worker and a result comes back."""
    return array.mean(axis=0)


def transform(tasks: int, arrays: int, workers: int) -> tuple:
    """Ordinary ProcessPoolExecutor code, unaware of loopfast."""
    with ProcessPoolExecutor(workers) as pool:
        scores = list(pool.map(score, range(tasks), chunksize=1, timeout=TIMEOUT))
        means = []
        if numpy is not None and arrays:
            data = [numpy.full((1024, 1024), float(i)) for i in range(arrays)]  # 8 MiB each
            means = [float(m.sum()) for m in pool.map(column_means, data, timeout=TIMEOUT)]
    return sum(scores), means


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20000, help="small tasks (default 20000)")
    parser.add_argument("--arrays", type=int, default=8, help="8 MiB arrays (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    expected = transform(args.tasks, args.arrays, args.workers)
    stock = time.perf_counter() - started

    loopfast.install()  # the one line
    started = time.perf_counter()
    got = transform(args.tasks, args.arrays, args.workers)
    fast = time.perf_counter() - started
    loopfast.uninstall()

    if got != expected:
        print(f"process pool FAILED: results differ ({got!r} != {expected!r})")
        return 1
    arrays = len(got[1])
    print(f"process pool ok: {args.tasks} tasks and {arrays} arrays on {args.workers} workers, "
          f"multiprocessing {stock:.2f} s, loopfast {fast:.2f} s ({stock / fast:.2f}x)")
    return 0


if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
