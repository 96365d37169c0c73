"""Launch parameters of the Triton selective-scan kernels, passed explicitly (``selective_scan(tuning=...)``).

A ``SelectiveScanTuning`` is a frozen value read for one call. ``kernel`` picks the kernel design:
"ring" (the default: time loops over register load rings, ``triton.py``) or "chunked" (chunk tiles
composed with an associative scan, ``triton_chunked.py``). A field left None takes the default the
launcher picks for that design (from ``d_state``, the channels per group and whether the kernels are
interpreted; see docs/kernels.md). Block widths are clamped to the largest power of two dividing the channels of a
group of B / C (a program never spans two groups). Tuning changes speed only: every value computes the
same function (tested under the interpreter). This module imports no Triton.
"""

from __future__ import annotations

import dataclasses

from seqblocks.ops.scan.tuning import check_launch_value

__all__ = ["SelectiveScanTuning", "KERNELS"]

KERNELS = ("ring", "chunked")


@dataclasses.dataclass(frozen=True)
class SelectiveScanTuning:
    """Kernel design, block shapes, warps and load-ring options of the selective-scan kernels.

    Attributes:
        kernel (str): "ring" (time loops) or "chunked" (associative scans over chunk tiles). The
            fields below apply to both unless marked ring / chunked; their None defaults differ per
            design. Default: "ring" (a call with no tuning at all runs "chunked" on the GPU, the
            faster design there, and "ring" under the interpreter).
        fwd_block_d (int | None): channels per program of the forward. Power of two. Default: None
            (ring: 512 // d_state for d_state <= 64, else 2048 // d_state; chunked: 8).
        fwd_num_warps (int | None): warps per program of the forward. Default: None (ring: 1, 4 for
            d_state > 64; chunked: 1 up to d_state 64, then d_state // 64).
        fwd_ring (int): ring: register slots of the forward's load ring, 2 or 4. Default: 4.
        block_t (int | None): ring: the backward recomputes chunks of block_t steps (its history
            slot). Power of two >= 8 (the load rings divide it). Default: None (16).
        chunk_t (int | None): chunked: time steps per chunk of the backward (its register tiles
            hold chunk_t x d_state x bwd_block_d fp32). Power of two. Default: None (512 // (8 *
            d_state) per warp, between 2 and 64: 4 at d_state 16; at most the next power of two >= T).
        fwd_chunk_t (int | None): chunked: time steps per chunk of the forward. Power of two.
            Default: None (1024 // (8 * d_state) per warp, between 2 and 64: 8 at d_state 16).
        ckpt_t (int | None): how often the forward stores the state for the backward: every ckpt_t
            steps (a power of two; a value below the backward's chunk, block_t or chunk_t, and for
            chunked below fwd_chunk_t, is raised to it). Above the chunk the backward first rebuilds
            the chunk-start states of each ckpt_t segment in a forward pass (one more recomputation of
            the state) and the saved state shrinks by ckpt_t / chunk. Default: None (ring:
            8 * block_t; chunked: 128; 12.5 MB instead of 100 MB per Mamba layer of mamba-130m at
            B8 T2048).
        bwd_block_d (int | None): channels per program of the backward. Power of two. Default: None
            (ring: 256 // d_state, 2048 // d_state for d_state > 64; chunked: 8).
        bwd_num_warps (int | None): warps per program of the backward. Default: None (ring: 1, 4
            for d_state > 64; chunked: 1 up to d_state 32, then d_state // 32).
        fwd_maxnreg, bwd_maxnreg (int | None): chunked: the registers a thread may use (Triton's
            ``maxnreg``), 32 .. 255; fewer registers, more programs resident per SM. Default: None
            (forward uncapped; backward 168 for the default tile at d_state 16, which compiles for
            sm_90 without spills and fits 12 one-warp programs per SM; else uncapped).
        bwd_prefetch (bool | None): ring: the backward's adjoint walk also loads B, C and the recomputed
            state a step pair ahead (True) or where used (False); None: ahead for d_state <= 16.
            Default: False (True measured 3% faster at the benchmark shape, with register spills, and
            has not run the GPU tests yet).

    Raises:
        TypeError / ValueError: a field outside the values above.
    """

    kernel: str = "ring"
    fwd_block_d: int | None = None
    fwd_num_warps: int | None = None
    fwd_ring: int = 4
    block_t: int | None = None
    chunk_t: int | None = None
    fwd_chunk_t: int | None = None
    ckpt_t: int | None = None
    bwd_block_d: int | None = None
    bwd_num_warps: int | None = None
    bwd_prefetch: bool | None = False
    fwd_maxnreg: int | None = None
    bwd_maxnreg: int | None = None

    def __post_init__(self) -> None:
        owner = "SelectiveScanTuning"
        if self.kernel not in KERNELS:
            raise ValueError(f"{owner}: kernel={self.kernel!r} must be one of {KERNELS}")
        for name in ("fwd_block_d", "bwd_block_d"):
            check_launch_value(owner, name, getattr(self, name))
        for name in ("fwd_num_warps", "bwd_num_warps"):
            check_launch_value(owner, name, getattr(self, name), warps=True)
        check_launch_value(owner, "block_t", self.block_t, minimum=8)
        check_launch_value(owner, "ckpt_t", self.ckpt_t, minimum=8)
        for name in ("chunk_t", "fwd_chunk_t"):
            check_launch_value(owner, name, getattr(self, name))
        for name in ("fwd_maxnreg", "bwd_maxnreg"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 32 <= v <= 255):
                raise ValueError(f"{owner}: {name}={v!r} must be None or an int in 32 .. 255")
        if isinstance(self.fwd_ring, bool) or self.fwd_ring not in (2, 4):
            raise ValueError(f"{owner}: fwd_ring={self.fwd_ring!r} must be 2 or 4")
        if self.bwd_prefetch is not None and not isinstance(self.bwd_prefetch, bool):
            raise TypeError(f"{owner}: bwd_prefetch must be a bool or None, got {self.bwd_prefetch!r}")
