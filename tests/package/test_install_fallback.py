"""Without a C compiler the package still installs, on its pure-Python twin, with a warning
(issue 16); with LOOPFAST_REQUIRE_EXTENSIONS=1 the same build is an error. Builds a wheel from a
copy of the source tree with CC=false (a compiler that always fails), without build isolation
(the test environment has Cython and setuptools), so nothing is downloaded."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(sys.platform == "win32", reason="CC= is how POSIX builds pick "
                                 "their compiler"),
              pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")]


def _source_copy(tmp_path):
    copy = tmp_path / "src-copy"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.pyd",
        ".pytest_cache", ".mypy_cache", ".hypothesis", "benchmarks", "docs"))
    return copy


def _build_wheel(source, out, **env):
    child_env = dict(os.environ, CC="false", CXX="false", LDSHARED="false")
    child_env.pop("LOOPFAST_REQUIRE_EXTENSIONS", None)
    child_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
         "-w", str(out), str(source)],
        env=child_env, capture_output=True, text=True, timeout=540)


def test_without_a_compiler_the_wheel_is_the_twin_with_a_warning(tmp_path):
    pytest.importorskip("Cython")
    done = _build_wheel(_source_copy(tmp_path), tmp_path / "wheels")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "could not be built" in output and "pure-Python twin" in output, output[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("loopfast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "loopfast/_core/channel_py.py" in names
    assert not [n for n in names if n.startswith("loopfast/_channel.") and
                n.endswith((".so", ".pyd"))], names
    # Installed on its own, it runs on the twin.
    target = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    env = dict(os.environ, PYTHONPATH=str(target))
    env.pop("LOOPFAST_NO_EXTENSIONS", None)
    env.pop("_LOOPFAST_TWIN_WARNED", None)
    code = ("import loopfast; a, b = loopfast.Pipe(); a.send([1, 2]); "
            "print(loopfast.implementation, b.recv(timeout=30)); a.close(); b.close()")
    ran = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["python", "[1,", "2]"]
    assert "the compiled core is not installed" in ran.stderr  # pip -q hides the build's warning


def test_a_required_extension_that_cannot_be_built_fails_the_build(tmp_path):
    pytest.importorskip("Cython")
    done = _build_wheel(_source_copy(tmp_path), tmp_path / "wheels",
                        LOOPFAST_REQUIRE_EXTENSIONS="1")
    assert done.returncode != 0
    assert not list((tmp_path / "wheels").glob("*.whl"))
