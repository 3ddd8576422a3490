# Only what cffi needs: everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder", "native/build_ffi.py:testing_ffibuilder"])
