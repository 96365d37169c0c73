"""The shared input and value checks (``seqblocks/layers/checks.py``): each message names the value and the
range it had to lie in, with either bound open, closed or absent."""

from __future__ import annotations

import math
import re

import pytest

from seqblocks.layers.checks import check_range


@pytest.mark.parametrize(("lo", "hi", "kw", "value", "interval"), [
    (None, 1.0, {}, 2.0, "(-inf, 1]"),
    (0.0, None, {"lo_open": True}, 0.0, "(0, inf)"),
    (0.0, 1.0, {"hi_open": True}, 1.0, "[0, 1)"),
    (2.0, None, {"lo_name": "dt_min"}, 1.0, "[dt_min=2, inf)"),
])
def test_check_range_names_the_interval(lo, hi, kw, value, interval):
    with pytest.raises(ValueError, match=rf"X: v must lie in {re.escape(interval)}, got {value!r}"):
        check_range("X", "v", value, lo, hi, **kw)


def test_check_range_accepts_values_inside_and_refuses_non_finite():
    check_range("X", "v", 0.5, None, 1.0)
    check_range("X", "v", 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        check_range("X", "v", math.nan, 0.0, 1.0)
