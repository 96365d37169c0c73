"""Triton kernels of the diagonal-recurrence decode steps: ``linear_scan_step``, ``rglru_step``, ``s7_step``.

Imported only through ``seqblocks/ops/scan/step.py`` once ``resolve_backend`` has chosen "triton".
Each is one launch over the flattened state (one program per ``BLOCK`` elements), with the state
updated in place in fp32 and, when given, the cache's token count advanced by the first program.
A complex state is read and written as interleaved (real, imaginary) fp32 pairs. Grids depend on
shapes only: a step can be captured in a CUDA graph.

Shapes: B batch, S the state's trailing shape (flattened to S elements per row), E channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["linear_scan_step_triton", "rglru_step_triton", "s7_step_triton"]

_BLOCK = 256


@triton.jit
def _advance(off_ptr, nrows, ADVANCE: tl.constexpr, BLOCK: tl.constexpr):
    if ADVANCE:
        if tl.program_id(0) == 0:
            for start in range(0, nrows, BLOCK):
                r = start + tl.arange(0, BLOCK)
                tl.store(off_ptr + r, tl.load(off_ptr + r, mask=r < nrows, other=0) + 1, mask=r < nrows)


@triton.jit
def _linear_step_kernel(h_ptr, a_ptr, b_ptr, out_ptr, off_ptr, total, S, nrows, a_row_stride,
                        COMPLEX: tl.constexpr, ADVANCE: tl.constexpr, BLOCK: tl.constexpr):
    # Element i of the flattened [B, S] state; a is [B, S] (a_row_stride = S) or [S] (a_row_stride = 0).
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    ai = (i // S) * a_row_stride + i % S
    if COMPLEX:
        hr = tl.load(h_ptr + 2 * i, mask=m, other=0.0).to(tl.float32)
        hi = tl.load(h_ptr + 2 * i + 1, mask=m, other=0.0).to(tl.float32)
        ar = tl.load(a_ptr + 2 * ai, mask=m, other=0.0).to(tl.float32)
        aim = tl.load(a_ptr + 2 * ai + 1, mask=m, other=0.0).to(tl.float32)
        br = tl.load(b_ptr + 2 * i, mask=m, other=0.0).to(tl.float32)
        bi = tl.load(b_ptr + 2 * i + 1, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + 2 * i, ar * hr - aim * hi + br, mask=m)
        tl.store(out_ptr + 2 * i + 1, ar * hi + aim * hr + bi, mask=m)
    else:
        h = tl.load(h_ptr + i, mask=m, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ai, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + i, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, a * h + b, mask=m)
    _advance(off_ptr, nrows, ADVANCE, BLOCK)


def _flat(t: torch.Tensor) -> torch.Tensor:
    # Complex tensors as their interleaved real view; contiguous so that element i sits at offset i.
    t = t.contiguous()
    return torch.view_as_real(t) if t.is_complex() else t


def linear_scan_step_triton(state: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            seqlen_offset: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out = a * state + b for a contiguous fp32 / complex64 ``state`` [B, *S]; ``a`` [B, *S] or [*S],
    ``b`` [B, *S] (cast to the state's dtype on load). Inputs are assumed valid."""
    total = state.numel()
    rows = state.shape[0]
    S = max(1, total // max(1, rows))
    complex_ = state.is_complex()
    if complex_:
        a, b = a.to(state.dtype), b.to(state.dtype)  # no-ops for complex64 inputs
    shared = a.dim() == state.dim() - 1
    grid = (max(1, triton.cdiv(total, _BLOCK)),)
    flat_out = _flat(out)
    _linear_step_kernel[grid](
        _flat(state), _flat(a), _flat(b), flat_out, seqlen_offset if seqlen_offset is not None else flat_out,
        total, S, rows, 0 if shared else S,
        COMPLEX=complex_, ADVANCE=seqlen_offset is not None, BLOCK=_BLOCK, num_warps=4,
    )
    return out


@triton.jit
def _rglru_step_kernel(h_ptr, x_ptr, ga_ptr, gi_ptr, p_ptr, off_ptr, E, nrows, c,
                       sxb, sgab, sgib,
                       ADVANCE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < E
    x = tl.load(x_ptr + row * sxb + e, mask=m, other=0.0).to(tl.float32)
    r = tl.sigmoid(tl.load(ga_ptr + row * sgab + e, mask=m, other=0.0).to(tl.float32))
    gi = tl.sigmoid(tl.load(gi_ptr + row * sgib + e, mask=m, other=0.0).to(tl.float32))
    lam = -tl.load(p_ptr + e, mask=m, other=0.0).to(tl.float32)
    softplus = tl.where(lam > 20.0, lam, tl.maximum(lam, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(lam))))
    log_a = -c * r * softplus
    # sqrt(1 - a^2) = sqrt(-expm1(2 log a)): a series near a = 1, where 1 - exp would cancel.
    z = 2.0 * log_a
    one_minus = tl.where(z > -0.03, -z * (1.0 + z * (0.5 + z * (1.0 / 6.0 + z * (1.0 / 24.0)))), 1.0 - tl.exp(z))
    h_ptrs = h_ptr + row * E + e
    h = tl.exp(log_a) * tl.load(h_ptrs, mask=m, other=0.0) + tl.sqrt(one_minus) * (gi * x)
    tl.store(h_ptrs, h, mask=m)
    if tl.program_id(1) == 0:
        _advance(off_ptr, nrows, ADVANCE, BLOCK)


def rglru_step_triton(state: torch.Tensor, x: torch.Tensor, gate_a: torch.Tensor, gate_i: torch.Tensor,
                      a_param: torch.Tensor, c: float, seqlen_offset: torch.Tensor | None) -> torch.Tensor:
    """The Triton path of ``rglru_step``: state [B, E] contiguous fp32, updated in place and returned;
    x / gate_a / gate_i [B, E] with unit stride along E. Inputs are assumed valid."""
    Bsz, E = state.shape
    BLOCK = 128
    grid = (triton.cdiv(E, BLOCK), Bsz)
    _rglru_step_kernel[grid](
        state, x, gate_a, gate_i, a_param, seqlen_offset if seqlen_offset is not None else state, E, Bsz,
        float(c), x.stride(0), gate_a.stride(0), gate_i.stride(0),
        ADVANCE=seqlen_offset is not None, BLOCK=BLOCK, num_warps=4,
    )
    return state


@triton.jit
def _s7_step_kernel(h_ptr, x_ptr, p_ptr, lb_ptr, db_ptr, y_ptr, off_ptr, D, N, nrows, sxb, spb, syb,
                    ADVANCE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # One row per program. p_ptr is the row's x_proj output [Lambda N | B N*D | C D*N | D_t D | beta N].
    row = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    mn = n < N
    p = p_ptr + row * spb
    lam = tl.load(p + n, mask=mn, other=0.0).to(tl.float32) + tl.load(lb_ptr + n, mask=mn, other=0.0)
    a = 1.0 - 1.0 / (lam * lam + 0.5)
    bu = tl.load(p + N + 2 * N * D + D + n, mask=mn, other=0.0).to(tl.float32)  # beta
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        md = d < D
        x = tl.load(x_ptr + row * sxb + d, mask=md, other=0.0).to(tl.float32)
        Bm = tl.load(p + N + n[:, None] * D + d[None, :], mask=mn[:, None] & md[None, :], other=0.0)
        bu += tl.sum(Bm.to(tl.float32) * x[None, :], axis=1)
    h_ptrs = h_ptr + row * N + n
    h = a * tl.load(h_ptrs, mask=mn, other=0.0) + bu
    tl.store(h_ptrs, h, mask=mn)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        md = d < D
        x = tl.load(x_ptr + row * sxb + d, mask=md, other=0.0).to(tl.float32)
        Cm = tl.load(p + N + N * D + d[:, None] * N + n[None, :], mask=md[:, None] & mn[None, :], other=0.0)
        Dt = tl.load(p + N + 2 * N * D + d, mask=md, other=0.0).to(tl.float32) + tl.load(db_ptr + d, mask=md,
                                                                                          other=0.0)
        y = tl.sum(Cm.to(tl.float32) * h[None, :], axis=1) + Dt * x
        tl.store(y_ptr + row * syb + d, y, mask=md)
    _advance(off_ptr, nrows, ADVANCE, BLOCK_N)


def s7_step_triton(state: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, lambda_base: torch.Tensor,
                   d_base: torch.Tensor, seqlen_offset: torch.Tensor | None) -> torch.Tensor:
    """The Triton path of ``s7_step``: state [B, N] contiguous fp32 (updated in place), x [B, D] and proj
    [B, N + 2 N D + D + N] with unit stride along the last axis -> y [B, D] fp32."""
    Bsz, N = state.shape
    D = x.shape[1]
    y = torch.empty(Bsz, D, dtype=torch.float32, device=x.device)
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_D = max(16, min(triton.next_power_of_2(D), 4096 // BLOCK_N))
    _s7_step_kernel[(Bsz,)](
        state, x, proj, lambda_base, d_base, y, seqlen_offset if seqlen_offset is not None else y, D, N, Bsz,
        x.stride(0), proj.stride(0), y.stride(0),
        ADVANCE=seqlen_offset is not None, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return y
