"""Bounded busy-polling: the same results with and without spinning, poll() never consumes,
and a wait that ends up sleeping uses no more CPU than its spin budget."""

import multiprocessing
import os
import resource
import subprocess
import sys
import threading

import pytest

import loopfast

SPINS = [0, 50, 2000]


@pytest.fixture(params=SPINS, ids=lambda us: f"spin={us}")
def spun_pipe(request):
    a, b = loopfast.Pipe(spin=request.param)
    yield a, b
    a.close()
    b.close()


def _echo(channel, count):
    for _ in range(count):
        channel.send_bytes(channel.recv_bytes(timeout=30))
    channel.close()


@pytest.mark.parametrize("spin", SPINS)
def test_round_trips_give_the_same_results_with_and_without_spinning(spin):
    a, b = loopfast.Pipe(spin=spin)
    child = multiprocessing.get_context("fork").Process(target=_echo, args=(b, 300))
    child.start()
    b.close()
    try:
        for i in range(300):
            message = os.urandom(i * 37 % 5000)
            a.send_bytes(message)
            assert a.recv_bytes(timeout=30) == message
    finally:
        child.join(30)
        a.close()
    assert child.exitcode == 0


def test_poll_while_spinning_never_consumes_a_message(spun_pipe):
    a, b = spun_pipe
    sender = threading.Timer(0.01, a.send_bytes, args=(b"whole",))
    sender.start()
    try:
        assert b.poll(10)
        assert b.poll(10)  # still there: poll took nothing
        assert b.recv_bytes(timeout=10) == b"whole"
        assert not b.poll(0)
    finally:
        sender.join(10)


def test_wait_while_spinning_returns_the_ready_channel(spun_pipe):
    a, b = spun_pipe
    other_a, other_b = loopfast.Pipe()
    with other_a, other_b:
        timer = threading.Timer(0.01, a.send_bytes, args=(b"x",))
        timer.start()
        try:
            assert loopfast.wait([other_b, b], timeout=10) == [b]
            assert b.recv_bytes(timeout=10) == b"x"
        finally:
            timer.join(10)


def test_spin_setting_per_channel_and_default():
    previous = loopfast.get_default_spin()
    try:
        loopfast.set_default_spin(7)
        assert loopfast.get_default_spin() == 7
        a, b = loopfast.Pipe()
        with a, b:
            assert a.spin is None  # follows the default
            a.spin = 0
            assert a.spin == 0
            a.spin = 12.5
            assert a.spin == 12.5
            with pytest.raises(ValueError):
                a.spin = -1
            with pytest.raises(ValueError):
                a.spin = float("nan")
        with pytest.raises(ValueError):
            loopfast.set_default_spin(-3)
    finally:
        loopfast.set_default_spin(previous)


def test_default_spin_is_zero_on_one_cpu_and_follows_the_environment():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs os.sched_setaffinity")
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "import loopfast; print(loopfast.get_default_spin())")
    env = {k: v for k, v in os.environ.items() if k != "LOOPFAST_SPIN_US"}
    one_cpu = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env=env, check=True)
    assert float(one_cpu.stdout) == 0.0
    configured = subprocess.run([sys.executable, "-c", "import loopfast; "
                                 "print(loopfast.get_default_spin())"], capture_output=True,
                                text=True, timeout=60, env=dict(env, LOOPFAST_SPIN_US="123"),
                                check=True)
    assert float(configured.stdout) == 123.0


@pytest.mark.skipif(loopfast.implementation != "compiled", reason="the twin never spins")
def test_a_wait_that_times_out_uses_no_more_cpu_than_its_spin_budget():
    """1 s waiting for a message that never comes: CPU time stays near the 20 ms budget."""
    a, b = loopfast.Pipe(spin=20_000)  # 20 ms
    with a, b:
        before = resource.getrusage(resource.RUSAGE_THREAD)
        with pytest.raises(TimeoutError):
            b.recv_bytes(timeout=1.0)
        after = resource.getrusage(resource.RUSAGE_THREAD)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # The budget plus generous room for the interpreter's own work; without the fallback to a
    # sleeping wait this would be ~1 s.
    assert cpu < 0.25, f"{cpu:.3f} s of CPU for a 20 ms spin budget"


@pytest.fixture
def without_shared_cpu_detection():
    """Spins run to their budget even on a busy machine, where another thread running on this
    CPU would otherwise end them early (which hides a spin that ignores its budget)."""
    from loopfast._core import channel as _channel
    _channel._set_shared_cpu_detection(False)
    try:
        yield
    finally:
        _channel._set_shared_cpu_detection(True)


@pytest.mark.skipif(loopfast.implementation != "compiled", reason="only the compiled core spins")
@pytest.mark.usefixtures("without_shared_cpu_detection")
def test_a_wait_that_times_out_spins_for_its_budget_then_sleeps():
    """1 s waiting for a message that never comes, 20 ms spin budget: the spin lasts the budget
    (it is measured by the clock it checks, so load cannot make it shorter) and then the wait
    sleeps; a spin that ran on to the deadline would take ~1 s."""
    a, b = loopfast.Pipe(spin=20_000)
    with a, b:
        with pytest.raises(TimeoutError):
            b.recv_bytes(timeout=1.0)
        spun = b._spin_time()
    assert 0.019 < spun < 0.5, f"spun {spun:.3f} s"


@pytest.mark.skipif(loopfast.implementation != "compiled", reason="only the compiled core spins")
@pytest.mark.usefixtures("without_shared_cpu_detection")
def test_a_spin_ends_when_the_message_arrives():
    a, b = loopfast.Pipe(spin=5_000_000)  # 5 s: far more than the wait below
    with a, b:
        threading.Timer(0.05, a.send_bytes, (b"late",)).start()
        assert b.recv_bytes(timeout=30) == b"late"
        spun = b._spin_time()
    assert 0.03 < spun < 4.0, f"spun {spun:.3f} s"
