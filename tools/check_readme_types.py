"""Type-check README.md's Python examples with mypy --strict.

    python tools/check_readme_types.py

The ```python blocks are checked in order as one module (later examples use names that earlier
ones import), so they must stay valid, self-consistent code. Exit status: mypy's.
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_examples() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    return "\n\n".join(blocks)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "readme_examples.py"
        path.write_text(readme_examples(), encoding="utf-8")
        result = subprocess.run([sys.executable, "-m", "mypy", "--strict",
                                 "--config-file", str(ROOT / "pyproject.toml"), str(path)],
                                cwd=ROOT)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
