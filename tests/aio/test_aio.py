"""loopfast.aio: AsyncChannel, open_channel and the asyncio Listener, on both channel
implementations and under both the default event loop and uvloop (skipped when not installed).

Every test runs its coroutine on a fresh loop under asyncio.wait_for(RECV_TIMEOUT); waits for a
condition inside a test (`until`) are bounded by that too.
"""

import asyncio
import gc
import pickle
import select
import socket
import warnings

import pytest
from conftest import (
    RECV_TIMEOUT,
    Background,
    child_process,
    connected_pair,
    frame,
    make_payload,
)

import loopfast
from loopfast import aio

try:
    import uvloop
except ImportError:
    uvloop = None

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop if uvloop else None}
BIG = 64 * 1024 * 1024


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """run(async_fn, *args): run async_fn(*args) to completion on a fresh loop of the
    parametrized kind, bounded by RECV_TIMEOUT; the loop is closed afterwards."""
    factory = LOOPS[request.param]
    if factory is None:
        pytest.skip("uvloop is not installed (pip install uvloop)")

    def runner(async_fn, *args):
        loop = factory()
        try:
            return loop.run_until_complete(asyncio.wait_for(async_fn(*args), RECV_TIMEOUT))
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return runner


@pytest.fixture
def pair(make_pair):
    """Two connected channels of the implementation under test (closed on teardown)."""
    return make_pair()


async def until(predicate):
    """Wait (bounded by the test's wait_for) until predicate() is true."""
    while not predicate():
        await asyncio.sleep(0.001)


def socket_drained(channel):
    """True when the kernel holds nothing more for `channel` to read."""
    return not select.select([channel.fileno()], [], [], 0)[0]


async def fill_until_blocked(achannel, size):
    """Start sending `size` bytes to a peer that does not read, until the frame has started but
    cannot finish (the core holds its rest). Returns the (pending) send task."""
    task = asyncio.ensure_future(achannel.send_bytes(make_payload(size)))
    await until(lambda: achannel.channel.unsent_bytes > 0 or task.done())
    assert not task.done(), "the whole frame fit in the socket buffers: make it larger"
    return task


# ---- round trips ---------------------------------------------------------------------------------

def test_bytes_round_trip_both_ways(run, pair):
    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        await a.send_bytes(b"hello")
        await a.send_bytes(b"")
        await a.send_bytes(b"0123456789", 2, 3)
        assert [await b.recv_bytes() for _ in range(3)] == [b"hello", b"", b"234"]
        await b.send_bytes(bytearray(b"back"))
        assert await a.recv_bytes() == b"back"

    run(main)


def test_object_round_trip(run, pair):
    message = {"list": [1, 2.5, None], "text": "héllo", "nested": ({"x": b"y"},)}

    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        await a.send(message)
        assert await b.recv() == message
        await b.send(("reply", 42))
        assert await a.recv() == ("reply", 42)

    run(main)


def test_numpy_array_round_trip(run, pair):
    np = pytest.importorskip("numpy")
    array = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)

    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        sent = asyncio.ensure_future(a.send({"array": array, "fortran": np.asfortranarray(array)}))
        got = await b.recv()
        await sent
        assert np.array_equal(got["array"], array) and got["array"].dtype == array.dtype
        assert np.array_equal(got["fortran"], array) and got["fortran"].flags.f_contiguous

    run(main)


def test_recv_bytes_into(run, pair):
    payload = make_payload(300_000)

    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        buf = bytearray(len(payload) + 10)
        sent = asyncio.ensure_future(a.send_bytes(payload))
        assert await b.recv_bytes_into(buf, 10) == len(payload)
        await sent
        assert buf[10:] == payload

    run(main)


def test_recv_bytes_into_too_small_raises_buffer_too_short(run, pair):
    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        await a.send_bytes(b"x" * 100)
        with pytest.raises(loopfast.BufferTooShort) as info:
            await b.recv_bytes_into(bytearray(10))
        assert info.value.args[0] == b"x" * 100

    run(main)


def test_large_messages_both_ways_concurrently(run, pair):
    first, second = make_payload(BIG, seed=1), make_payload(BIG, seed=2)

    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        results = await asyncio.gather(a.send_bytes(first), b.send_bytes(second),
                                       b.recv_bytes(), a.recv_bytes())
        assert results[2] == first
        assert results[3] == second

    run(main)


def test_messages_buffered_by_the_core_are_received_without_waiting(run, pair):
    """Many small messages arrive in one recv() of the core: each later receive takes the next
    from its buffer (the reader callback is not needed for them)."""
    messages = [str(i).encode() * (i % 7) for i in range(500)]

    async def main():
        a = aio.AsyncChannel(pair[0])
        for message in messages:
            pair[1].send_bytes(message)
        assert [await a.recv_bytes() for _ in messages] == messages

    run(main)


# ---- end of stream, errors, timeouts -------------------------------------------------------------

def test_async_for_yields_messages_until_eof(run, pair):
    async def main():
        a = aio.AsyncChannel(pair[0])
        for i in range(5):
            pair[1].send(i)
        pair[1].close()
        assert [message async for message in a] == list(range(5))

    run(main)


def test_recv_raises_eof_error_when_the_peer_closes(run, pair):
    async def main():
        a = aio.AsyncChannel(pair[0])
        receiving = asyncio.ensure_future(a.recv_bytes())
        await asyncio.sleep(0.01)
        pair[1].close()
        with pytest.raises(EOFError):
            await receiving

    run(main)


def test_garbage_raises_protocol_error_and_closes(run, pair):
    async def main():
        a = aio.AsyncChannel(pair[0])
        pair[1]._send_raw(b"\xff" * 16 + b"not a loopfast frame")
        with pytest.raises(loopfast.ProtocolError):
            await a.recv_bytes()
        assert a.closed
        with pytest.raises(OSError):
            await a.recv_bytes()

    run(main)


def test_peer_vanishing_mid_message_raises_protocol_error(run, pair):
    async def main():
        a = aio.AsyncChannel(pair[0])
        pair[1]._send_raw(frame(make_payload(1000))[:500])
        pair[1].close()
        with pytest.raises(loopfast.ProtocolError):
            await a.recv_bytes()

    run(main)


def test_wait_for_timeout_leaves_the_stream_intact(run, pair):
    async def main():
        a = aio.AsyncChannel(pair[0])
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(a.recv(), 0.05)
        pair[1].send("late")
        assert await a.recv() == "late"

    run(main)


def test_poll(run, pair):
    async def main():
        a = aio.AsyncChannel(pair[0])
        assert await a.poll() is False
        assert await a.poll(0.02) is False
        pair[1].send_bytes(b"x")
        assert await a.poll(None) is True
        assert await a.recv_bytes() == b"x"

    run(main)


def test_send_bytes_many_and_recv_bytes_many(run, pair):
    messages = [b"m%d" % i * (i % 7) for i in range(5000)] + [make_payload(3_000_000)]

    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        sending = asyncio.ensure_future(a.send_bytes_many(iter(messages)))  # any iterable
        got = []
        while len(got) < len(messages):
            got += await b.recv_bytes_many()
        await sending
        assert got == messages
        await a.send_bytes_many([b"x", b"y", b"z"])
        assert await b.recv_bytes_many(max_messages=2) == [b"x", b"y"]
        assert await b.recv_bytes_many() == [b"z"]

    run(main)


def test_a_cancelled_send_bytes_many_sends_all_or_none(run, pair):
    """Cancelled while the socket is full: either none of its messages went out, or all did."""
    batch = [make_payload(1_000_000, seed=i) for i in range(40)]

    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        first = await fill_until_blocked(a, 32 * 1024 * 1024)
        many = asyncio.ensure_future(a.send_bytes_many(batch))
        await asyncio.sleep(0.01)
        many.cancel()
        assert await b.recv_bytes() == make_payload(32 * 1024 * 1024)
        await first
        await a.send_bytes(b"end")
        got = []
        while not got or got[-1] != b"end":
            got += await b.recv_bytes_many()
        assert got in ([b"end"], [*batch, b"end"])

    run(main)


# ---- cancellation --------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1000, 2_000_000], ids=["buffered", "direct"])
def test_cancelled_recv_mid_message_keeps_it_for_the_next_recv(run, pair, size):
    """Half a message has been read by the core when the receive is cancelled: the next receive
    returns the message whole. (Small: kept in the receive buffer; large: read into its final
    object, which the core keeps.)"""
    payload = make_payload(size)
    data = frame(payload)

    async def main():
        a = aio.AsyncChannel(pair[0])
        receiving = asyncio.ensure_future(a.recv_bytes())
        pair[1]._send_raw(data[:len(data) // 2])
        await until(lambda: socket_drained(pair[0]))
        await asyncio.sleep(0)
        receiving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiving
        pair[1]._send_raw(data[len(data) // 2:])
        pair[1].send_bytes(b"next")
        assert await a.recv_bytes() == payload
        assert await a.recv_bytes() == b"next"

    run(main)


def test_cancelled_send_mid_frame_still_finishes_the_frame(run, pair):
    """No further send comes: the channel's drain task writes the rest of the frame."""
    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        sending = await fill_until_blocked(a, 32 * 1024 * 1024)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert await b.recv_bytes() == make_payload(32 * 1024 * 1024)
        await a.send_bytes(b"next")
        assert await b.recv_bytes() == b"next"

    run(main)


def test_send_after_a_cancelled_send_waits_for_its_rest(run, pair):
    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        sending = await fill_until_blocked(a, 32 * 1024 * 1024)
        sending.cancel()
        following = asyncio.ensure_future(a.send_bytes(b"after"))
        assert await b.recv_bytes() == make_payload(32 * 1024 * 1024)
        assert await b.recv_bytes() == b"after"
        await following

    run(main)


def test_cancelled_send_that_had_not_started_sends_nothing(run, pair):
    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        first = await fill_until_blocked(a, 32 * 1024 * 1024)
        second = asyncio.ensure_future(a.send_bytes(b"second"))
        await asyncio.sleep(0.01)
        assert not second.done()
        second.cancel()
        assert await b.recv_bytes() == make_payload(32 * 1024 * 1024)
        await first
        await a.send_bytes(b"third")
        assert await b.recv_bytes() == b"third"

    run(main)


def receive_then_eof(channel):
    """(the next message, the exception the receive after it raises)"""
    message = channel.recv_bytes(timeout=RECV_TIMEOUT)
    try:
        channel.recv_bytes(timeout=RECV_TIMEOUT)
    except (EOFError, OSError) as exc:
        return message, exc
    return message, None


def test_aclose_finishes_the_rest_of_a_cancelled_send(run, pair):
    payload = make_payload(32 * 1024 * 1024)

    async def main():
        a = aio.AsyncChannel(pair[0])
        sending = await fill_until_blocked(a, len(payload))
        sending.cancel()
        reading = Background(receive_then_eof, pair[1])
        await a.aclose()
        got, after = await asyncio.get_running_loop().run_in_executor(None, reading.result)
        assert got == payload
        assert isinstance(after, EOFError)

    run(main)


def test_connection_lost_while_finishing_a_frame_closes_with_a_clear_error(run, pair):
    async def main():
        a = aio.AsyncChannel(pair[0])
        sending = await fill_until_blocked(a, 32 * 1024 * 1024)
        sending.cancel()
        pair[1].close()
        await until(lambda: a.closed)
        with pytest.raises(OSError, match="rest of a started message"):
            await a.send_bytes(b"next")

    run(main)


def test_aclose_wakes_a_pending_recv(run, pair):
    async def main():
        a = aio.AsyncChannel(pair[0])
        receiving = asyncio.ensure_future(a.recv())
        await asyncio.sleep(0.01)
        await a.aclose()
        with pytest.raises(OSError, match="closed"):
            await receiving
        assert pair[0].closed

    run(main)


# ---- backpressure and concurrency ----------------------------------------------------------------

def test_send_waits_when_the_peer_does_not_read_and_buffers_at_most_one_frame(run, pair):
    size = 1024 * 1024

    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])
        sent = 0
        blocked = None
        for i in range(200):  # 200 MiB: far more than any socket buffer
            task = asyncio.ensure_future(a.send_bytes(make_payload(size, seed=i)))
            await asyncio.sleep(0.05)
            if not task.done():
                blocked = task
                break
            await task
            sent += 1
        assert blocked is not None, "200 MiB went into the socket buffers of a peer not reading"
        assert a.channel.unsent_bytes <= size + 16
        for i in range(sent + 1):
            assert await b.recv_bytes() == make_payload(size, seed=i)
        await blocked

    run(main)


def test_many_concurrent_senders_never_interleave_frames(run, pair):
    senders, per_sender = 40, 15

    def message(sender, seq):
        return pickle.dumps((sender, seq)) + make_payload(((sender * 7 + seq) % 5) * 50_000)

    async def main():
        a, b = aio.AsyncChannel(pair[0]), aio.AsyncChannel(pair[1])

        async def sender(k):
            for seq in range(per_sender):
                await a.send_bytes(message(k, seq))

        tasks = asyncio.gather(*(sender(k) for k in range(senders)))
        seen = {k: [] for k in range(senders)}
        for _ in range(senders * per_sender):
            data = await b.recv_bytes()
            k, seq = pickle.loads(data)
            assert data == message(k, seq)
            seen[k].append(seq)
        await tasks
        assert seen == {k: list(range(per_sender)) for k in range(senders)}

    run(main)


def test_concurrent_receivers_each_get_whole_messages(run, pair):
    async def main():
        b = aio.AsyncChannel(pair[1])
        receivers = [asyncio.ensure_future(b.recv_bytes()) for _ in range(10)]
        for i in range(10):
            pair[0].send_bytes(make_payload(100_000, seed=i))
        got = await asyncio.gather(*receivers)
        assert got == [make_payload(100_000, seed=i) for i in range(10)]

    run(main)


# ---- a sync end in a child process ---------------------------------------------------------------

def _child_echo(channel, parents_end=None):
    if parents_end is not None:
        parents_end.close()  # a forked child's copy: the parent's close must reach us as EOF
    while True:
        try:
            message = channel.recv(timeout=RECV_TIMEOUT)
        except EOFError:
            return
        channel.send(("echo", message))


def test_async_channel_talks_to_a_sync_pipe_end_in_a_child(run, start_method):
    ours, theirs = loopfast.Pipe()

    async def main():
        a = aio.AsyncChannel(ours)
        async with a:
            for message in [1, "two", {"three": [3]}, make_payload(500_000)]:
                await a.send(message)
                assert await a.recv() == ("echo", message)

    inherited = ours if start_method == "fork" else None
    with child_process(start_method, _child_echo, theirs, inherited, close_after_start=(theirs,)):
        run(main)


def test_async_channel_of_either_implementation_talks_to_a_child(run, impl, start_method):
    ours, theirs = connected_pair(impl, loopfast.Channel)

    async def main():
        async with aio.AsyncChannel(ours) as a:
            await a.send(["ping"])
            assert await a.recv() == ("echo", ["ping"])

    inherited = ours if start_method == "fork" else None
    with child_process(start_method, _child_echo, theirs, inherited, close_after_start=(theirs,)):
        run(main)


# ---- open_channel and the Listener ---------------------------------------------------------------

@pytest.mark.parametrize("authkey", [None, b"secret"], ids=["no-key", "authkey"])
def test_open_channel_and_accept(run, family, authkey):
    async def main():
        async with await aio.start_listener(family=family, authkey=authkey) as listener:
            accepting = asyncio.ensure_future(listener.accept())
            client = await aio.open_channel(listener.address, authkey=authkey)
            server = await accepting
            assert listener.last_accepted is not None
            async with client, server:
                await client.send("hi")
                assert await server.recv() == "hi"
                await server.send_bytes(b"back")
                assert await client.recv_bytes() == b"back"

    run(main)


def test_wrong_authkey_raises_authentication_error_on_both_sides(run):
    async def main():
        async with aio.Listener(authkey=b"right") as listener:
            accepting = asyncio.ensure_future(listener.accept())
            with pytest.raises(loopfast.AuthenticationError):
                await aio.open_channel(listener.address, authkey=b"wrong")
            with pytest.raises(loopfast.AuthenticationError):
                await accepting

    run(main)


def test_missing_authkey_raises_authentication_error(run):
    async def main():
        async with aio.Listener(authkey=b"key") as listener:
            accepting = asyncio.ensure_future(listener.accept())
            with pytest.raises(loopfast.AuthenticationError):
                await aio.open_channel(listener.address)
            with pytest.raises(loopfast.AuthenticationError):
                await accepting

    run(main)


def test_open_channel_to_a_sync_listener(run):
    with loopfast.Listener(authkey=b"k") as listener:
        accepted = Background(listener.accept)

        async def main():
            async with await aio.open_channel(listener.address, authkey=b"k") as client:
                server = await asyncio.get_running_loop().run_in_executor(None, accepted.result)
                with server:
                    server.send({"from": "sync"})
                    assert await client.recv() == {"from": "sync"}

        run(main)


def test_accept_times_out_on_a_silent_client(run):
    async def main():
        async with aio.Listener(handshake_timeout=0.2) as listener:
            with socket.create_connection(listener.address):
                with pytest.raises(TimeoutError, match="handshake"):
                    await listener.accept()

    run(main)


@pytest.mark.parametrize("stall", [b"", b"LOOPFAST\x01"], ids=["silent", "half-hello"])
def test_a_stalled_client_does_not_hold_up_the_next_one(run, stall):
    """Serial handshakes would make accept() wait out the stalled client's 20 s and raise."""
    async def main():
        async with aio.Listener(authkey=b"k", handshake_timeout=20) as listener:
            with socket.create_connection(listener.address) as stalled:
                stalled.sendall(stall)
                accepting = asyncio.ensure_future(listener.accept())
                await asyncio.sleep(0.05)  # the stalled connection is taken in first
                async with await aio.open_channel(listener.address, authkey=b"k") as client:
                    async with await asyncio.wait_for(accepting, RECV_TIMEOUT) as server:
                        await client.send_bytes(b"through")
                        assert await server.recv_bytes() == b"through"

    run(main)


def test_a_peer_that_is_not_loopfast_is_refused_at_its_first_wrong_byte(run):
    async def main():
        async with aio.Listener(handshake_timeout=60) as listener:
            with socket.create_connection(listener.address) as raw:
                raw.sendall(b"GET ")
                with pytest.raises(loopfast.ProtocolError, match="not a loopfast channel"):
                    await asyncio.wait_for(listener.accept(), RECV_TIMEOUT)

    run(main)


def test_closing_the_listener_disconnects_unfinished_handshakes(run):
    async def main():
        listener = aio.Listener(handshake_timeout=20)
        with socket.create_connection(listener.address) as stalled:
            stalled.settimeout(RECV_TIMEOUT)
            accepting = asyncio.ensure_future(listener.accept())
            async with await aio.open_channel(listener.address) as client, \
                    await asyncio.wait_for(accepting, RECV_TIMEOUT):
                assert not client.closed
            listener.close()
            loop = asyncio.get_running_loop()
            data = b""
            while True:  # the listener's hello, then the end of the connection
                chunk = await loop.run_in_executor(None, stalled.recv, 4096)
                if not chunk:
                    break
                data += chunk
            assert data[:8] == b"LOOPFAST" and len(data) == 48

    run(main)


def test_open_channel_times_out_on_a_silent_server(run):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)

        async def main():
            with pytest.raises(TimeoutError):
                await aio.open_channel(silent.getsockname(), handshake_timeout=0.2)

        run(main)


def test_open_channel_refused(run):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()  # bound, not listening: connecting is refused

        async def main():
            with pytest.raises(ConnectionRefusedError):
                await aio.open_channel(address)

        run(main)


def test_close_wakes_a_pending_accept(run):
    async def main():
        listener = aio.Listener()
        accepting = asyncio.ensure_future(listener.accept())
        await asyncio.sleep(0.01)
        listener.close()
        with pytest.raises(OSError, match="closed"):
            await accepting

    run(main)


def test_no_resource_warnings(run):
    async def main():
        async with await aio.start_listener(authkey=b"k") as listener:
            accepting = asyncio.ensure_future(listener.accept())
            async with await aio.open_channel(listener.address, authkey=b"k") as client:
                async with await accepting as server:
                    await client.send_bytes(b"x")
                    assert await server.recv_bytes() == b"x"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(main)
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]
