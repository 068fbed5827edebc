"""CPython's own multiprocessing and concurrent.futures tests, run unmodified from the
interpreter's `test` package, stock and under loopfast.install(), for every start method
(tools/conformance/run.py): every test that passes stock passes installed, apart from the known
differences the runner lists with their reasons (and README.md too)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tools" / "conformance" / "run.py"
if not RUNNER.is_file():
    pytest.skip("the tools are not here (testing an installed sdist or wheel)",
                allow_module_level=True)
try:
    import test._test_multiprocessing  # noqa: F401
except ImportError:
    pytest.skip("this interpreter has no test._test_multiprocessing", allow_module_level=True)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cpython_s_own_tests_pass_under_install(tmp_path):
    report = tmp_path / "conformance.json"
    done = subprocess.run([sys.executable, str(RUNNER), "--json", str(report)],
                          capture_output=True, text=True, timeout=3500, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    results = json.loads(report.read_text())
    assert results["regressions"] == []
    mp = {key: value for key, value in results["results"].items() if key.startswith("mp/")}
    assert mp, results["results"].keys()
    for key, modes in mp.items():
        stock, installed = modes["stock"], modes["installed"]
        passed = [t for t, outcome in stock.items() if outcome == "pass"]
        assert len(passed) >= 50, (key, len(passed))  # the suite ran, not an empty selection
        assert set(installed) == set(stock), key
    assert "Every other test that passes stock passes under loopfast.install()." in done.stdout
