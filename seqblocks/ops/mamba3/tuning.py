"""Launch parameters of the Triton Mamba-3 kernels, passed explicitly (``mamba3(tuning=...)``).

A ``Mamba3Tuning`` is a frozen value read for one call; no module-level setting changes it. Tuning
changes speed only: every value computes the same function (tested under the interpreter). The defaults
fit sm_90 at mamba_ssm's shapes (N 128, P 64, SISO and MIMO rank 4) without register spills worth the
name (``tests/test_mamba3_triton.py::test_kernels_fit_sm90`` compiles them). This module imports no Triton.
"""

from __future__ import annotations

import dataclasses

from seqblocks.ops.scan.tuning import check_launch_value

__all__ = ["Mamba3Tuning"]


@dataclasses.dataclass(frozen=True)
class Mamba3Tuning:
    """Block shapes, warps and stages of the Mamba-3 chunked-scan kernels.

    Attributes:
        rows (int): most rows (time steps x rank) of a kernel chunk; the chunk is
            min(chunk_size, rows / R) steps (and at least 16 / R: ``tl.dot`` needs 16 rows). Power of
            two >= 16. Default: 32 (64 spills registers in the backward at N 128).
        block_p (int): head-width slice of the state per forward program (the programs of one head
            share nothing but the recomputed [rows, rows] scores). Power of two >= 16. Default: 32.
        block_n (int): state-width slice per backward program; dx and the per-step scalar gradients
            are summed over the N / block_n slices afterwards. Power of two >= 16. Default: 32.
        fwd_num_warps, bwd_num_warps (int): warps per program. Default: 8, 8.
        num_stages (int): software-pipelining stages of the chunk loops. Default: 1 (more stages
            buy shared memory the tiles need).
        step_block_p (int): head-width slice per program of the decode-step kernel. Power of two >= 1.
            Default: 16.
        step_num_warps (int): warps per program of the decode-step kernel. Default: 4.

    Raises:
        TypeError / ValueError: a field outside the values above.
    """

    rows: int = 32
    block_p: int = 32
    block_n: int = 32
    fwd_num_warps: int = 8
    bwd_num_warps: int = 8
    num_stages: int = 1
    step_block_p: int = 16
    step_num_warps: int = 4

    def __post_init__(self) -> None:
        owner = "Mamba3Tuning"
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is None:
                raise TypeError(f"{owner}: {field.name} must be an int, got None")
        for name in ("rows", "block_p", "block_n"):
            check_launch_value(owner, name, getattr(self, name), minimum=16)
        check_launch_value(owner, "step_block_p", self.step_block_p)
        for name in ("fwd_num_warps", "bwd_num_warps", "step_num_warps"):
            check_launch_value(owner, name, getattr(self, name), warps=True)
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 4:
            raise ValueError(f"{owner}: num_stages={self.num_stages!r} must be an int in [1, 4]")
