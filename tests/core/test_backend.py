"""Which implementation a process uses, and that asking for the twin keeps the compiled core out
of the process entirely (issue 14): LOOPFAST_NO_EXTENSIONS is how a user steps around a broken
build, so it must not import that build."""

import json
import os
import subprocess
import sys

import pytest
from conftest import JOIN_TIMEOUT

import loopfast

_ROUND_TRIP = """
import json, sys
import loopfast
a, b = loopfast.Pipe()
a.send({"n": 1})
got = b.recv(timeout=30)
a.close(); b.close()
print(json.dumps({"implementation": loopfast.implementation, "got": got,
                  "compiled_imported": "loopfast._core.channel" in sys.modules}))
"""

_BLOCK = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "loopfast._core.channel":
            raise ImportError("no compiled extension here (as on a platform without a wheel)")
        return None
sys.meta_path.insert(0, Refuse())
"""
_NO_EXTENSION = _BLOCK + _ROUND_TRIP


def _run(code, warning=None, **env):
    child_env = dict(os.environ)
    child_env.pop("LOOPFAST_NO_EXTENSIONS", None)
    child_env.pop("_LOOPFAST_TWIN_WARNED", None)
    child_env.update(env)
    done = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True,
                          text=True, timeout=JOIN_TIMEOUT)
    assert done.returncode == 0, done.stderr
    if warning is None:
        assert "RuntimeWarning" not in done.stderr, done.stderr
    else:
        assert warning in done.stderr, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("value", ["1", "yes"])
def test_asking_for_the_twin_never_imports_the_compiled_core(value):
    report = _run(_ROUND_TRIP, LOOPFAST_NO_EXTENSIONS=value)
    assert report == {"implementation": "python", "got": {"n": 1}, "compiled_imported": False}


def test_without_the_extension_the_twin_does_the_job():
    # (On CPython a missing core is an install that could not build it: the warning says so.)
    report = _run(_NO_EXTENSION, warning="the compiled core is not installed")
    assert report == {"implementation": "python", "got": {"n": 1}, "compiled_imported": False}


@pytest.mark.compiled
@pytest.mark.parametrize("value", ["", "0"])
def test_the_compiled_core_by_default(value):
    report = _run(_ROUND_TRIP, LOOPFAST_NO_EXTENSIONS=value)
    assert report == {"implementation": "compiled", "got": {"n": 1}, "compiled_imported": True}


def _echo_in_a_pure_child(channel):
    import loopfast as child_loopfast  # the child's own import, with the twin requested
    message = channel.recv(timeout=30)
    # (This module's conftest imports the compiled core itself, to test both: whether loopfast
    # imports it is tested above, in plain interpreters.)
    channel.send((message, child_loopfast.implementation, type(channel).__module__))
    channel.close()


@pytest.mark.compiled
def test_a_channel_handed_from_a_compiled_process_works_in_a_pure_one(monkeypatch):
    import multiprocessing
    if loopfast.implementation != "compiled":
        pytest.skip("this process is not using the compiled core")
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = loopfast.Pipe()
    monkeypatch.setenv("LOOPFAST_NO_EXTENSIONS", "1")  # read by the spawned child at import
    child = ctx.Process(target=_echo_in_a_pure_child, args=(theirs,))
    child.start()
    monkeypatch.delenv("LOOPFAST_NO_EXTENSIONS")
    theirs.close()
    try:
        ours.send("from a compiled parent")
        assert ours.recv(timeout=30) == ("from a compiled parent", "python",
                                         "loopfast._core.channel_py")
    finally:
        ours.close()
        child.join(JOIN_TIMEOUT)
    assert child.exitcode == 0


@pytest.mark.compiled
def test_the_compiled_wire_constants_are_wire_py_s():
    # Every number the compiled core keeps as a C enum is the one _wire.py gives, and the
    # pure-Python twin takes the same object from _wire.py.
    from loopfast import _wire
    from loopfast._core import channel as _channel
    from loopfast._core import channel_py as _channel_py
    assert _wire.HEADER_SIZE == _wire.FRAME_HEADER.size == 16
    assert set(_channel.WIRE_CONSTANTS) == {
        "HEADER_SIZE", "KIND_BYTES", "KIND_PICKLE", "KIND_OBJECT", "MAX_OOB_BUFFERS",
        "OOB_MIN_SIZE", "RECV_BUFFER_SIZE", "PEEK_SIZE", "PEEK_SIZE_SHARED", "PENDING_IOV",
        "RESERVE_FLOOR", "MANY_LOOKS", "SMALL_SEND_SIZE", "BATCH_FLUSH_SIZE", "HANDOVER_NAP_NS"}
    for name, value in _channel.WIRE_CONSTANTS.items():
        assert value == getattr(_wire, name), name
        if hasattr(_channel_py, name):
            assert getattr(_channel_py, name) is getattr(_wire, name), name


def test_the_missing_core_is_reported_once_per_process_tree():
    # A child of a process that reported it (a pool's worker, say), also without the core,
    # stays quiet: it inherits the mark.
    child = _BLOCK + "import loopfast\nassert loopfast.implementation == 'python'\n"
    code = (_BLOCK + "import subprocess, sys\nimport loopfast\n"
            f"subprocess.run([sys.executable, '-c', {child!r}], check=True)\n")
    child_env = dict(os.environ)
    for name in ("LOOPFAST_NO_EXTENSIONS", "_LOOPFAST_TWIN_WARNED"):
        child_env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True,
                          text=True, timeout=JOIN_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("the compiled core is not installed") == 1, done.stderr
