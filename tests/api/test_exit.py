"""A process that exits with a channel still open exits quietly."""

import os
import subprocess
import sys
import textwrap

import pytest

CHILD_KEEPS_ITS_END = textwrap.dedent("""
    import multiprocessing as mp
    import loopfast

    def child(channel):
        pass  # returns with `channel` still open

    if __name__ == "__main__":
        a, b = loopfast.Pipe()
        p = mp.get_context("spawn").Process(target=child, args=(b,))
        p.start()
        b.close()
        p.join(30)
        print("exit", p.exitcode)
""")


@pytest.mark.parametrize("pure", ["", "1"], ids=["default", "python"])
def test_spawned_child_exiting_with_an_open_channel_prints_nothing(tmp_path, pure):
    script = tmp_path / "child_keeps_its_end.py"
    script.write_text(CHILD_KEEPS_ITS_END)
    env = dict(os.environ, LOOPFAST_NO_EXTENSIONS=pure)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.stdout.strip() == "exit 0"
    assert result.stderr == ""
