#!/usr/bin/env bash
# Run part of the test suite against an AddressSanitizer + UndefinedBehaviorSanitizer build of
# the compiled channel (Linux, gcc).
#
#   bash tools/sanitize.sh                  # the default test set below
#   bash tools/sanitize.sh tests/test_x.py  # other pytest arguments
#
# The instrumented extension is built in a copy of the tracked files (never over the checkout's
# own build), and that copy's src/ goes first on PYTHONPATH. Needs the test dependencies in the
# current Python environment (pip install -e '.[test]').
#
# ASan's leak checker is off: CPython itself keeps memory alive at exit that LeakSanitizer
# reports. Use-after-free, overflows and undefined behaviour abort the run with a report.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/loopfast-sanitize.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
git ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK")

echo "building the sanitizer build in $WORK" >&2
(cd "$WORK" && LOOPFAST_SANITIZE=1 "$PYTHON" setup.py -q build_ext --inplace >/dev/null)

if [ "$#" -eq 0 ]; then
    set -- tests/core/test_channel.py tests/core/test_twin.py tests/core/test_batch.py tests/core/test_objects.py \
        tests/core/test_properties.py tests/core/test_spin.py tests/api/test_mp_compat.py tests/core/test_faults.py \
        tests/core/test_threads.py tests/core/test_fuzz_corpus.py tests/aio/test_aio.py -m "not slow"
fi

cd "$WORK"
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# Which build runs: the instrumented one, or the whole exercise is pointless.
"$PYTHON" -c "import loopfast._core.channel as c, sys; assert c.__file__.startswith('$WORK'), c.__file__"
"$PYTHON" -m pytest -p no:cacheprovider -q "$@"
