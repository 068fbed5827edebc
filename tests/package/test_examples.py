"""Every program in examples/ runs, checks its own result and says so: exit status 0 and its
"ok" line. They run as a user would run them (a subprocess of this interpreter, so also on the
pure-Python twin when LOOPFAST_NO_EXTENSIONS=1), with small arguments."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
if not EXAMPLES.is_dir():
    pytest.skip("the examples are not here (testing an installed sdist or wheel)",
                allow_module_level=True)

TIMEOUT = 60  # seconds for one example run; they take a few


def run_example(name, *args):
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)


def run_example_main(name, start_method, *args):
    """Import the example and call its main(args) under a given multiprocessing start method."""
    code = ("import multiprocessing, sys\n"
            f"multiprocessing.set_start_method({start_method!r})\n"
            f"sys.path.insert(0, {str(EXAMPLES)!r})\n"
            f"import {Path(name).stem} as example\n"
            f"sys.exit(example.main({list(args)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)


def assert_ok(result, prefix):
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stdout + result.stderr


def needs_numpy():
    pytest.importorskip("numpy", reason="numpy is not installed (the example needs it)")


def needs_aio():
    if importlib.util.find_spec("loopfast.aio") is None:
        pytest.skip("loopfast.aio is not there")


def test_the_examples_readme_lists_every_example():
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for path in sorted(EXAMPLES.glob("*.py")):
        assert f"]({path.name})" in readme, path.name


def test_every_example_says_what_it_shows_and_how_to_run_it():
    for path in sorted(EXAMPLES.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert source.startswith('"""'), path.name
        assert f"python examples/{path.name}" in source.split('"""')[1], path.name


def test_worker_pool_computes_every_task():
    assert_ok(run_example("worker_pool.py", "--workers", "3", "--tasks", "200"),
              "pool ok: 200 tasks on 3 workers, sum of results ")


def test_worker_pool_with_default_arguments():
    assert_ok(run_example("worker_pool.py"), "pool ok: 300 tasks on 3 workers")


def test_worker_pool_under_spawn():
    """Channels reach workers started by spawn (the default on macOS and Windows)."""
    assert_ok(run_example_main("worker_pool.py", "spawn", "--workers", "2", "--tasks", "50"),
              "pool ok: 50 tasks on 2 workers")


def test_worker_pool_with_more_workers_than_tasks():
    assert_ok(run_example("worker_pool.py", "--workers", "4", "--tasks", "2"),
              "pool ok: 2 tasks on 4 workers")


def test_numpy_pipeline_delivers_every_array_transformed():
    needs_numpy()
    assert_ok(run_example("numpy_pipeline.py", "--arrays", "8", "--size", "200000"),
              "pipeline ok: 8 arrays of 200000 float64")


def test_numpy_pipeline_with_default_arguments():
    needs_numpy()
    assert_ok(run_example("numpy_pipeline.py"), "pipeline ok: 20 arrays of 1000000 float64")


def test_numpy_pipeline_with_arrays_too_small_to_go_out_of_band():
    needs_numpy()
    assert_ok(run_example("numpy_pipeline.py", "--arrays", "5", "--size", "10"),
              "pipeline ok: 5 arrays of 10 float64")


def test_numpy_pipeline_under_spawn():
    needs_numpy()
    assert_ok(run_example_main("numpy_pipeline.py", "spawn", "--arrays", "3", "--size", "50000"),
              "pipeline ok: 3 arrays of 50000 float64")


def test_asyncio_service_serves_every_client_and_refuses_the_wrong_key():
    needs_aio()
    assert_ok(run_example("asyncio_service.py", "--clients", "6", "--requests", "30"),
              "service ok: 6 clients (3 processes, 3 threads) x 30 requests, total 180, "
              "1 wrong key refused")


def test_asyncio_service_with_default_arguments():
    needs_aio()
    assert_ok(run_example("asyncio_service.py"), "service ok: 4 clients")


def test_asyncio_service_with_a_single_client():
    needs_aio()
    assert_ok(run_example("asyncio_service.py", "--clients", "1", "--requests", "5"),
              "service ok: 1 clients (0 processes, 1 threads) x 5 requests, total 5")


def test_asyncio_service_under_spawn():
    needs_aio()
    assert_ok(run_example_main("asyncio_service.py", "spawn", "--clients", "2", "--requests", "5"),
              "service ok: 2 clients (1 processes, 1 threads)")


def test_process_pool_gives_the_same_results_on_loopfast():
    assert_ok(run_example("process_pool.py", "--tasks", "2000", "--arrays", "2"),
              "process pool ok: 2000 tasks and ")


def test_process_pool_under_spawn():
    """install() reaches the executor's workers started by spawn."""
    assert_ok(run_example_main("process_pool.py", "spawn", "--tasks", "300", "--arrays", "1",
                               "--workers", "2"), "process pool ok: 300 tasks and ")
