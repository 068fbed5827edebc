#!/usr/bin/env bash
# The thread tests on a free-threaded CPython with the GIL off (issue 15): what a GIL build cannot
# show, as the GIL serialises the very calls whose races these tests look for.
#
#   bash tools/test_freethreaded.sh            # interpreter from the cache, built when missing
#   bash tools/test_freethreaded.sh -x -q      # extra arguments go to pytest
#   LOOPFAST_FT_PYTHON=python3.14t bash tools/test_freethreaded.sh   # an interpreter you have
#
# 1. the interpreter: LOOPFAST_FT_PYTHON, or tools/build_freethreaded_python.sh's (cached in
#    ~/.cache/loopfast/python3.13t; ~3 minutes on 2 cores when it is not);
# 2. a fresh venv (LOOPFAST_FT_VENV, default .venv-ft) with the build and test requirements
#    that install on a free-threaded interpreter (hypothesis does not: its Rust part has no 3.13t
#    wheel, and the thread tests do not use it);
# 3. loopfast installed from this tree, the compiled core required;
# 4. PYTHON_GIL=0 pytest on tests/core/test_threads.py and tests/core/test_free_threading.py,
#    after checking that the GIL really is off with loopfast imported (an extension not declared
#    freethreading_compatible would turn it back on, with a warning); then on the rest of the
#    suite with -m "not slow", but for the files that need hypothesis (~6 minutes on 2 cores;
#    LOOPFAST_FT_SUITE=threads stops after the thread tests).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'test_freethreaded: %s\n' "$*" >&2; }

if [ -n "${LOOPFAST_FT_PYTHON:-}" ]; then
    PY=$LOOPFAST_FT_PYTHON
else
    PY=$(bash tools/build_freethreaded_python.sh)
fi
VENV=${LOOPFAST_FT_VENV:-.venv-ft}
rm -rf "$VENV"
"$PY" -m venv "$VENV"
VPY=$VENV/bin/python
log "installing the requirements into $VENV"
# The same bounds as pyproject.toml's [build-system] and test extra.
"$VPY" -m pip install -q "Cython>=3.0.11,<3.4" "setuptools>=77" "pytest>=7.4" \
    "pytest-timeout>=2.2" "numpy>=1.21"
log "building and installing loopfast"
# No build isolation: the build uses the Cython just installed instead of fetching its own.
LOOPFAST_REQUIRE_EXTENSIONS=1 "$VPY" -m pip install -q --no-build-isolation .

export PYTHON_GIL=0
"$VPY" -W error - <<'EOF'
import sys
import sysconfig

import loopfast

assert sysconfig.get_config_var("Py_GIL_DISABLED"), f"{sys.executable} is not free-threaded"
assert not sys._is_gil_enabled(), "the GIL is on with loopfast imported"
assert loopfast.implementation == "compiled", loopfast.implementation
print(f"test_freethreaded: {sys.version.split()[0]} free-threaded, GIL off, "
      f"{loopfast.__file__}", file=sys.stderr)
EOF
THREAD_TESTS=(tests/core/test_threads.py tests/core/test_free_threading.py)
log "the thread tests, PYTHON_GIL=0"
"$VPY" -m pytest -p no:cacheprovider "$@" "${THREAD_TESTS[@]}"
if [ "${LOOPFAST_FT_SUITE:-all}" = threads ]; then
    exit 0
fi
# The rest of the suite as README's test command runs it (-m "not slow"), both implementations,
# but for the property tests: hypothesis does not install here.
ignored=()
for file in "${THREAD_TESTS[@]}" $(grep -rlE '^(import|from) hypothesis' tests); do
    ignored+=("--ignore=$file")
done
log "the rest of the suite (-m 'not slow'; not run: the hypothesis-based files), PYTHON_GIL=0"
"$VPY" -m pytest -p no:cacheprovider -m "not slow" "$@" "${ignored[@]}" tests
