"""A user program that passes what the buffer protocol accepts (numpy arrays, array, mmap, ...)
to loopfast: tests/package/test_typing.py type-checks it for the oldest Python mypy targets and
for the newest, with mypy --strict. It is never run."""

import array
import asyncio
import mmap

import numpy as np

import loopfast
import loopfast.aio


def sync_program() -> int:
    a, b = loopfast.Pipe()
    arr = np.zeros(16, dtype=np.float64)
    a.send_bytes(arr)
    a.send_bytes(arr, 8, 64)
    a.send_bytes_many([arr, b"x", bytearray(3), memoryview(b"y"), array.array("d", [1.0])])
    out = np.empty(16, dtype=np.float64)
    received: int = b.recv_bytes_into(out)
    received += b.recv_bytes_into(mmap.mmap(-1, 128))
    return received


async def async_program() -> int:
    a, b = loopfast.Pipe()
    aa, ab = loopfast.aio.AsyncChannel(a), loopfast.aio.AsyncChannel(b)
    await aa.send_bytes(np.ones(4))
    await aa.send_bytes_many([np.ones(4), bytearray(2)])
    return await ab.recv_bytes_into(np.empty(4))


if __name__ == "__main__":
    asyncio.run(async_program())
