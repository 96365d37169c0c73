"""Shared fixtures. Every test starts from a fixed seed so failures reproduce."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's generators before each test; the value is available to tests that want it."""
    torch.manual_seed(0)
    return 0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 msg: str = "") -> None:
    """``torch.testing.assert_close`` comparing in fp32/complex with explicit tolerances."""
    if actual.is_complex() or expected.is_complex():
        actual, expected = actual.to(torch.complex64), expected.to(torch.complex64)
    else:
        actual, expected = actual.float(), expected.float()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=(lambda m: f"{msg}\n{m}") if msg else None)
