"""Type-check README.md's Python examples with mypy --strict.

    python tools/check_readme_types.py

Each ```python block is checked as a module of its own: every example runs as written, on its
own (tests/package/test_docs.py runs them too). Exit status: mypy's.
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_examples() -> list[str]:
    """The ```python blocks of README.md, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, block in enumerate(readme_examples()):
            path = Path(tmp) / f"readme_example_{i}.py"
            path.write_text(block, encoding="utf-8")
            paths.append(str(path))
        # One run, each file a module of its own (mypy checks them separately by name).
        result = subprocess.run([sys.executable, "-m", "mypy", "--strict",
                                 "--config-file", str(ROOT / "pyproject.toml"), *paths],
                                cwd=ROOT)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
