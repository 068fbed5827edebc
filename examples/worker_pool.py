"""A pool of worker processes fed over loopfast channels.

Each worker is a ``multiprocessing.Process`` that gets one end of a ``loopfast.Pipe()`` as its
argument (channels pass to child processes under every start method, as multiprocessing's own
connections do). The parent keeps the other ends, hands out tasks a few at a time to whichever
worker has answered (``loopfast.wait``), collects the results, and stops each worker with a
sentinel (``None``). A worker also stops when the parent's end goes away (``EOFError``).

Run it::

    python examples/worker_pool.py                      # 3 workers, 300 tasks
    python examples/worker_pool.py --workers 8 --tasks 100000

It prints one line, such as ``pool ok: 300 tasks on 3 workers, sum of results 24012450``, and
exits 0 when every result is right.
"""

import argparse
import multiprocessing
import sys

import loopfast

STOP = None  # the sentinel: "no more tasks, exit"
IN_FLIGHT = 4  # tasks a worker holds at a time: it never waits for the next one, none hoards
TIMEOUT = 30.0  # seconds: no wait in this example is unbounded


def work(task: int) -> int:
    """The work itself: a stand-in for something worth a process."""
    return sum(i * i for i in range(task % 100))


def worker(channel: loopfast.Channel) -> None:
    """Runs in each worker process: answer tasks until the sentinel or the parent's exit."""
    with channel:
        while True:
            try:
                task = channel.recv()
            except EOFError:  # the parent closed its end: nothing more will come
                return
            if task is STOP:
                return
            channel.send((task, work(task)))


def run_pool(tasks: list, workers: int) -> dict:
    """Run `work` on every task in `workers` processes; return {task: result}."""
    processes, channels = [], []
    try:
        for number in range(workers):
            ours, theirs = loopfast.Pipe()
            process = multiprocessing.Process(target=worker, args=(theirs,),
                                              name=f"worker-{number}")
            process.start()
            theirs.close()  # the worker has its own copy; ours would hide its exit from us
            processes.append(process)
            channels.append(ours)

        todo = iter(tasks)
        pending = {channel: 0 for channel in channels}  # tasks sent and not yet answered

        def hand_out(channel: loopfast.Channel, count: int) -> None:
            for task in todo:
                channel.send(task)
                pending[channel] += 1
                count -= 1
                if count == 0:
                    return

        for channel in channels:
            hand_out(channel, IN_FLIGHT)
        results = {}
        while any(pending.values()):
            busy = [channel for channel, count in pending.items() if count]
            ready = loopfast.wait(busy, timeout=TIMEOUT)
            if not ready:
                raise TimeoutError(f"no result from any worker in {TIMEOUT:g} s")
            for channel in ready:
                task, result = channel.recv()  # EOFError here: a worker died
                results[task] = result
                pending[channel] -= 1
                hand_out(channel, 1)  # one answered: it gets the next task

        for channel in channels:
            channel.send(STOP)
        for process in processes:
            process.join(TIMEOUT)
            if process.exitcode != 0:
                raise RuntimeError(f"{process.name} exited with status {process.exitcode}")
        return results
    finally:
        for channel in channels:
            channel.close()  # a worker still running sees EOFError and exits
        for process in processes:
            process.join(TIMEOUT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--tasks", type=int, default=300, help="tasks to run (default 300)")
    args = parser.parse_args(argv)

    tasks = list(range(args.tasks))
    results = run_pool(tasks, args.workers)
    expected = {task: work(task) for task in tasks}
    if results != expected:
        wrong = sorted(task for task in tasks if results.get(task) != expected[task])
        print(f"pool FAILED: {len(wrong)} wrong or missing results, first: task {wrong[0]}")
        return 1
    print(f"pool ok: {len(tasks)} tasks on {args.workers} workers, "
          f"sum of results {sum(results.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
