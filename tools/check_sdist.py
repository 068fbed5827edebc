"""Check that an sdist holds exactly the tracked files that building and testing need.

    python tools/check_sdist.py dist/loopfast-X.tar.gz

Every file tracked by git must be in the sdist, except CI-only files (NOT_SHIPPED); and the sdist
must hold nothing else, except the metadata the build adds (GENERATED). Exit status 1 otherwise.
"""

import subprocess
import sys
import tarfile
from fnmatch import fnmatch
from pathlib import Path

NOT_SHIPPED = [".github/*", ".ci/*", ".gitignore"]
GENERATED = ["PKG-INFO", "setup.cfg", "src/loopfast.egg-info/*"]


def sdist_files(path):
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    return {name.split("/", 1)[1] for name in names}


def git_files(root):
    out = subprocess.run(["git", "ls-files"], cwd=root, check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    shipped = sdist_files(argv[1])
    tracked = {f for f in git_files(root) if not any(fnmatch(f, p) for p in NOT_SHIPPED)}
    extra = {f for f in shipped - tracked if not any(fnmatch(f, p) for p in GENERATED)}
    missing = tracked - shipped
    for name in sorted(missing):
        print(f"missing from the sdist: {name}")
    for name in sorted(extra):
        print(f"in the sdist but not tracked by git (build output?): {name}")
    if missing or extra:
        return 1
    print(f"sdist ok: {len(shipped)} files, the {len(tracked)} tracked ones plus build metadata")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
