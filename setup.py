"""Extension building here; everything else is in pyproject.toml (as borg does).

The native engine links the system's xxHash C library, found through pkg-config; the Linux calls
(_linux) need only the C library.
VIMGTOOLS_DEBUG_BUILD=1 builds them with -O0 -g and Cython bounds checks.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup

XXHASH_MISSING = """
vimgtools build: the xxHash C library (libxxhash, with xxhash.h and libxxhash.pc)
was not found through pkg-config. Install it, then build again:
    Debian/Ubuntu:  apt-get install libxxhash-dev pkg-config
    Fedora/RHEL:    dnf install xxhash-devel pkgconf
    Alpine:         apk add xxhash-dev pkgconf
"""


def xxhash_flags() -> dict[str, list[str]]:
    try:
        import pkgconfig
    except ImportError:
        sys.exit("vimgtools build: the 'pkgconfig' Python package is missing (pip install pkgconfig)")
    try:
        if pkgconfig.exists("libxxhash"):
            return pkgconfig.parse("libxxhash")
    except OSError:  # no pkg-config program at all
        pass
    sys.exit(XXHASH_MISSING)


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    debug = os.environ.get("VIMGTOOLS_DEBUG_BUILD") == "1"
    flags = xxhash_flags()
    ext = Extension(
        "vimgtools._blockdiff",
        ["src/vimgtools/_blockdiff.pyx"],
        include_dirs=flags.get("include_dirs", []),
        library_dirs=flags.get("library_dirs", []),
        libraries=flags.get("libraries", []) or ["xxhash"],
        # The system's xxhash.h (found above) compiled into the engine at -O3, as a C program using
        # it would: 0.93-1.0 of a plain C loop, against 0.70 calling Debian's -O2 libxxhash.so.
        define_macros=[("XXH_INLINE_ALL", "1")],
        # -O3 but no -march=native: the wheel must run on any x86-64.
        extra_compile_args=["-O0", "-g"] if debug else ["-O3"],
    )
    linux = Extension(
        "vimgtools._linux",
        ["src/vimgtools/_linux.pyx"],
        extra_compile_args=["-O0", "-g"] if debug else [],
    )
    directives = {"boundscheck": True, "wraparound": True} if debug else {}
    return cythonize([ext, linux], compiler_directives=directives, language_level=3)


setup(ext_modules=extensions())
