"""Fixtures of the kernel tests: kernels shared by the tests of a module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("ipykernel")

from kernel_helpers import MESSAGE, SIGNAL, Kernel, remove_specs


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    remove_specs()


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    """A message-mode kernel shared by the tests of a module."""
    k = Kernel(MESSAGE)
    yield k
    k.close()


@pytest.fixture(scope="module", params=[MESSAGE, SIGNAL], ids=["message", "signal"])
def any_kernel(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    """A kernel of each interrupt mode, shared by the tests of a module."""
    k = Kernel(request.param)
    yield k
    k.close()
