"""Build of the compiled channel. Metadata lives in pyproject.toml."""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

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
        "loopfast._channel",
        ["src/loopfast/_channel.pyx"],
        include_dirs=["src/loopfast"],
        libraries=libraries,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "embedsignature": True,
            # Index math in _channel.pyx is on raw pointers, covered by the framing tests.
            "boundscheck": False,
            "wraparound": False,
        },
    ),
)
