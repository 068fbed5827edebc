#!/usr/bin/env bash
# Compile the Windows branch of src/loopfast/_core/platform.h with mingw-w64, so that a Winsock mistake
# fails here and not only on a hosted Windows runner. Installs Debian's mingw-w64 when missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cc=x86_64-w64-mingw32-gcc
if ! command -v "$cc" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mingw-w64 >/dev/null
    else
        echo "windows header check: $cc not found (apt-get install mingw-w64)" >&2
        exit 1
    fi
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$cc" -std=c99 -Wall -Wextra -Werror -O2 -I"$here" -I"$here/../../src/loopfast/_core" \
    "$here/check_platform.c" -o "$out/check_platform.exe" -lws2_32
echo "windows header check: platform.h (Winsock branch) compiles and links with $cc"
