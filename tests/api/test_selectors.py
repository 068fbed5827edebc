"""fileno() readiness is the truth (issue 11): a receive takes from the socket only the bytes of
the messages it returns, so while messages are queued on an end, every way of asking whether its
descriptor is readable says yes, after each receive, until the last message has been received;
then every one of them says no.

The ways of asking: select.select, selectors.DefaultSelector, select.poll (where it exists),
multiprocessing.connection.wait, asyncio's loop.add_reader, loopfast.wait and Channel.poll. A
receive that read ahead (kept later messages in user space) would leave the descriptor
unreadable with messages still to come: an event loop or a selector would never wake up for them.

On both implementations (the `make_pair` fixture). "Readable" is asked with a bounded wait (the
rest of a large message may still be on its way through loopback); on Linux the wait gives up as
soon as nothing is left anywhere in the kernel (the sender is done, its socket holds nothing
unacknowledged and the receiving socket's queue is empty), so a failure is reported at once.
"Not readable" is asked with a zero timeout (asyncio: a short one) once everything sent has been
received.
"""

import asyncio
import multiprocessing.connection
import pickle
import select
import selectors
import struct
import time

import pytest
from conftest import RECV_TIMEOUT, Background, make_payload

import loopfast

try:
    import fcntl
    import termios
except ImportError:  # not POSIX: the bounded wait only
    fcntl = termios = None

KiB = 1024
MiB = 1024 * KiB

READY = 10.0   # bound of a "readable" check (only a broken receive makes it wait this long)
SHORT = 0.05   # what asyncio's "not readable" check waits (zero is not a timeout for it)


# ---- the ways of asking --------------------------------------------------------------------------

def _select(channel, timeout):
    return bool(select.select([channel.fileno()], [], [], timeout)[0])


def _selector(channel, timeout):
    with selectors.DefaultSelector() as selector:
        selector.register(channel.fileno(), selectors.EVENT_READ)
        return bool(selector.select(timeout))


def _poll(channel, timeout):
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    return any(events & select.POLLIN for _, events in poller.poll(int(timeout * 1000 + 0.999)))


def _mp_wait(channel, timeout):
    return multiprocessing.connection.wait([channel], timeout) == [channel]


def _asyncio_add_reader(channel, timeout):
    async def check():
        loop = asyncio.get_running_loop()
        fired = loop.create_future()

        def on_readable():
            if not fired.done():
                fired.set_result(True)

        loop.add_reader(channel.fileno(), on_readable)
        try:
            done, _ = await asyncio.wait([fired], timeout=max(timeout, SHORT))
        finally:
            loop.remove_reader(channel.fileno())
        return bool(done)

    return asyncio.run(check())


def _loopfast_wait(channel, timeout):
    return loopfast.wait([channel], timeout) == [channel]


def _channel_poll(channel, timeout):
    return channel.poll(timeout)


PROBES = {
    "select.select": _select,
    "selectors.DefaultSelector": _selector,
    "select.poll": _poll,
    "multiprocessing.connection.wait": _mp_wait,
    "asyncio-add_reader": _asyncio_add_reader,
    "loopfast.wait": _loopfast_wait,
    "Channel.poll": _channel_poll,
}
if not hasattr(select, "poll"):
    del PROBES["select.poll"]
# The kernel's view, and the library's own.
KEY_PROBES = ["select.select", "loopfast.wait"]


# ---- what is left in the kernel (Linux: SIOCINQ / SIOCOUTQ) -------------------------------------

def _ioctl_int(fd, request):
    if fcntl is None or not hasattr(termios, "FIONREAD") or not hasattr(termios, "TIOCOUTQ"):
        return None
    try:
        return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]
    except OSError:
        return None


def _nothing_left_in_the_kernel(channel, peer, sending):
    """True when no byte can arrive on `channel` any more: the sender is done, the peer's socket
    holds nothing unsent or unacknowledged (SIOCOUTQ), and `channel`'s receive queue is empty
    (SIOCINQ). False when unsure."""
    if not sending.done():
        return False
    unacked = _ioctl_int(peer.fileno(), getattr(termios, "TIOCOUTQ", 0))
    queued = _ioctl_int(channel.fileno(), getattr(termios, "FIONREAD", 0))
    return unacked == 0 and queued == 0


def _becomes_readable(probe, channel, peer, sending):
    """Whether `probe` reports `channel` readable within READY seconds (or before it is certain
    that nothing can make it readable)."""
    give_up = time.monotonic() + READY
    while True:
        if probe(channel, SHORT):
            return True
        if _nothing_left_in_the_kernel(channel, peer, sending) or time.monotonic() > give_up:
            return probe(channel, 0)


# ---- messages ------------------------------------------------------------------------------------

MIXES = {
    "three-small": [10, 100, 1000],
    "small-1MiB-small": [100, 1 * MiB, 10],
    "1MiB-small-small": [1 * MiB, 10, 100],
}


def _payloads(mix):
    return [make_payload(size, seed=i) for i, size in enumerate(MIXES[mix])]


def _send_all(peer, items, how):
    """Send the messages from a background thread (1 MiB may not fit in the kernel buffers);
    for a mix that fits, wait until all is sent: the messages are queued before any receive."""
    sending = Background(_send_each, peer, items, how)
    if sum(len(p) for p in items) < 64 * KiB:
        sending.result()
    return sending


def _send_each(peer, payloads, how):
    for payload in payloads:
        if how == "recv":
            peer.send(payload, timeout=RECV_TIMEOUT)
        elif how == "recv-out-of-band":
            # 4 KiB and more: an object message whose buffer travels out of band (kind 3).
            obj = pickle.PickleBuffer(bytearray(payload)) if len(payload) >= 4 * KiB else payload
            peer.send(obj, timeout=RECV_TIMEOUT)
        else:
            peer.send_bytes(payload, timeout=RECV_TIMEOUT)


def _receive(channel, how):
    if how == "recv_bytes":
        return channel.recv_bytes(timeout=RECV_TIMEOUT)
    if how == "recv_bytes_into":
        buf = bytearray(2 * MiB)
        n = channel.recv_bytes_into(buf, 8, timeout=RECV_TIMEOUT)
        return bytes(buf[8:8 + n])
    return bytes(channel.recv(timeout=RECV_TIMEOUT))


def _readable_until_the_last_is_received(make_pair, probe_name, mix, how):
    probe = PROBES[probe_name]
    channel, peer = make_pair()
    payloads = _payloads(mix)
    sending = _send_all(peer, payloads, how)
    assert _becomes_readable(probe, channel, peer, sending), "not readable before any receive"
    for i, expected in enumerate(payloads):
        assert _receive(channel, how) == expected
        if i + 1 < len(payloads):
            assert _becomes_readable(probe, channel, peer, sending), (
                f"{probe_name}: not readable after receiving {i + 1} of {len(payloads)} "
                f"queued messages")
    sending.result()
    assert not probe(channel, 0), f"{probe_name}: readable after the last message was received"


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("probe", PROBES)
def test_an_end_stays_readable_until_its_last_queued_message_is_received(make_pair, probe, mix):
    _readable_until_the_last_is_received(make_pair, probe, mix, "recv_bytes")


@pytest.mark.parametrize("how", ["recv_bytes_into", "recv", "recv-out-of-band"])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("probe", KEY_PROBES)
def test_every_receive_method_leaves_the_rest_readable(make_pair, probe, mix, how):
    _readable_until_the_last_is_received(make_pair, probe, mix, how)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("probe", PROBES)
def test_after_recv_bytes_many_took_everything_the_end_is_not_readable(make_pair, probe, mix):
    channel, peer = make_pair()
    payloads = _payloads(mix)
    sending = _send_all(peer, payloads, "recv_bytes")
    got = []
    for _ in range(len(payloads)):  # each call returns at least one message
        got += channel.recv_bytes_many(timeout=RECV_TIMEOUT)
        if len(got) >= len(payloads):
            break
    sending.result()
    assert got == payloads
    assert not PROBES[probe](channel, 0), f"{probe}: readable after recv_bytes_many took all"


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("probe", PROBES)
def test_recv_bytes_many_of_one_message_leaves_the_rest_readable(make_pair, probe, mix):
    channel, peer = make_pair()
    payloads = _payloads(mix)
    sending = _send_all(peer, payloads, "recv_bytes")
    for i, expected in enumerate(payloads):
        assert channel.recv_bytes_many(max_messages=1, timeout=RECV_TIMEOUT) == [expected]
        if i + 1 < len(payloads):
            assert _becomes_readable(PROBES[probe], channel, peer, sending), (
                f"{probe}: not readable after recv_bytes_many(max_messages=1) took "
                f"{i + 1} of {len(payloads)}")
    sending.result()
    assert not PROBES[probe](channel, 0)
