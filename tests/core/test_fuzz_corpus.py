"""The frame-decoder fuzz corpus (tools/fuzz/corpus/frames) as a regression suite.

Every corpus file is a byte stream a peer sends after the handshake; it is replayed through the
fuzz harness's own check (tools/fuzz/frames_check.py, no atheris needed) on both implementations,
with a few receive-call sequences each: every message the channel returns must be the one the
reference parser finds in the stream, and the stream must end with the right exception.
frames_check refuses pickle globals (an audit hook, inert outside its checks) so that the object
frames of the corpus are unpickled without running code.
"""

import os
import sys

import pytest
from conftest import IMPLEMENTATIONS

FUZZ_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools", "fuzz")
CORPUS = os.path.join(FUZZ_DIR, "corpus", "frames")
sys.path.insert(0, FUZZ_DIR)
import frames_check  # noqa: E402

SEEDS = range(4)  # receive-call sequences per file (read sizes, methods, write chunks)
CORPUS_FILES = sorted(os.listdir(CORPUS))


def read(name):
    with open(os.path.join(CORPUS, name), "rb") as f:
        return f.read()


@pytest.mark.parametrize("name", CORPUS_FILES)
@pytest.mark.parametrize("impl_name", sorted(IMPLEMENTATIONS))
def test_corpus_file_decodes_as_the_reference_parser_says(impl_name, name):
    data = read(name)
    for seed in SEEDS:
        frames_check.check(IMPLEMENTATIONS[impl_name], data, seed)


def test_corpus_has_seeds_of_every_outcome():
    """The corpus exercises clean ends, protocol errors, cut frames and refused object frames."""
    ends = {frames_check.parse_stream(read(name))[1][0] for name in CORPUS_FILES}
    assert ends == {"eof", "error", "plain_truncated", "object_bad"}


class _DropsLastByte(IMPLEMENTATIONS["pure"]):
    def recv_bytes(self, *args, **kwargs):
        return super().recv_bytes(*args, **kwargs)[:-1]


def test_check_reports_a_decoder_that_corrupts_messages():
    with pytest.raises(frames_check.Finding, match="returned"):
        for seed in SEEDS:
            frames_check.check(_DropsLastByte, read("seed-batch-small"), seed)


def test_fuzzed_pickles_cannot_load_globals():
    """An object frame whose pickle calls os.system is unpickled with globals refused."""
    stream = bytes.fromhex("03000000" "01000000") + (16 + 30 + 1).to_bytes(8, "little")
    pickle_bytes = b"cos\nsystem\n(S'exit 3'\ntR." + b"." * 5
    stream += (30).to_bytes(8, "little") + (1).to_bytes(8, "little") + pickle_bytes + b"x"
    messages, end = frames_check.parse_stream(stream)
    assert end == ("eof",) and len(messages) == 1
    outcome = frames_check.outcome_of_unpickle(messages[0][1], [bytearray(b"x")])
    assert outcome == ("raises", "PickleGlobalRefused", "os.system")
