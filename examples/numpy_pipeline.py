"""A three-stage numpy pipeline between processes: producer -> transformer -> consumer.

The producer makes arrays, the transformer scales them, the consumer (this process) checks every
one. Each hop is a one-way ``loopfast.Pipe(duplex=False)``, and arrays travel with plain
``send(array)`` / ``recv()``: loopfast pickles at protocol 5 with the array's memory out of
band, so a sender writes the array to the socket straight from its own memory and a receiver
reads it straight into the memory of the array it returns, with no copy of the data in either
process. A full socket makes ``send`` wait, so a fast producer cannot run ahead of a slow
consumer without bound.

Run it (needs numpy)::

    python examples/numpy_pipeline.py                          # 20 arrays of 1 M float64
    python examples/numpy_pipeline.py --arrays 100 --size 4000000

It prints one line, such as ``pipeline ok: 20 arrays of 1000000 float64 (8.0 MB each)
through 3 processes``, and exits 0 when every array arrived transformed and intact.
"""

import argparse
import multiprocessing
import sys
import time

import numpy as np

import loopfast

SCALE = 3.0
TIMEOUT = 30.0  # seconds: every receive is bounded


def make_array(index: int, size: int) -> np.ndarray:
    """The producer's array number `index`: values the consumer can check."""
    return np.arange(size, dtype=np.float64) + index


def producer(out: loopfast.Channel, arrays: int, size: int) -> None:
    with out:
        for index in range(arrays):
            out.send((index, make_array(index, size)))  # the array's memory goes out of band
        out.send(None)  # end of stream


def transformer(source: loopfast.Channel, out: loopfast.Channel) -> None:
    with source, out:
        while True:
            item = source.recv(timeout=TIMEOUT)
            if item is None:
                out.send(None)
                return
            index, array = item
            array *= SCALE  # received arrays are writable: transform in place, no new array
            out.send((index, array))


def start(target, *args) -> multiprocessing.Process:
    process = multiprocessing.Process(target=target, args=args, name=target.__name__)
    process.start()
    for channel in args:
        if isinstance(channel, loopfast.Channel):
            channel.close()  # the child has its own copy now
    return process


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arrays", type=int, default=20, help="arrays to send (default 20)")
    parser.add_argument("--size", type=int, default=1_000_000,
                        help="float64 elements per array (default 1000000)")
    args = parser.parse_args(argv)

    # duplex=False: the first end only receives, the second only sends.
    transformer_in, producer_out = loopfast.Pipe(duplex=False)
    consumer_in, transformer_out = loopfast.Pipe(duplex=False)
    started = time.perf_counter()
    processes = [start(producer, producer_out, args.arrays, args.size),
                 start(transformer, transformer_in, transformer_out)]

    received, bad = 0, []
    with consumer_in:
        while True:
            item = consumer_in.recv(timeout=TIMEOUT)
            if item is None:
                break
            index, array = item
            if not np.array_equal(array, make_array(index, args.size) * SCALE):
                bad.append(index)
            received += 1
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join(TIMEOUT)

    failed = [p.name for p in processes if p.exitcode != 0]
    if bad or failed or received != args.arrays:
        print(f"pipeline FAILED: {received} of {args.arrays} arrays received, wrong: {bad}, "
              f"failed stages: {failed}")
        return 1
    megabytes = args.size * 8 / 1e6
    print(f"pipeline ok: {args.arrays} arrays of {args.size} float64 ({megabytes:.1f} MB each) "
          f"through 3 processes in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
