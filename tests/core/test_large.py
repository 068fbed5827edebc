"""One 2.5 GiB message, there and back between two processes (no 2 GiB limit anywhere).

Each side holds one copy of the payload (about 2.5 GiB per process): the parent sends from a
numpy array and receives the echo back into the same array with recv_bytes_into; the child
receives with recv_bytes (one bytes object) and sends that object back.
"""

import hashlib
import multiprocessing

import pytest
from conftest import available_memory, child_process, make_payload

import loopfast

GiB = 1024**3
MiB = 1024**2
SIZE = 5 * GiB // 2  # 2.5 GiB: above 2**31, so every 32-bit length or chunk limit is crossed
CHUNK = 1 * MiB
TRANSFER_TIMEOUT = 600.0  # bound only; the transfer normally takes seconds
SAMPLE_COUNT = 97


def _sample_offsets(size):
    step = size // SAMPLE_COUNT
    return [i * step for i in range(SAMPLE_COUNT)] + [size - 64]


def _samples(buf):
    view = memoryview(buf).cast("B")
    return [bytes(view[off:off + 64]) for off in _sample_offsets(len(view))]


def _digest(buf):
    return hashlib.sha256(buf).digest()


def _echo_large(ch, size):
    data = ch.recv_bytes(timeout=TRANSFER_TIMEOUT)
    assert len(data) == size, f"child got {len(data)} bytes, expected {size}"
    ch.send((len(data), _digest(data), _samples(data)), timeout=TRANSFER_TIMEOUT)
    ch.send_bytes(data, timeout=TRANSFER_TIMEOUT)
    del data
    ch.close()


def _fill_pattern(np, arr):
    """Fill with a 1 MiB pseudo-random block repeated, each copy stamped with its index, so that
    a misplaced or repeated chunk changes the hash."""
    rows = arr[: len(arr) // CHUNK * CHUNK].reshape(-1, CHUNK)
    rows[:] = np.frombuffer(make_payload(CHUNK), dtype=np.uint8)
    rows[:, :8] = np.arange(len(rows), dtype="<u8").view(np.uint8).reshape(-1, 8)
    tail = len(rows) * CHUNK
    arr[tail:] = np.frombuffer(make_payload(len(arr) - tail, seed=1), dtype=np.uint8)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_2_5_gib_message_round_trips_between_two_processes():
    np = pytest.importorskip("numpy")
    available = available_memory()
    if available < 8 * GiB:
        have = "an unknown amount" if not available else f"{available / GiB:.1f} GiB"
        pytest.skip("needs 8 GiB of available memory (2.5 GiB per process plus headroom); "
                    f"this machine has {have}")
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    a, b = loopfast.Pipe()
    # The child starts before the big buffer exists, so it shares none of it.
    with a, child_process(method, _echo_large, b, SIZE, close_after_start=[b]):
        buf = np.empty(SIZE, dtype=np.uint8)
        _fill_pattern(np, buf)
        expected_digest = _digest(buf)
        expected_samples = _samples(buf)

        a.send_bytes(buf, timeout=TRANSFER_TIMEOUT)
        buf[:] = 0  # receive the echo into the same memory
        length, child_digest, child_samples = a.recv(timeout=TRANSFER_TIMEOUT)
        assert length == SIZE
        assert child_samples == expected_samples
        assert child_digest == expected_digest

        assert a.recv_bytes_into(buf, timeout=TRANSFER_TIMEOUT) == SIZE
        assert _samples(buf) == expected_samples
        assert _digest(buf) == expected_digest
