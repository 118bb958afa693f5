"""Fixtures of the runner tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """Sequential references run with one thread, as each pipeline stage does here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
