#!/usr/bin/env bash
# Add to the repository corpus the inputs of a fuzz run that bring new coverage (libFuzzer
# -merge=1), small ones only, named found-<sha1>:
#   bash tools/fuzz/merge.sh [run corpus dir, default /tmp/loopfast-fuzz-work/corpus] [max_len]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
FROM=${1:-${LOOPFAST_FUZZ_WORK:-/tmp/loopfast-fuzz-work}/corpus}
MAX_LEN=${2:-4096}
PYTHON=${PYTHON:-python}
BUILD=${LOOPFAST_FUZZ_BUILD:-/tmp/loopfast-fuzz-build}
ATHERIS_DIR=$("$PYTHON" -c "import atheris; print(atheris.path())")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cp "$HERE"/corpus/frames/* "$OUT/"
before=$(ls "$OUT" | wc -l)
env "PYTHONPATH=$BUILD/lib${PYTHONPATH:+:$PYTHONPATH}" \
    "LD_PRELOAD=$ATHERIS_DIR/asan_with_fuzzer.so" PYTHONMALLOC=malloc \
    "ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1" \
    "$PYTHON" "$HERE/fuzz_frames.py" -merge=1 -max_len="$MAX_LEN" "$OUT" "$FROM"
for f in "$OUT"/*; do
    name=$(basename "$f")
    if [ ! -e "$HERE/corpus/frames/$name" ]; then
        cp "$f" "$HERE/corpus/frames/found-$name"
    fi
done
echo "corpus: $before -> $(ls "$HERE/corpus/frames" | wc -l) files, $(du -sh "$HERE/corpus" | cut -f1)"
