"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module, restored afterwards.

    Many tests run small tensors through long Python loops or many small LAPACK calls; on a small
    shared machine a second OpenMP thread mostly waits (a 2x2 eigh took 6 ms instead of 20 us), and
    bit-for-bit comparisons against subprocesses need the same thread count on both sides.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
