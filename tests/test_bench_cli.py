"""`python -m loopfast bench`, end to end in a subprocess: it runs, prints its table, and writes a
JSON report of the documented structure. No figure is judged here (benchmarks/ does that)."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest

import loopfast
from loopfast import __main__ as cli

HAVE_NUMPY = importlib.util.find_spec("numpy") is not None
MiB = 1024 * 1024

DEFAULT_CASES = {
    "rt64": {"loopfast", "mp_pipe", "socket"},
    "stream64": {"loopfast", "mp_pipe", "mp_pipe_simplex", "socket"},
    "stream1m": {"loopfast", "mp_pipe", "mp_pipe_simplex", "socket"},
    "stream16m": {"loopfast", "mp_pipe", "mp_pipe_simplex", "socket"},
    "small_object_rt": {"loopfast", "mp_pipe"},
}
if HAVE_NUMPY:
    DEFAULT_CASES["numpy_object"] = {"loopfast", "mp_pipe", "loopfast_bytes"}
UNITS = {"rt64": "µs", "stream64": "msg/s", "stream1m": "GB/s", "stream16m": "GB/s",
         "numpy_object": "GB/s", "small_object_rt": "µs"}
# The object rows of the memory table: a float64 array through send / recv.
OBJECT_MEMORY_ROWS = {("loopfast", "send"), ("loopfast", "recv"), ("mp_pipe", "send"),
                      ("mp_pipe", "recv")}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `python -m loopfast bench --quick --json FILE` run: (completed process, report)."""
    path = tmp_path_factory.mktemp("bench") / "report.json"
    command = [sys.executable, "-m", "loopfast", "bench", "--quick", "--json", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8",
                          timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    with open(path, encoding="utf-8") as f:
        return done, json.load(f)


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _case(report, name):
    return next(case for case in report["cases"] if case["name"] == name)


def _memory_rows(report):
    return {(row["peer"], row["api"]): row for row in report["memory"]["rows"]}


def test_quick_bench_prints_a_row_per_case_and_peer(quick_run):
    done, report = quick_run
    out = done.stdout
    assert "multiprocessing.Pipe()" in out and "vs mp.Pipe" in out
    for case in report["cases"]:
        assert case["title"] in out
        for result in case["results"].values():
            assert result["label"] in out
    assert f"{report['environment']['cpu_count']} CPUs" in out


def test_quick_bench_reports_progress_on_stderr_only(quick_run):
    done, _ = quick_run
    assert "round 1/" in done.stderr
    assert "round 1/" not in done.stdout


def test_quick_bench_json_has_every_sample_median_and_ratio(quick_run):
    _, report = quick_run
    assert report["schema"] == "loopfast-bench/1"
    assert report["settings"]["quick"] is True
    rounds = report["settings"]["rounds"]
    assert {"loopfast_version", "python", "platform", "cpu_count"} <= set(report["environment"])
    assert {case["name"]: set(case["results"]) for case in report["cases"]} == DEFAULT_CASES
    for case in report["cases"]:
        assert case["unit"] == UNITS[case["name"]]
        for peer, result in case["results"].items():
            assert len(result["samples"]) == rounds
            assert len(result["runs"]) == rounds
            assert all(_positive(v) for v in result["samples"])
            assert min(result["samples"]) <= result["median"] <= max(result["samples"])
            ratio = case["ratios"][peer]["mp_pipe"]
            assert ratio["of_medians"] == pytest.approx(
                result["median"] / case["results"]["mp_pipe"]["median"])
            assert len(ratio["paired"]) == rounds
        assert case["ratios"]["mp_pipe"]["mp_pipe"]["of_medians"] == 1.0


def test_quick_bench_peers_run_in_rotated_order(quick_run):
    _, report = quick_run
    rt = next(case for case in report["cases"] if case["name"] == "rt64")
    positions = {peer: [run["position"] for run in result["runs"]]
                 for peer, result in rt["results"].items()}
    first_round = {peer: p[0] for peer, p in positions.items()}
    second_round = {peer: p[1] for peer, p in positions.items()}
    assert first_round != second_round
    assert sorted(first_round.values()) == sorted(second_round.values()) == [0, 1, 2]


def test_quick_bench_json_has_memory_figures_or_says_why_not(quick_run):
    _, report = quick_run
    memory = report["memory"]
    if not sys.platform.startswith("linux"):
        assert memory["skipped"]
        return
    assert memory["skipped"] is None
    rows = {(row["peer"], row["api"]): row for row in memory["rows"]}
    assert {("loopfast", "send_bytes"), ("loopfast", "recv_bytes"),
            ("loopfast", "recv_bytes_into")} <= set(rows)
    received = rows["loopfast", "recv_bytes"]
    # recv_bytes returns a bytes object of the message's size, so the peak rose by at least that.
    assert received["worst"] >= memory["size"]
    assert received["worst_ratio"] == pytest.approx(received["worst"] / memory["size"])


def test_quick_bench_header_names_the_implementation(quick_run):
    done, report = quick_run
    assert report["environment"]["implementation"] == loopfast.implementation
    first_line = done.stdout.splitlines()[0]
    assert f"{loopfast.implementation} implementation" in first_line


@pytest.mark.skipif(not HAVE_NUMPY, reason="numpy is not installed")
def test_quick_bench_moves_a_smaller_numpy_array_and_says_so(quick_run):
    done, report = quick_run
    case = _case(report, "numpy_object")
    assert case["size"] == 32 * MiB
    assert case["payload"] == "float64_array" and case["receive"] == "object"
    assert case["title"] == "32 MiB numpy object" and case["title"] in done.stdout
    assert "the full run: 256 MiB" in case["note"]


@pytest.mark.skipif(not HAVE_NUMPY, reason="numpy is not installed")
def test_quick_bench_numpy_object_is_compared_with_send_bytes_and_mp_pipe(quick_run):
    done, report = quick_run
    case = _case(report, "numpy_object")
    assert case["unit"] == "GB/s" and case["lower_is_better"] is False
    assert set(case["references"]) == {"loopfast_bytes", "mp_pipe"}
    for ref in ("loopfast_bytes", "mp_pipe"):
        ratio = case["ratios"]["loopfast"][ref]
        assert ratio["of_medians"] == pytest.approx(
            case["results"]["loopfast"]["median"] / case["results"][ref]["median"])
    assert "vs send_bytes" in done.stdout
    assert "loopfast.Pipe() send_bytes/recv_bytes" in done.stdout


def test_quick_bench_small_object_round_trip_is_compared_with_mp_pipe(quick_run):
    _, report = quick_run
    case = _case(report, "small_object_rt")
    assert case["kind"] == "roundtrip" and case["receive"] == "object"
    assert case["payload"] == "small_dict"
    assert case["references"] == ["mp_pipe"]
    assert case["ratios"]["loopfast"]["mp_pipe"]["of_medians"] == pytest.approx(
        case["results"]["loopfast"]["median"] / case["results"]["mp_pipe"]["median"])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not HAVE_NUMPY,
                    reason="peak memory needs Linux; the object rows need numpy")
def test_quick_bench_memory_has_object_rows_for_both_sides_and_peers(quick_run):
    done, report = quick_run
    memory = report["memory"]
    rows = _memory_rows(report)
    assert OBJECT_MEMORY_ROWS <= set(rows)
    for key in OBJECT_MEMORY_ROWS:
        assert rows[key]["message"] == "float64 array"
        assert rows[key]["side"] == ("send" if key[1] == "send" else "receive")
    # recv() returns an array of the message's size, so the receiver's peak rose by at least that.
    assert rows["loopfast", "recv"]["worst"] >= memory["size"]
    assert "clear_refs" in memory["method"] and "clear_refs" in done.stdout


NO_NUMPY = """\
import sys
sys.modules["numpy"] = None  # import numpy now raises ImportError, here and in forked children
from loopfast.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def no_numpy_run(tmp_path_factory):
    """The quick bench of the object cases in an interpreter where numpy cannot be imported."""
    path = tmp_path_factory.mktemp("bench") / "report.json"
    command = [sys.executable, "-c", NO_NUMPY, "bench", "--quick", "--case", "numpy_object",
               "--case", "small_object_rt", "--json", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8",
                          timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    with open(path, encoding="utf-8") as f:
        return done, json.load(f)


def test_without_numpy_the_numpy_case_is_skipped_with_a_note(no_numpy_run):
    done, report = no_numpy_run
    assert [case["name"] for case in report["cases"]] == ["small_object_rt"]
    assert "numpy" in report["skipped_cases"]["numpy_object"]
    assert "skipped case numpy_object" in done.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory needs Linux")
def test_without_numpy_the_object_memory_rows_are_skipped_with_a_note(no_numpy_run):
    done, report = no_numpy_run
    assert "numpy" in report["memory"]["objects_skipped"]
    assert not OBJECT_MEMORY_ROWS & set(_memory_rows(report))
    assert ("loopfast", "recv_bytes") in _memory_rows(report)
    assert "skipped the object rows" in done.stdout


def test_unknown_case_is_refused_before_running(capsys):
    assert cli.main(["bench", "--case", "no-such-case"]) == 2
    assert "no-such-case" in capsys.readouterr().err


def test_command_is_required():
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
