"""The channel itself, twice: the compiled core (channel.pyx, with platform.h behind it) and its
pure-Python twin (channel_py.py), side by side, with the same API, semantics and wire protocol.

Nothing is imported here: ``loopfast._backend`` imports the one this process uses, and never the
compiled module when the twin is asked for (LOOPFAST_NO_EXTENSIONS=1). Both import only the
package's leaf modules (_errors, _wire, _pickling, _peer), never the public API built on them.
"""
