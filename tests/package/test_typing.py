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


# The oldest target mypy still type-checks for (it refuses 3.9, which loopfast supports), and this
# interpreter's: a user's numpy arrays, arrays and mmaps are buffers to loopfast's types on both.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("python_version", ["3.10", f"{sys.version_info[0]}.{sys.version_info[1]}"])
def test_a_user_program_passing_buffers_passes_mypy_strict(python_version):
    pytest.importorskip("numpy", reason="numpy is not installed")
    program = Path(__file__).with_name("typing_user_program.py")
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                             "--python-version", python_version, str(program)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
