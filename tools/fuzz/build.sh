#!/usr/bin/env bash
# Build a coverage-instrumented (libFuzzer sancov) + AddressSanitizer copy of the compiled channel
# for tools/fuzz/run.sh, from a copy of the source tree: the checkout's own
# src/loopfast/_core/channel*.so is never touched.
#
#   bash tools/fuzz/build.sh            # -> $LOOPFAST_FUZZ_BUILD (default /tmp/loopfast-fuzz-build)
#
# Result: $LOOPFAST_FUZZ_BUILD/lib/loopfast/ = the package's .py files + the instrumented
# _core.channel extension; put $LOOPFAST_FUZZ_BUILD/lib first on PYTHONPATH to use it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${LOOPFAST_FUZZ_BUILD:-/tmp/loopfast-fuzz-build}
PYTHON=${PYTHON:-python}
CLANG=${CLANG:-clang}

case "$OUT" in
    "$ROOT"/src|"$ROOT"/src/*) echo "refusing to build into the source tree: $OUT" >&2; exit 2 ;;
esac
command -v "$CLANG" >/dev/null || { echo "clang not found (set CLANG=...)" >&2; exit 2; }

rm -rf "$OUT"
mkdir -p "$OUT/tree/src" "$OUT/lib" "$OUT/tmp"
cp "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$OUT/tree/"
cp -r "$ROOT/src/loopfast" "$OUT/tree/src/"
find "$OUT/tree/src" \( -name '*.so' -o -name '*.pyd' -o -name '*.c' -o -name __pycache__ \) \
    -prune -exec rm -rf {} +

SAN="-fsanitize=fuzzer-no-link,address -fno-omit-frame-pointer -g -O1"
cd "$OUT/tree"
CC="$CLANG" LDSHARED="$CLANG -shared" CFLAGS="$SAN" LDFLAGS="-fsanitize=fuzzer-no-link,address" \
    "$PYTHON" setup.py -q build_ext -b "$OUT/lib" -t "$OUT/tmp"
cp -r "$OUT"/tree/src/loopfast/. "$OUT/lib/loopfast/"

so=$(ls "$OUT"/lib/loopfast/_core/channel*.so)
if ! nm -D "$so" | grep -q __sanitizer_cov_8bit_counters_init; then
    echo "warning: $so has no libFuzzer coverage counters" >&2
    exit 1
fi
echo "instrumented extension: $so"
