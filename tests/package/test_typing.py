"""The package and README.md's examples pass mypy --strict (the stubs stay true to the API)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("mypy", reason="mypy is not installed")
if not (ROOT / "src" / "loopfast").is_dir():
    pytest.skip("the sources are not here (testing an installed sdist or wheel)",
                allow_module_level=True)


@pytest.mark.timeout(600)
def test_package_passes_mypy_strict():
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "src/loopfast"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(600)
def test_readme_examples_pass_mypy_strict():
    result = subprocess.run([sys.executable, "tools/check_readme_types.py"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
