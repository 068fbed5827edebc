"""`python -m loopfast bench`, end to end in a subprocess: it runs, prints its table, and writes a
JSON report of the documented structure. No figure is judged here (benchmarks/ does that)."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

import loopfast
from loopfast.tools import cli

HAVE_NUMPY = importlib.util.find_spec("numpy") is not None
MiB = 1024 * 1024

HAVE_ZMQ = importlib.util.find_spec("zmq") is not None
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ZMQ = {"zmq"} if HAVE_ZMQ else set()
RT_PEERS = {"loopfast", "loopfast_spin0", "mp_pipe", "mp_tcp", "socket"} | ZMQ
STREAM_PEERS = RT_PEERS | {"mp_pipe_simplex"}
DEFAULT_CASES = {
    "rt64": RT_PEERS,
    "rt4k": RT_PEERS,
    "rt1m": RT_PEERS,
    "stream64": STREAM_PEERS | {"loopfast_many", "loopfast_batch"},
    "stream4k": STREAM_PEERS,
    "stream1m": STREAM_PEERS,
    "stream16m": STREAM_PEERS,
    "small_object_rt": {"loopfast", "mp_pipe"},
}
if HAVE_NUMPY:
    DEFAULT_CASES["numpy_object"] = {"loopfast", "mp_pipe", "loopfast_bytes"}
UNITS = {"rt64": "µs", "rt4k": "µs", "rt1m": "µs", "stream64": "msg/s", "stream4k": "msg/s",
         "stream1m": "GB/s", "stream16m": "GB/s", "numpy_object": "GB/s",
         "small_object_rt": "µs"}
# The object rows of the memory table: a float64 array through send / recv.
OBJECT_MEMORY_ROWS = {("loopfast", "send"), ("loopfast", "recv"), ("mp_pipe", "send"),
                      ("mp_pipe", "recv")}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `python -m loopfast bench --quick --json FILE` run: (completed process, report)."""
    path = tmp_path_factory.mktemp("bench") / "report.json"
    command = [sys.executable, "-m", "loopfast", "bench", "--quick", "--no-floors", "--json",
               str(path)]
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
    assert "multiprocessing.Pipe()" in out and "mp.Pipe" in out
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
            assert _positive(result["cpu_us_per_msg"])
            assert all(_positive(run["cpu_us_per_msg"]) for run in result["runs"])
        assert case["ratios"]["mp_pipe"]["mp_pipe"]["of_medians"] == 1.0


def test_quick_bench_peers_run_in_rotated_order(quick_run):
    _, report = quick_run
    rt = next(case for case in report["cases"] if case["name"] == "rt64")
    positions = {peer: [run["position"] for run in result["runs"]]
                 for peer, result in rt["results"].items()}
    first_round = {peer: p[0] for peer, p in positions.items()}
    second_round = {peer: p[1] for peer, p in positions.items()}
    assert first_round != second_round
    assert sorted(first_round.values()) == sorted(second_round.values()) == list(
        range(len(RT_PEERS)))


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
    header = next(line for line in done.stdout.splitlines() if line.startswith("case / peer"))
    assert "bytes" in header.split()
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
from loopfast.tools.cli import main
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


def test_quick_bench_prints_the_cpu_column_and_batched_rows(quick_run):
    done, report = quick_run
    assert "CPU µs" in done.stdout
    stream64 = _case(report, "stream64")
    for peer in ("loopfast_many", "loopfast_batch", "loopfast_spin0"):
        assert stream64["results"][peer]["label"] in done.stdout
    assert set(stream64["ratios"]["loopfast_batch"]) == {"mp_pipe", "mp_pipe_simplex", "socket"}


def test_quick_bench_without_floors_has_no_floor_section(quick_run):
    done, report = quick_run
    assert report["floors"] is None and report["settings"]["floors"] is None
    assert "C floor (pingpong.c" not in done.stdout  # the section (the verdict names the floors)


@pytest.mark.skipif(HAVE_ZMQ, reason="pyzmq is installed: its rows are in the run")
def test_quick_bench_without_pyzmq_skips_it_with_a_note(quick_run):
    done, report = quick_run
    assert "pyzmq" in report["skipped_peers"]["zmq"]
    assert "skipped peer zmq" in done.stdout


NO_MATPLOTLIB = """\
import sys
sys.modules["matplotlib"] = None  # import matplotlib now raises ImportError
from loopfast.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_plot_without_matplotlib_is_a_one_line_error_before_running(tmp_path):
    png = tmp_path / "bench.png"
    command = [sys.executable, "-c", NO_MATPLOTLIB, "bench", "--quick", "--case", "rt64",
               "--no-memory", "--plot", str(png)]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8",
                          timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "matplotlib" in done.stderr and "loopfast[plot]" in done.stderr
    assert "Traceback" not in done.stderr
    assert "round 1/" not in done.stderr
    assert not png.exists()


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")
def test_plot_writes_a_png(tmp_path):
    png = tmp_path / "bench.png"
    command = [sys.executable, "-m", "loopfast", "bench", "--quick", "--rounds", "1",
               "--case", "rt64", "--case", "stream64", "--no-memory", "--plot", str(png)]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8",
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_floors_directory_without_the_programs_is_refused(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--case", "rt64", "--no-memory",
                     "--floors", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pingpong.c" in err and "stream.c" in err


FAKE_PINGPONG = r"""#include <stdio.h>
int main(int argc, char **argv) {
    printf("spin=%s size=%s rtt median %s.5 us p99 9.9 us\n", argv[1], argv[2], argv[1]);
    return argc == 4 ? 0 : 2;
}
"""
FAKE_STREAM = r"""#include <stdio.h>
int main(int argc, char **argv) {
    printf("size=%s batch=%s 1234567 msg/s 2.500 GB/s\n", argv[1], argv[3]);
    return argc == 4 ? 0 : 2;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")
def test_floors_are_compiled_run_and_reported(tmp_path):
    """Stand-in floor programs that print the real ones' lines: compiled, run every round,
    parsed, and set beside loopfast's 64 B round trip."""
    (tmp_path / "pingpong.c").write_text(FAKE_PINGPONG)
    (tmp_path / "stream.c").write_text(FAKE_STREAM)
    path = tmp_path / "report.json"
    command = [sys.executable, "-m", "loopfast", "bench", "--quick", "--rounds", "2",
               "--case", "rt64", "--no-memory", "--floors", str(tmp_path), "--json", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8",
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    floors = json.loads(path.read_text(encoding="utf-8"))["floors"]
    results = floors["results"]
    assert results["rt64_spin"]["samples"] == [1.5, 1.5]
    assert results["rt64_block"]["median"] == 0.5
    assert results["stream64_b1000"]["median"] == 1234567
    assert results["stream1m"]["unit"] == "GB/s" and results["stream1m"]["median"] == 2.5
    assert set(floors["ratios"]) == {"loopfast", "loopfast_spin0"}
    assert "C floor" in done.stdout and "the busy-polling floor" in done.stdout


def test_unknown_case_is_refused_before_running(capsys):
    assert cli.main(["bench", "--case", "no-such-case"]) == 2
    assert "no-such-case" in capsys.readouterr().err


def test_command_is_required():
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_quick_bench_measures_the_asyncio_round_trip_beside_sync_and_streams(quick_run):
    done, report = quick_run
    aio = report["aio"]
    rows = set(aio["medians"]) | set(aio["skipped"])
    assert rows == {"sync_spin0", "aio", "aio_uvloop", "streams", "streams_uvloop"}
    for row, samples in aio["rows"].items():
        assert len(samples) == report["settings"]["rounds"]
        assert all(value > 0 for value in samples), row
    assert aio["ratios"]["aio / sync_spin0"] == pytest.approx(
        aio["medians"]["aio"] / aio["medians"]["sync_spin0"])
    assert aio["ratios"]["aio / streams"] == pytest.approx(
        aio["medians"]["aio"] / aio["medians"]["streams"])
    assert "asyncio round trip, 64 B" in done.stdout
    assert "aio / sync_spin0" in done.stdout


def test_a_run_of_chosen_cases_leaves_the_asyncio_round_trip_out(no_numpy_run):
    _, report = no_numpy_run
    assert report["aio"] is None


def test_quick_bench_compares_pools_and_queues_stock_and_on_loopfast(quick_run):
    done, report = quick_run
    pools = report["pools"]
    rows = set(pools["rows"]) | set(pools["skipped"])
    assert rows == {"ppe_submit", "ppe_map", "pool_map", "queue64", "queue_numpy"}
    for row, entry in pools["rows"].items():
        for name in ("stock", "loopfast"):
            assert len(entry["samples"][name]) == report["settings"]["rounds"], row
            assert all(_positive(x) for x in entry["samples"][name]), row
        assert entry["ratio"] == pytest.approx(
            entry["medians"]["loopfast"] / entry["medians"]["stock"])
    if "queue_numpy" in pools["rows"] and sys.platform.startswith("linux"):
        memory = pools["rows"]["queue_numpy"]["memory"]
        assert set(memory) == {"stock", "loopfast"}
        assert all(_positive(memory[n]["receiver_peak"]) for n in memory)
    assert "Pool(2).map, chunksize=1" in done.stdout and "loopfast ÷ stock" in done.stdout


def test_a_run_of_chosen_cases_leaves_pools_out(no_numpy_run):
    _, report = no_numpy_run
    assert report["pools"] is None


def test_version_names_the_release_and_the_core_in_use():
    done = subprocess.run([sys.executable, "-m", "loopfast", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = f"loopfast {loopfast.__version__} ({loopfast.implementation} core)"
    assert done.stdout.startswith(expected)


def test_quick_bench_fits_100_columns_and_ends_with_a_verdict(quick_run):
    done, report = quick_run
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert max(len(line) for line in done.stderr.splitlines()) <= 100  # not a terminal: a log
    assert "us " not in done.stdout.replace("µs", "")  # one spelling of the unit
    text = done.stdout
    bottom = text.index("Bottom line: loopfast against multiprocessing.Pipe()")
    verdict_at = text.index("Targets (benchmarks/check_targets.py's, from this run):")
    assert bottom < verdict_at
    # Every case with a loopfast row and an mp.Pipe row is in the bottom line, with its ratio.
    tail = text[bottom:verdict_at]
    for case in report["cases"]:
        ratio = case["ratios"].get("loopfast", {}).get("mp_pipe")
        if ratio is not None:
            assert case["title"] in tail
            assert f"{ratio['of_medians']:.2f}×" in tail
    # The verdict lines are the targets' own, judged on this report.
    from loopfast.tools.bench import targets
    verdict_lines = text[verdict_at:].splitlines()
    for verdict, what, _ in targets.judge(report):
        if verdict in (targets.PASS, targets.MISS):
            assert any(line.startswith(verdict) and what[:40] in line for line in verdict_lines)
    assert "left]" in done.stderr  # progress says how much is left


@pytest.mark.skipif(shutil.which("cc") is None or sys.platform == "win32",
                    reason="no C compiler (cc), or not POSIX")
def test_the_bench_runs_loopfasts_own_c_floors_by_default(tmp_path):
    """Without --floors, the floor programs shipped in the package are compiled and run (they
    are real: a busy-polling 64 B round trip takes some µs, a 1 MiB stream moves GB/s)."""
    from loopfast.tools.bench import floors as bench_floors
    path = tmp_path / "report.json"
    command = [sys.executable, "-m", "loopfast", "bench", "--quick", "--rounds", "1",
               "--case", "rt64", "--no-memory", "--json", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8",
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(path.read_text(encoding="utf-8"))
    floors = report["floors"]
    assert os.path.samefile(floors["directory"], bench_floors.BUNDLED)
    results = floors["results"]
    assert set(results) == {floor.name for floor in bench_floors.FLOORS}
    assert 0 < results["rt64_spin"]["median"] < 10_000  # µs
    assert results["stream64_b1000"]["median"] > results["stream64_b1"]["median"] > 0
    assert results["stream1m"]["median"] > 0.01  # GB/s
    assert "C floor (pingpong.c and stream.c loopfast's own" in done.stdout
