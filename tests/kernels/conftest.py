"""Kernel tests compare each kernel with the reference path, so they run with kernels on whatever
LORAKIT_KERNELS says (a test that wants them off says so itself)."""
import pytest

from lorakit import kernels


@pytest.fixture(autouse=True)
def kernels_on():
    with kernels.enabled_as(True):
        yield
