"""Build of the compiled channel. Metadata lives in pyproject.toml.

Where the extension cannot be built (no C compiler, no Python headers), the package installs
without it and runs on its pure-Python twin, with a warning that says so (as aiohttp, propcache
and frozenlist do). LOOPFAST_REQUIRE_EXTENSIONS=1 makes a failed build an error instead: CI and
the wheel builds set it, so that a wheel never ships without its core by accident.
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

REQUIRE_ENV = "LOOPFAST_REQUIRE_EXTENSIONS"


def _required():
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


class OptionalBuildExt(build_ext):
    """build_ext that, unless the extension is required, warns and goes on without it."""

    _FAILURES = (CCompilerError, ExecError, PlatformError, OSError, ValueError)

    def run(self):
        try:
            super().run()
        except self._FAILURES as exc:
            self._without(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except self._FAILURES as exc:
            self._without(exc, ext.name)

    @staticmethod
    def _without(exc, name="loopfast._core.channel"):
        if _required():
            raise
        bar = "*" * 78
        print(f"\n{bar}\nWARNING: the compiled extension {name} could not be built "
              f"({type(exc).__name__}: {exc}).\nloopfast is installed without it and runs on "
              f"its pure-Python twin: the same API, slower, and it never busy-polls.\nInstall "
              f"a C compiler and the Python headers (python3-dev) and reinstall for the compiled "
              f"core; set {REQUIRE_ENV}=1 to make this an error.\n{bar}\n", file=sys.stderr)

define_macros = []
if os.environ.get("LOOPFAST_DEBUG"):
    define_macros.append(("LOOPFAST_DEBUG", "1"))

if sys.platform == "win32":
    libraries = ["ws2_32"]
    extra_compile_args = []
    extra_link_args = []
else:
    libraries = []
    extra_compile_args = ["-Wall"]
    extra_link_args = []
    if os.environ.get("LOOPFAST_DEBUG"):
        extra_compile_args += ["-O0", "-g"]
    if os.environ.get("LOOPFAST_SANITIZE"):
        # AddressSanitizer + UndefinedBehaviorSanitizer; run with libasan preloaded (see
        # tools/sanitize.sh, which .github/workflows/ci.yml runs).
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
        extra_compile_args += sanitize
        extra_link_args += sanitize

extensions = [
    Extension(
        "loopfast._core.channel",
        ["src/loopfast/_core/channel.pyx"],
        # platform.h sits beside channel.pyx (and the generated channel.c): a quoted #include
        # finds it there, so no include directory is added (it could shadow a system header).
        libraries=libraries,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    ),
]

setup(
    cmdclass={"build_ext": OptionalBuildExt},
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "embedsignature": True,
            "embedsignature.format": "clinic",
            # Index math in _core/channel.pyx is on raw pointers, covered by the framing tests.
            "boundscheck": False,
            "wraparound": False,
        },
    ),
)
