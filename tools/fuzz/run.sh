#!/usr/bin/env bash
# Fuzz the compiled frame decoder: bash tools/fuzz/run.sh [seconds] [extra libFuzzer options]
#
# Uses the instrumented build from tools/fuzz/build.sh (built first if missing) with atheris's
# AddressSanitizer+libFuzzer runtime preloaded, so libFuzzer sees the C extension's edges.
# LOOPFAST_FUZZ_PLAIN=1: the checkout's regular build instead (Python-level coverage only).
# New inputs go to $LOOPFAST_FUZZ_WORK/corpus (default /tmp/loopfast-fuzz-work), crashes to
# $LOOPFAST_FUZZ_WORK/artifacts; the seed corpus in tools/fuzz/corpus/frames is read, not written.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SECONDS_TO_RUN=${1:-600}
shift || true
PYTHON=${PYTHON:-python}
BUILD=${LOOPFAST_FUZZ_BUILD:-/tmp/loopfast-fuzz-build}
WORK=${LOOPFAST_FUZZ_WORK:-/tmp/loopfast-fuzz-work}
mkdir -p "$WORK/corpus" "$WORK/artifacts"

ATHERIS_DIR=$("$PYTHON" -c "import atheris; print(atheris.path())")
if [ "${LOOPFAST_FUZZ_PLAIN:-0}" = 1 ]; then
    env_prefix=()
else
    if ! ls "$BUILD"/lib/loopfast/_core/channel*.so >/dev/null 2>&1; then
        bash "$HERE/build.sh"
    fi
    # detect_leaks=0: CPython keeps memory alive at exit on purpose. PYTHONMALLOC=malloc: every
    # Python object in its own malloc block, so ASan sees overflows into payload bytes objects.
    env_prefix=(env "PYTHONPATH=$BUILD/lib${PYTHONPATH:+:$PYTHONPATH}"
                "LD_PRELOAD=$ATHERIS_DIR/asan_with_fuzzer.so" PYTHONMALLOC=malloc
                "ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:abort_on_error=0")
fi

exec "${env_prefix[@]}" "$PYTHON" "$HERE/fuzz_frames.py" \
    "$WORK/corpus" "$HERE/corpus/frames" \
    -max_total_time="$SECONDS_TO_RUN" -max_len=140000 -timeout=60 -rss_limit_mb=4096 \
    -artifact_prefix="$WORK/artifacts/" -print_final_stats=1 "$@"
