#!/usr/bin/env python3
"""atheris harness for the compiled frame decoder (loopfast._core.channel.Channel).

One input is the byte stream a peer sends after the handshake; frames_check.check() feeds it to a
compiled Channel and compares what comes out with the reference parser. Run it with
`bash tools/fuzz/run.sh [seconds]` (instrumented native build, see README.md), or directly:

    python tools/fuzz/fuzz_frames.py tools/fuzz/corpus/frames -max_total_time=60

Extra options after the corpus directory go to libFuzzer.
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("LOOPFAST_FUZZ_PYCOV", "1") == "1":
    # Python-level coverage of the reference parser too: it steers the fuzzer to new frame
    # shapes. LOOPFAST_FUZZ_PYCOV=0 leaves only the C extension's edges in libFuzzer's cov.
    with atheris.instrument_imports(include=["frames_check"]):
        import frames_check
else:
    import frames_check

import loopfast
from loopfast._core import channel as _channel

SEEDS = int(os.environ.get("LOOPFAST_FUZZ_SEEDS", "1"))  # receive-call sequences per input


def test_one_input(data):
    for seed in range(SEEDS):
        frames_check.check(_channel.Channel, data, seed)


def main():
    print(f"fuzzing {_channel.__file__} (loopfast {loopfast.__file__})", file=sys.stderr)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
