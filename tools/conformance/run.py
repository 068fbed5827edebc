"""CPython's own multiprocessing and concurrent.futures tests, stock and under loopfast.install().

    python tools/conformance/run.py [--method fork] [--suite mp] [--mode installed] [--json FILE]

For each start method this platform has (fork, spawn, forkserver) and each suite

- ``mp``: the classes of ``Lib/test/_test_multiprocessing.py`` for queues (Queue, JoinableQueue,
  SimpleQueue), pools (and pool workers' lifetime and errors), connections, listeners and poll,
  as CPython's test_multiprocessing_<method> builds them;
- ``cf``: the ProcessPoolExecutor classes of ``test_concurrent_futures`` (executor, wait,
  as_completed, shutdown, deadlock, initializer),

it runs the tests twice, each time in a fresh interpreter: stock, then with ``loopfast.install()``
called first, and prints ``N of M pass`` for both (M: the tests that ran, skipped ones apart),
then every test that passes stock and not installed. The tests come from the running
interpreter's own ``test`` package, unmodified; where it lacks a suite (some distributions
strip the test package), the suite is reported as missing, not as passing.

Exit status 0 when every test that passes stock passes installed, apart from the known
differences listed in KNOWN_DIFFERENCES (and README.md) with their reasons; 1 otherwise.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))

MP_CLASSES = (
    # Queue and JoinableQueue, pools, connections (Pipe), listeners, poll: on the processes type,
    # the one that uses multiprocessing.Pipe (threads and manager types use other transports).
    "WithProcessesTestQueue",
    "WithProcessesTestPool",
    "WithProcessesTestPoolWorkerErrors",
    "WithProcessesTestPoolWorkerLifetime",
    "WithProcessesTestConnection",
    "WithProcessesTestListener",
    "WithProcessesTestListenerClient",
    "WithProcessesTestPoll",
    "WithProcessesTestPicklingConnections",
    "WithProcessesTestPollEintr",
    # Plain test cases on the same objects.
    "TestSimpleQueue",
    "TestWait",
    "TestPoolNotLeakOnFailure",
    "TestIgnoreEINTR",
    "TestInvalidHandle",
    "TestTimeouts",
    "TestInitializers",
)

CF_MODULES = ("test_process_pool", "test_wait", "test_as_completed", "test_shutdown",
              "test_deadlock", "test_init")

METHOD_PREFIX = re.compile(r"^ProcessPool(Forkserver|Fork|Spawn)(?=[A-Z])")

# Tests that pass stock and cannot pass on TCP loopback, each with its reason (listed in
# README.md too). Matched on the test method's name.
KNOWN_DIFFERENCES = {
    name: ("multiprocessing.reduction.send_handle() passes a file descriptor with SCM_RIGHTS, "
           "which only a Unix socket carries; on a loopfast channel it raises OSError saying so")
    for name in ("test_fd_transfer", "test_large_fd_transfer", "test_missing_fd_transfer")
}

WORKER_TIMEOUT = 1800.0  # a whole suite for one method, in seconds
HANG_DUMP_AFTER = 300.0  # one test: dump every thread's stack after this long


def available_methods():
    import multiprocessing
    return [m for m in ("fork", "spawn", "forkserver")
            if m in multiprocessing.get_all_start_methods()]


# ---- the worker: one suite, one method, one mode, in a fresh interpreter ---------------------

def _iter_tests(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _iter_tests(item)
        else:
            yield item


def _mp_tests(method):
    os.environ["LOOPFAST_CONFORMANCE_METHOD"] = method
    sys.path.insert(0, HERE)
    import mp_tests
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for name in MP_CLASSES:
        cls = getattr(mp_tests, name, None)
        if cls is not None:
            suite.addTests(loader.loadTestsFromTestCase(cls))
    return suite


def _cf_tests(method):
    import importlib
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    try:
        package = importlib.import_module("test.test_concurrent_futures")
    except ImportError:
        return None
    if hasattr(package, "__path__"):  # 3.13 and later: a package of modules
        modules = []
        for name in CF_MODULES:
            try:
                modules.append(importlib.import_module(f"test.test_concurrent_futures.{name}"))
            except ImportError:
                pass
    else:  # 3.12 and earlier: one module
        modules = [package]
    for module in modules:
        for test in _iter_tests(loader.loadTestsFromModule(module)):
            match = METHOD_PREFIX.match(type(test).__name__)
            if match and match.group(1).lower() == method:
                suite.addTest(test)
    return suite


class _RecordingResult(unittest.TextTestResult):
    """Writes each test's outcome to a file as it ends (a line of JSON), so that what ran before
    a hang survives the worker being killed."""

    def __init__(self, record, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._record = record
        self._faulthandler = None

    def _write(self, test, outcome):
        self._record.write(json.dumps({"test": test.id(), "outcome": outcome}) + "\n")
        self._record.flush()

    def startTest(self, test):
        import faulthandler
        faulthandler.dump_traceback_later(HANG_DUMP_AFTER, exit=False)
        self._record.write(json.dumps({"test": test.id(), "outcome": "started"}) + "\n")
        self._record.flush()
        super().startTest(test)

    def stopTest(self, test):
        import faulthandler
        faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._write(test, "pass")

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._write(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._write(test, "fail")

    def addError(self, test, err):
        super().addError(test, err)
        # An error in a module or class fixture is not a test: record it under its own name.
        self._write(test, "error")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._write(test, "skip")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._write(test, "fail")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._write(test, "fail")


def worker(suite_name, method, mode, record_path):
    if mode == "installed":
        import loopfast
        loopfast.install()
    suite = _mp_tests(method) if suite_name == "mp" else _cf_tests(method)
    with open(record_path, "w") as record:
        if suite is None:
            record.write(json.dumps({"missing": True}) + "\n")
            return 0
        runner = unittest.TextTestRunner(
            stream=sys.stderr, verbosity=2,
            resultclass=lambda *a, **k: _RecordingResult(record, *a, **k))
        runner.run(suite)
    return 0


# ---- the driver ---------------------------------------------------------------------------

def read_record(path, timed_out):
    """{test id: outcome}; a test that started and never ended is a 'hang'. A test with
    several outcomes (a failed subtest, then the test's end) keeps its worst."""
    rank = {"pass": 0, "skip": 1, "fail": 2, "error": 3, "hang": 4}
    outcomes = {}
    missing = False
    try:
        with open(path) as record:
            for line in record:
                entry = json.loads(line)
                if entry.get("missing"):
                    missing = True
                    continue
                test, outcome = entry["test"], entry["outcome"]
                if outcome == "started":
                    outcomes.setdefault(test, "hang")
                    continue
                previous = outcomes.get(test)
                if previous is None or previous == "hang" or rank[outcome] > rank[previous]:
                    outcomes[test] = outcome
    except FileNotFoundError:
        pass
    if not timed_out:
        # Ended without a verdict but not killed: the worker crashed after it started it.
        outcomes = {t: ("error" if o == "hang" else o) for t, o in outcomes.items()}
    return None if missing else outcomes


def run_one(suite_name, method, mode, log_dir):
    fd, record_path = tempfile.mkstemp(prefix=f"{suite_name}-{method}-{mode}-", suffix=".jsonl",
                                       dir=log_dir)
    os.close(fd)
    log_path = record_path[:-len(".jsonl")] + ".log"
    started = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", suite_name, method, mode,
             record_path],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)
            proc.wait()
    elapsed = time.monotonic() - started
    return read_record(record_path, timed_out), elapsed, log_path


def summarize(outcomes):
    ran = [t for t, o in outcomes.items() if o != "skip"]
    passed = [t for t in ran if outcomes[t] == "pass"]
    return len(passed), len(ran), len(outcomes) - len(ran)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", action="append", choices=("fork", "spawn", "forkserver"),
                        help="start method (repeatable; default: every one this platform has)")
    parser.add_argument("--suite", action="append", choices=("mp", "cf"),
                        help="mp: _test_multiprocessing, cf: test_concurrent_futures "
                             "(repeatable; default: both)")
    parser.add_argument("--mode", action="append", choices=("stock", "installed"),
                        help="(repeatable; default: both)")
    parser.add_argument("--json", metavar="FILE", help="also write every outcome to FILE")
    parser.add_argument("--logs", metavar="DIR", help="keep the workers' logs in DIR")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    methods = args.method or available_methods()
    suites = args.suite or ["mp", "cf"]
    modes = args.mode or ["stock", "installed"]
    log_dir = args.logs or tempfile.mkdtemp(prefix="loopfast-conformance-")
    os.makedirs(log_dir, exist_ok=True)
    print(f"Python {sys.version.split()[0]} ({sys.executable}); logs in {log_dir}", flush=True)
    report = {}
    regressions = []
    for suite_name in suites:
        for method in methods:
            results = {}
            for mode in modes:
                outcomes, elapsed, _ = run_one(suite_name, method, mode, log_dir)
                results[mode] = outcomes
                if outcomes is None:
                    print(f"{suite_name:2} {method:10} {mode:9}  missing: this interpreter's "
                          f"test package has no such suite", flush=True)
                    continue
                passed, ran, skipped = summarize(outcomes)
                failing = sorted(t for t, o in outcomes.items() if o not in ("pass", "skip"))
                print(f"{suite_name:2} {method:10} {mode:9}  {passed} of {ran} pass "
                      f"({skipped} skipped, {elapsed:.0f} s)", flush=True)
                for test in failing:
                    print(f"      {outcomes[test]:5} {test}", flush=True)
            report[f"{suite_name}/{method}"] = results
            stock, installed = results.get("stock"), results.get("installed")
            if stock and installed:
                for test, outcome in sorted(stock.items()):
                    if outcome == "pass" and installed.get(test) != "pass":
                        regressions.append((suite_name, method, test, installed.get(test)))
    known = [r for r in regressions if r[2].rsplit(".", 1)[-1] in KNOWN_DIFFERENCES]
    unexpected = [r for r in regressions if r not in known]
    if "stock" in modes and "installed" in modes:
        if known:
            print(f"\n{len(known)} known differences (pass stock, cannot pass over TCP):")
            for suite_name, method, test, outcome in known:
                print(f"  {suite_name} {method} {test}: {outcome}")
            for name in sorted({r[2].rsplit(".", 1)[-1] for r in known}):
                print(f"    {name}: {KNOWN_DIFFERENCES[name]}")
        if unexpected:
            print(f"\n{len(unexpected)} tests pass stock and not under loopfast.install():")
            for suite_name, method, test, outcome in unexpected:
                print(f"  {suite_name} {method} {test}: {outcome}")
        else:
            print("\nEvery other test that passes stock passes under loopfast.install().")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": sys.version, "results": report, "known_differences": known,
                       "regressions": unexpected}, out, indent=1)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
