#!/usr/bin/env bash
# Build the sdist from a clean checkout of HEAD, check its file list against git, install it into a
# fresh virtual environment and run the test suite from the unpacked sdist (not from the repo).
#     bash tools/test_sdist.sh [pytest args...]      (default: -m "not slow")
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/checkout"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip build
python -m build --sdist -o "$work/dist" "$work/checkout"
sdist=$(ls "$work"/dist/*.tar.gz)
(cd "$work/checkout" && python tools/check_sdist.py "$sdist")
python -m pip install -q "$sdist[test]"
mkdir "$work/unpacked"
tar xzf "$sdist" -C "$work/unpacked"
cd "$work"/unpacked/*/
rm -rf src  # test the installed package, not the sources next to the tests
python -c "import loopfast; print('testing', loopfast.__file__, loopfast.implementation)"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
python -m pytest -p no:cacheprovider -q "$@"
