"""Shared fixtures. Every test starts from a fixed seed so failures reproduce."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's generators before each test; the value is available to tests that want it."""
    torch.manual_seed(0)
    return 0
