"""Launch parameters of the Triton selective-scan kernels, passed explicitly (``selective_scan(tuning=...)``).

A ``SelectiveScanTuning`` is a frozen value read for one call. A field left None takes the default the
launcher picks (from ``d_state``, the channels per group and whether the kernels are interpreted; see
docs/kernels.md). Block widths are clamped to the largest power of two dividing the channels of a
group of B / C (a program never spans two groups). Tuning changes speed only: every value computes the
same function (tested under the interpreter). This module imports no Triton.
"""

from __future__ import annotations

import dataclasses

from seqblocks.ops.scan.tuning import check_launch_value

__all__ = ["SelectiveScanTuning"]


@dataclasses.dataclass(frozen=True)
class SelectiveScanTuning:
    """Block shapes, warps and load-ring options of the selective-scan kernels.

    Attributes:
        fwd_block_d (int | None): channels per program of the forward time loop. Power of two.
            Default: None (512 // d_state for d_state <= 64, else 2048 // d_state).
        fwd_num_warps (int | None): warps per program of the forward. Default: None (1; 4 for
            d_state > 64).
        fwd_ring (int): register slots of the forward's load ring, 2 or 4. Default: 4.
        block_t (int | None): checkpoint interval: the forward stores the state every block_t steps
            and the backward recomputes chunks of that many. Power of two >= 8 (the load rings divide
            it). Default: None (16).
        ckpt_t (int | None): how often the forward stores the state for the backward: every ckpt_t
            steps (a power-of-two multiple of block_t; a smaller value is raised to block_t). Above
            block_t the backward first rebuilds the block_t checkpoints of each ckpt_t segment in a
            forward pass (one more recomputation of the state) and the saved state shrinks by
            ckpt_t / block_t. Default: None (8 * block_t: 12.5 MB instead of 100 MB per Mamba layer of
            mamba-130m at B8 T2048).
        bwd_block_d (int | None): channels per program of the backward. Power of two. Default: None
            (256 // d_state; 2048 // d_state for d_state > 64).
        bwd_num_warps (int | None): warps per program of the backward. Default: None (1; 4 for
            d_state > 64).
        bwd_prefetch (bool | None): the backward's adjoint walk also loads B, C and the recomputed
            state a step pair ahead (True) or where used (False); None: ahead for d_state <= 16.
            Default: False (True measured 3% faster at the benchmark shape, with register spills, and
            has not run the GPU tests yet).

    Raises:
        TypeError / ValueError: a field outside the values above.
    """

    fwd_block_d: int | None = None
    fwd_num_warps: int | None = None
    fwd_ring: int = 4
    block_t: int | None = None
    ckpt_t: int | None = None
    bwd_block_d: int | None = None
    bwd_num_warps: int | None = None
    bwd_prefetch: bool | None = False

    def __post_init__(self) -> None:
        owner = "SelectiveScanTuning"
        for name in ("fwd_block_d", "bwd_block_d"):
            check_launch_value(owner, name, getattr(self, name))
        for name in ("fwd_num_warps", "bwd_num_warps"):
            check_launch_value(owner, name, getattr(self, name), warps=True)
        check_launch_value(owner, "block_t", self.block_t, minimum=8)
        check_launch_value(owner, "ckpt_t", self.ckpt_t, minimum=8)
        if isinstance(self.fwd_ring, bool) or self.fwd_ring not in (2, 4):
            raise ValueError(f"{owner}: fwd_ring={self.fwd_ring!r} must be 2 or 4")
        if self.bwd_prefetch is not None and not isinstance(self.bwd_prefetch, bool):
            raise TypeError(f"{owner}: bwd_prefetch must be a bool or None, got {self.bwd_prefetch!r}")
