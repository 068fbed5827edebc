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
else:
    libraries = []
    extra_compile_args = ["-Wall"]
    if os.environ.get("LOOPFAST_DEBUG"):
        extra_compile_args += ["-O0", "-g"]

extensions = [
    Extension(
        "loopfast._channel",
        ["src/loopfast/_channel.pyx"],
        include_dirs=["src/loopfast"],
        libraries=libraries,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
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
