"""python -m loopfast soak: a short soak passes on each implementation, and its checks catch a
corrupted, lost, duplicated or reordered message, a dead worker and Ctrl-C (self-test faults
injected with --inject). Each soak runs in a subprocess, with a bounded wait."""

import json
import os
import signal
import subprocess
import sys

import pytest

SOAK_TIMEOUT = 120.0  # a 5 s soak normally ends within 10 s; this only stops a hung one
COUNTERS = ("lost", "reordered", "duplicated", "corrupted", "errors")


def compiled_available():
    try:
        import loopfast._core.channel  # noqa: F401
    except ImportError:
        return False
    return True


def run_soak(tmp_path, *args):
    """Run the soak with `args`; return (exit status, JSON report, stdout)."""
    report = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "loopfast", "soak", "--json", str(report), "--seed", "7", *args],
        capture_output=True, text=True, timeout=SOAK_TIMEOUT)
    assert report.exists(), done.stdout + done.stderr
    return done.returncode, json.loads(report.read_text()), done.stdout


def problems(result):
    return {key: result["totals"][key] for key in COUNTERS}


@pytest.mark.timeout(SOAK_TIMEOUT + 30)
@pytest.mark.parametrize("implementation", ["compiled", "python"])
def test_five_second_soak_passes(tmp_path, implementation):
    if implementation == "compiled" and not compiled_available():
        pytest.skip("no compiled extension here")
    status, result, stdout = run_soak(tmp_path, "--seconds", "5",
                                      "--implementation", implementation)
    assert status == 0, stdout
    assert problems(result) == dict.fromkeys(COUNTERS, 0)
    assert result["totals"]["messages"] > 500
    assert result["totals"]["bytes"] > 0
    assert result["totals"]["messages"] == result["totals"]["messages_sent"]
    assert {w["implementation"] for w in result["workers"]} == {implementation}
    assert result["passed"] and "result        PASS" in stdout


@pytest.mark.timeout(SOAK_TIMEOUT + 30)
@pytest.mark.parametrize("fault, counter", [("corruption", "corrupted"), ("loss", "lost"),
                                            ("duplicate", "duplicated"),
                                            ("reorder", "reordered")])
def test_injected_fault_is_counted_and_fails_the_run(tmp_path, fault, counter):
    """Exactly the one injected fault is counted (default: compiled and pure workers mixed)."""
    status, result, stdout = run_soak(tmp_path, "--seconds", "2", "--processes", "2",
                                      "--inject", fault)
    assert status == 1, stdout
    expected = dict.fromkeys(COUNTERS, 0)
    expected[counter] = 1
    assert problems(result) == expected, stdout
    assert not result["passed"]
    assert "FAIL" in stdout


@pytest.mark.timeout(SOAK_TIMEOUT + 30)
def test_a_worker_that_dies_is_reported(tmp_path):
    status, result, stdout = run_soak(tmp_path, "--seconds", "10", "--processes", "2",
                                      "--inject", "kill")
    assert status == 1, stdout
    assert [w["died"] for w in result["workers"]] == [False, True]
    assert any("worker 1 died" in failure for failure in result["failures"])


@pytest.mark.timeout(SOAK_TIMEOUT + 30)
@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl-C to a process group is POSIX")
def test_ctrl_c_stops_the_soak_with_a_partial_report(tmp_path):
    report = tmp_path / "soak.json"
    # Its own process group, so that SIGINT reaches every process, as Ctrl-C in a terminal does.
    process = subprocess.Popen(
        [sys.executable, "-m", "loopfast", "soak", "--seconds", "60", "--processes", "2",
         "--progress", "0.5", "--json", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = process.stderr.readline()
        while line and not line.startswith("["):  # a progress line: the workers are running
            line = process.stderr.readline()
        assert line, "the soak ended before its first progress line"
        os.killpg(process.pid, signal.SIGINT)
        stdout, _ = process.communicate(timeout=SOAK_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=SOAK_TIMEOUT)
    assert process.returncode == 130, stdout
    result = json.loads(report.read_text())
    assert result["interrupted"] and "INTERRUPTED" in stdout
    assert problems(result) == dict.fromkeys(COUNTERS, 0)
    assert result["totals"]["messages"] > 0


def test_help_marks_injection_as_a_self_test():
    done = subprocess.run([sys.executable, "-m", "loopfast", "soak", "--help"],
                          capture_output=True, text=True, timeout=SOAK_TIMEOUT)
    assert done.returncode == 0
    assert "self-test:" in done.stdout
    assert "--inject" in done.stdout.split("self-test:", 1)[1]


def test_fewer_than_two_processes_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "loopfast", "soak", "--processes", "1"],
                          capture_output=True, text=True, timeout=SOAK_TIMEOUT)
    assert done.returncode == 2
    assert "--processes" in done.stderr

