"""CPython's Lib/test/_test_multiprocessing.py test classes for one start method, taken from
the interpreter's own `test` package, unmodified (the same call as CPython's
test_multiprocessing_<method> modules). The method comes from LOOPFAST_CONFORMANCE_METHOD.

A module of its own, not built in memory: spawn and forkserver children import the test
classes by module name to unpickle what a test runs in them."""

import os

from test._test_multiprocessing import install_tests_in_module_dict

install_tests_in_module_dict(globals(), os.environ["LOOPFAST_CONFORMANCE_METHOD"])
