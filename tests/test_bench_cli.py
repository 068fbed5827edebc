"""`python -m loopfast bench`, end to end in a subprocess: it runs, prints its table, and writes a
JSON report of the documented structure. No figure is judged here (benchmarks/ does that)."""

import json
import math
import subprocess
import sys

import pytest

from loopfast import __main__ as cli

DEFAULT_CASES = {
    "rt64": {"loopfast", "mp_pipe", "socket"},
    "stream64": {"loopfast", "mp_pipe", "mp_pipe_simplex", "socket"},
    "stream1m": {"loopfast", "mp_pipe", "mp_pipe_simplex", "socket"},
    "stream16m": {"loopfast", "mp_pipe", "mp_pipe_simplex", "socket"},
}
UNITS = {"rt64": "µs", "stream64": "msg/s", "stream1m": "GB/s", "stream16m": "GB/s"}


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


def test_unknown_case_is_refused_before_running(capsys):
    assert cli.main(["bench", "--case", "no-such-case"]) == 2
    assert "no-such-case" in capsys.readouterr().err


def test_command_is_required():
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
