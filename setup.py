"""The one compiled part of Atrium: ``atrium.observability._pools`` (see its source). Everything else
about the package is in pyproject.toml. Optional: without a C compiler the project still installs,
and the memory trimmer gives back glibc's free pages only (tests/test_memory_pools.py then fails)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("atrium.observability._pools", ["atrium/observability/_pools.c"],
                             extra_compile_args=["-Wextra", "-Wno-unused-parameter"], optional=True)])
