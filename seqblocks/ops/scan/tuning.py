"""Launch parameters of the Triton linear-scan kernels, passed explicitly (``linear_scan(tuning=...)``).

A ``ScanTuning`` is a frozen value: the kernel reads it for one call and nothing else changes it. A
field left None takes the default the launcher picks for the call (from the dtype, the shapes and
whether the kernels are interpreted; see docs/kernels.md). Tuning changes speed only: every value
computes the same function (tested under the interpreter). This module imports no Triton.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ScanTuning", "check_launch_value"]

_WARPS = (1, 2, 4, 8, 16, 32)


def check_launch_value(owner: str, name: str, value: object, *, minimum: int = 1, warps: bool = False) -> None:
    """``value`` must be None, or a power-of-two int >= ``minimum`` (with ``warps``: one of 1 .. 32).

    Raises:
        TypeError: not an int (bools are refused). ValueError: not a power of two, too small, too many warps.
    """
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int or None, got {type(value).__name__} {value!r}")
    if warps and value not in _WARPS:
        raise ValueError(f"{owner}: {name}={value} must be one of {_WARPS}")
    if value < minimum or value & (value - 1):
        raise ValueError(f"{owner}: {name}={value} must be a power of two >= {minimum}")


@dataclasses.dataclass(frozen=True)
class ScanTuning:
    """Block shapes and warps of the linear-scan kernels (``seqblocks/ops/scan/triton.py``).

    Attributes:
        block_t (int | None): time steps per chunk (``BLOCK_T``), also the backward's checkpoint
            interval. Power of two. Default: None (32 on a GPU, 8 for complex inputs).
        block_d (int | None): channels per program of the forward (``BLOCK_D``). Power of two.
            Default: None (64).
        num_warps (int | None): warps per program of the forward. Default: None (2; 4 for fp32).
        bwd_block_d (int | None): channels per program of the backward. Default: None (32 for 2-byte
            inputs, else block_d).
        bwd_num_warps (int | None): warps per program of the backward. Default: None (1 for 2-byte
            inputs, else num_warps).

    Raises:
        TypeError / ValueError: a field that is not None or a power-of-two int (warps: 1 .. 32).
    """

    block_t: int | None = None
    block_d: int | None = None
    num_warps: int | None = None
    bwd_block_d: int | None = None
    bwd_num_warps: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_launch_value("ScanTuning", f.name, getattr(self, f.name), warps=f.name.endswith("warps"))
