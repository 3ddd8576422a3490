"""cffi builders (API mode) for the native sampler and its test helpers.

Built by setup.py (``cffi_modules``) into ``memprof_limits._native`` and
``memprof_limits._native_testing``.  The cdef is the part of each header
between the CDEF markers, so the header stays the single source of truth.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# setuptools wants source paths relative to the project root (the cwd of the build).
REL = os.path.relpath(HERE, os.getcwd())


def _cdef(header: str) -> str:
    with open(os.path.join(HERE, header)) as f:
        text = f.read()
    match = re.search(r"/\* CDEF-BEGIN \*/(.*)/\* CDEF-END \*/", text, re.S)
    assert match, f"{header}: no CDEF markers"
    return match.group(1)


_COMMON = {
    "include_dirs": [REL],
    "py_limited_api": False,
    # cffi defines Py_LIMITED_API otherwise, which hides PyMemAllocatorEx.
    "define_macros": [("_CFFI_NO_LIMITED_API", None)],
    "extra_compile_args": ["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    "libraries": ["m"],
}

ffibuilder = FFI()
ffibuilder.cdef(_cdef("sampler.h") + _cdef("memprof_api.h"))
ffibuilder.set_source(
    "memprof_limits._native",
    '#include "sampler.h"\n#include "memprof_api.h"',
    sources=[os.path.join(REL, f) for f in ("sampler.c", "masking.c", "memprof.c")],
    depends=[
        os.path.join(REL, h) for h in ("sampler.h", "internal.h", "memprof_api.h")
    ],
    **_COMMON,
)

testing_ffibuilder = FFI()
testing_ffibuilder.cdef(_cdef("testing.h"))
testing_ffibuilder.set_source(
    "memprof_limits._native_testing",
    '#include "testing.h"',
    sources=[os.path.join(REL, "testing.c")],
    depends=[os.path.join(REL, "testing.h")],
    **_COMMON,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
    testing_ffibuilder.compile(verbose=True)
