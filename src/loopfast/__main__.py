"""``python -m loopfast``: the command-line tools (loopfast.tools.cli)."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
