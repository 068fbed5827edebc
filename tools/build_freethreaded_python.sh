#!/usr/bin/env bash
# Build a free-threaded (no-GIL, "3.13t") CPython 3.13 from Debian trixie's python3.13 source
# package, into a cache outside the repository, for running loopfast's tests without the GIL
# (issue 15).
#
#   bash tools/build_freethreaded_python.sh               # build unless cached; prints the path
#   bash tools/build_freethreaded_python.sh --print-path  # print the cached path, or exit 1
#
#   PY=$(bash tools/build_freethreaded_python.sh)
#   "$PY" -m venv /tmp/ft-venv && . /tmp/ft-venv/bin/activate && pip install -e '.[test]'
#   PYTHON_GIL=0 python -m pytest tests/core/test_threads.py
#
# Only the interpreter's path goes to standard output; progress goes to standard error.
#
# Environment:
#   LOOPFAST_FT_CACHE   install prefix (default ~/.cache/loopfast/python3.13t); reused when its
#                       bin/python3.13t runs with the GIL off
#   LOOPFAST_FT_JOBS    make -j value (default 2)
#   LOOPFAST_FT_KEEP_BUILD=1  keep the temporary build tree (its path is printed)
#
# What a build does (needs root, or sudo, and Debian's apt):
#   1. adds a deb-src line for trixie (and trixie-security) on the mirror this machine's apt
#      already uses, unless one is configured, and runs apt-get update;
#   2. installs the missing build dependencies (ssl, zlib and ffi are what pip and venv need);
#   3. downloads the source package python3.13=$DEB_VERSION (the newest python3.13 source the
#      mirror has, with a warning, if that exact version is gone);
#   4. unpacks the pristine upstream tarball and applies Debian's fix patches (CVE-*, crash and
#      build fixes) but not its distribution-integration patches (multiarch layout,
#      dist-packages schemes, ensurepip disabled, ...), which assume debian/rules' build and
#      would break a plain --prefix install and `python -m venv` with pip;
#   5. ./configure --disable-gil --prefix=CACHE --with-lto=no --without-ensurepip (no PGO, so
#      it takes minutes; venv still seeds pip from the bundled wheel), make, make install into a
#      staging directory that then replaces the cache, and checks the result: the GIL is off,
#      ssl/zlib/ctypes/... import, and a venv gets a working pip.
set -euo pipefail

DEB_VERSION=3.13.5-2+deb13u5
SUITE=trixie
CACHE=${LOOPFAST_FT_CACHE:-${HOME:?}/.cache/loopfast/python3.13t}
CACHE=${CACHE%/}
PY=$CACHE/bin/python3.13t
JOBS=${LOOPFAST_FT_JOBS:-2}
LOG=$CACHE.build.log
STAMP=.loopfast-ft-build   # marks a directory this script made (and may replace)
SRC_LIST=/etc/apt/sources.list.d/loopfast-$SUITE-src.list
BUILD_DEPS=(build-essential dpkg-dev libssl-dev zlib1g-dev libffi-dev libbz2-dev liblzma-dev
            libsqlite3-dev libreadline-dev libncurses-dev uuid-dev)
# Debian patches that only fit Debian's own packaging (file layout, split packages, docs).
SKIP_PATCHES=(deb-locations.diff distutils-install-layout.diff sysconfig-debian-schemes.diff
              tkinter-import.diff gdbm-import.diff link-opt.diff setup-modules.diff
              profiled-build.diff langpack-gettext.diff disable-sem-check.diff multiarch.diff
              ensurepip-disabled.diff destshared-location.diff 'min-*' stable-abi-multiarch.diff
              test-freeze-strip-libdir.diff Add-Debian-specific-documentation-path-to-IDLE-menu.diff
              lto-link-flags.diff)

log() { printf 'build_freethreaded_python: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# The cache is usable when its interpreter runs with the GIL off and has what pip needs.
usable() {
    [ -x "$PY" ] && PYTHON_GIL=0 "$PY" -c '
import sys
assert not sys._is_gil_enabled()
import ssl, zlib, ctypes' >/dev/null 2>&1
}

mode=build
case "${1:-}" in
    "") ;;
    --print-path) mode=print ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac
[ "$#" -le 1 ] || { usage >&2; exit 2; }

if usable; then
    printf '%s\n' "$PY"
    exit 0
fi
if [ "$mode" = print ]; then
    log "no usable free-threaded interpreter at $PY (run without --print-path to build it)"
    exit 1
fi

# ---------------------------------------------------------------------------------- the build
START=$SECONDS
command -v apt-get >/dev/null || die "needs Debian's apt (apt-get not found)"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "needs root (or sudo) for apt-get"
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

# Refuse to replace a directory that this script did not make (LOOPFAST_FT_CACHE=/usr/local...).
if [ -e "$CACHE" ] && [ ! -e "$CACHE/$STAMP" ] && [ -n "$(ls -A "$CACHE" 2>/dev/null)" ]; then
    die "$CACHE exists, is not empty and was not made by this script; remove it or set LOOPFAST_FT_CACHE"
fi
mkdir -p "$(dirname "$CACHE")"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/loopfast-ft-build.XXXXXX")
cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ -s "$LOG" ]; then
        log "failed (exit $rc); last lines of $LOG:"
        tail -n 30 "$LOG" >&2 || true
    fi
    if [ "${LOOPFAST_FT_KEEP_BUILD:-0}" = 1 ]; then
        log "build tree kept in $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
: >"$LOG"

# 1. deb-src for trixie, on the mirror that apt already uses for this machine's own release.
# shellcheck disable=SC2016  # $(RELEASE) and $(REPO_URI) are apt's format fields
if apt-get indextargets --format '$(RELEASE)' 'Created-By: Sources' 2>/dev/null \
        | grep -qx "$SUITE"; then
    log "a deb-src line for $SUITE is configured already"
else
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    # shellcheck disable=SC2016
    targets=$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Created-By: Packages' \
        2>/dev/null | sort -u || true)
    mirror=$(awk -v c="$codename" '$1 == c { print $2; exit }' <<<"$targets")
    security=$(awk -v c="$codename-security" '$1 == c { print $2; exit }' <<<"$targets")
    mirror=${mirror:-http://deb.debian.org/debian/}
    mirror=${mirror%/}
    security=${security:-${mirror%/debian}/debian-security/}
    security=${security%/}
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    opt=""
    [ -r "$keyring" ] && opt="[signed-by=$keyring] "
    log "adding $SRC_LIST (deb-src $mirror $SUITE main)"
    printf '%s\n' \
        "# Added by loopfast's tools/build_freethreaded_python.sh: Debian $SUITE sources only," \
        "# for building a free-threaded python3.13 (no binary packages come from here)." \
        "deb-src ${opt}$mirror $SUITE main" \
        "deb-src ${opt}$security $SUITE-security main" \
        | "${SUDO[@]}" tee "$SRC_LIST" >/dev/null
fi
log "apt-get update"
"${SUDO[@]}" apt-get update -qq >>"$LOG" 2>&1 || die "apt-get update failed"

# 2. Build dependencies that are missing.
missing=()
for pkg in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1 \
        || die "apt-get install ${missing[*]} failed"
else
    log "build dependencies are installed"
fi

# 3. The source package.
versions=$(apt-cache showsrc python3.13 2>/dev/null | awk '/^Version:/ { print $2 }' | sort -u || true)
[ -n "$versions" ] || die "the mirror offers no python3.13 source (is the deb-src line right?)"
if grep -qxF "$DEB_VERSION" <<<"$versions"; then
    version=$DEB_VERSION
else
    version=""
    for v in $versions; do
        if [ -z "$version" ] || dpkg --compare-versions "$v" gt "$version"; then version=$v; fi
    done
    log "WARNING: python3.13=$DEB_VERSION is not on the mirror; using the newest, $version"
fi
log "downloading the source of python3.13=$version"
mkdir "$WORK/dl"
# apt downloads as the _apt user where it can write; otherwise it warns and downloads as root.
if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$WORK/dl"; fi
(cd "$WORK/dl" && "${SUDO[@]}" apt-get source --download-only -qq "python3.13=$version") \
    >>"$LOG" 2>&1 || die "apt-get source python3.13=$version failed"
dsc=$(ls "$WORK"/dl/python3.13_*.dsc)

# 4. Pristine upstream tree plus Debian's fixes.
log "unpacking $(basename "$dsc")"
dpkg-source --skip-patches -x "$dsc" "$WORK/src" >>"$LOG" 2>&1 || die "dpkg-source -x failed"
cd "$WORK/src"
applied=() skipped=() failed=()
while read -r patch _; do
    case "$patch" in "" | "#"*) continue ;; esac
    for pattern in "${SKIP_PATCHES[@]}"; do
        # shellcheck disable=SC2254
        case "$patch" in $pattern) skipped+=("$patch"); continue 2 ;; esac
    done
    if patch -p1 --forward --batch --dry-run -s <"debian/patches/$patch" >>"$LOG" 2>&1; then
        patch -p1 --forward --batch -s <"debian/patches/$patch" >>"$LOG" 2>&1
        applied+=("$patch")
    else
        failed+=("$patch")
    fi
done <debian/patches/series
log "applied ${#applied[@]} Debian fix patches, skipped ${#skipped[@]} packaging ones"
[ "${#failed[@]}" -eq 0 ] || log "WARNING: these Debian patches do not apply and were left out: ${failed[*]}"
upstream=$(sed -n 's/^#define PY_VERSION[[:space:]]*"\(.*\)"/\1/p' Include/patchlevel.h)

# 5. Configure, build, install, check.
STAGE=$WORK/stage
CONFIGURE_ARGS=(--prefix="$CACHE" --disable-gil --with-lto=no --without-ensurepip)
log "configure ${CONFIGURE_ARGS[*]} (log: $LOG)"
t=$SECONDS
./configure "${CONFIGURE_ARGS[@]}" >>"$LOG" 2>&1 || die "configure failed"
log "make -j$JOBS"
make -j"$JOBS" >>"$LOG" 2>&1 || die "make failed"
log "built in $((SECONDS - t)) s; make install"
make install DESTDIR="$STAGE" >>"$LOG" 2>&1 || die "make install failed"

{
    echo "python3.13 source package: $version (wanted $DEB_VERSION)"
    echo "upstream version: $upstream"
    echo "configure: ${CONFIGURE_ARGS[*]}"
    echo "debian patches applied: ${applied[*]}"
    echo "debian patches skipped: ${skipped[*]}"
    echo "debian patches that did not apply: ${failed[*]:-}"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $((SECONDS - START)) s"
} >"$STAGE$CACHE/$STAMP"
rm -rf "$CACHE"
mv "$STAGE$CACHE" "$CACHE"

PYTHON_GIL=0 "$PY" -c '
import sys
assert not sys._is_gil_enabled(), "the GIL is enabled"
import bz2, ctypes, lzma, readline, sqlite3, ssl, uuid, zlib
print(sys.version)' >>"$LOG" 2>&1 || die "$PY is not a working free-threaded interpreter"
if ! { "$PY" -m venv "$WORK/venv" && "$WORK/venv/bin/python" -m pip --version; } >>"$LOG" 2>&1; then
    die "$PY -m venv does not give a working pip"
fi
usable || die "$PY does not pass the cache check"

log "Python $upstream (Debian source $version), free-threaded, in $((SECONDS - START)) s total"
printf '%s\n' "$PY"
