"""Triton kernels of Mamba's decode step: the conv update and the fused selective state update.

Imported only through the dispatchers (``selective_state_update`` in this package and
``seqblocks.ops.decode.conv1d_step``) once ``resolve_backend`` has chosen "triton".

A Mamba layer's step is then six launches: in_proj (cuBLAS), ``conv_step_triton`` (the depthwise conv
over the cached window + SiLU, the window shifted in place, the cache's token count advanced), x_proj
and dt_proj (cuBLAS, on views), ``selective_state_update_triton`` (softplus(dt + bias), ``A = -exp(A_log)``,
the state update in place in fp32, the C readout, the D skip and the SiLU(z) gate) and out_proj.

Both kernels give one program ``BLOCK_E`` channels of one row; the grid depends on shapes only and
nothing reads the device from the host, so a step can be captured in a CUDA graph.

Shapes: B batch, E channels, N state (padded to a power of two on chip), G groups of B / C, W conv width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["conv_step_triton", "selective_state_update_triton", "SERVED_DISCRETIZATIONS"]

# "zoh" needs an accurate expm1, which Triton's core language lacks; it stays on the PyTorch path.
SERVED_DISCRETIZATIONS = {"mamba": 0, "bilinear": 1, "dirac": 2}


def _block_e(batch: int, channels: int) -> int:
    # Decode is latency-bound: small blocks give enough programs to fill the GPU at batch 1.
    return 16 if batch * channels <= 16384 else 32 if batch * channels <= 65536 else 64


@triton.jit
def _conv_step_kernel(x_ptr, state_ptr, w_ptr, b_ptr, y_ptr, off_ptr, E,
                      sxb, sxe, ssb, ssw, sse, swe, sww, syb,
                      W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ADVANCE: tl.constexpr,
                      BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    eb = tl.program_id(1)
    e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    x = tl.load(x_ptr + b * sxb + e * sxe, mask=m, other=0.0)
    acc = tl.load(w_ptr + e * swe + (W - 1) * sww, mask=m, other=0.0).to(tl.float32) * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e, mask=m, other=0.0).to(tl.float32)
    row = state_ptr + b * ssb + e * sse
    for k in tl.static_range(W - 1):
        v = tl.load(row + k * ssw, mask=m, other=0.0)
        acc += tl.load(w_ptr + e * swe + k * sww, mask=m, other=0.0).to(tl.float32) * v.to(tl.float32)
        if k > 0:  # shift the window: slot k - 1 takes slot k's value (read just above)
            tl.store(row + (k - 1) * ssw, v, mask=m)
    if W > 1:
        tl.store(row + (W - 2) * ssw, x.to(state_ptr.dtype.element_ty), mask=m)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + b * syb + e, acc.to(y_ptr.dtype.element_ty), mask=m)
    if ADVANCE:
        if eb == 0:
            tl.store(off_ptr + b, tl.load(off_ptr + b) + 1)


def conv_step_triton(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     activation: str | None, seqlen_offset: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, E] (any strides), conv_state [B, W - 1, E] shifted in place, weight [E, W] -> y [B, E] in x's
    dtype; ``seqlen_offset`` [B] int64, when given, is advanced by one in the same launch."""
    Bsz, E = x.shape
    W = weight.shape[1]
    y = torch.empty(Bsz, E, dtype=x.dtype, device=x.device)
    if Bsz == 0 or E == 0:
        return y
    BLOCK_E = _block_e(Bsz, E) * 4  # no N axis: wider blocks, same registers
    grid = (Bsz, triton.cdiv(E, BLOCK_E))
    _conv_step_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, y,
        seqlen_offset if seqlen_offset is not None else y, E,
        x.stride(0), x.stride(1), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        weight.stride(0), weight.stride(1), y.stride(0),
        W=W, HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"), ADVANCE=seqlen_offset is not None,
        BLOCK_E=BLOCK_E, num_warps=2,
    )
    return y


@triton.jit
def _softplus(x):
    # log(1 + e^x) as torch computes it (identity above 20), without overflow for large x.
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.jit
def _ssu_kernel(state_ptr, u_ptr, dt_ptr, a_ptr, bm_ptr, cm_ptr, d_ptr, z_ptr, bias_ptr, da_ptr, y_ptr,
                E, N, per_group,
                ssb, sse, ssn, sub, sue, sdb, sde, sae, san, sbb, sbg, sbn, scb, scg, scn, szb, sze, sdab, sdae,
                syb,
                METHOD: tl.constexpr, A_IS_LOG: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
                HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DA: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    me = e < E
    m2 = me[:, None] & (n[None, :] < N)
    u = tl.load(u_ptr + b * sub + e * sue, mask=me, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * sdb + e * sde, mask=me, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + e, mask=me, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    dtA = dt
    if HAS_DA:
        dtA = tl.load(da_ptr + b * sdab + e * sdae, mask=me, other=0.0).to(tl.float32)
    A = tl.load(a_ptr + e[:, None] * sae + n[None, :] * san, mask=m2, other=0.0).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    g = e // per_group
    Bm = tl.load(bm_ptr + b * sbb + g[:, None] * sbg + n[None, :] * sbn, mask=m2, other=0.0).to(tl.float32)
    Cm = tl.load(cm_ptr + b * scb + g[:, None] * scg + n[None, :] * scn, mask=m2, other=0.0).to(tl.float32)
    s_ptrs = state_ptr + b * ssb + e[:, None] * sse + n[None, :] * ssn
    h = tl.load(s_ptrs, mask=m2, other=0.0)
    if METHOD == 1:  # bilinear
        sA = dtA[:, None] * A * 0.5
        a_bar = (1.0 + sA) / (1.0 - sA)
        gamma = dt[:, None] / (1.0 - dt[:, None] * A * 0.5)
    else:
        a_bar = tl.exp(dtA[:, None] * A)
        if METHOD == 2:  # dirac
            gamma = tl.full((BLOCK_E, BLOCK_N), 1.0, tl.float32)
        else:  # mamba
            gamma = dt[:, None] + tl.zeros((BLOCK_E, BLOCK_N), tl.float32)
    h = a_bar * h + gamma * Bm * u[:, None]
    tl.store(s_ptrs, h, mask=m2)
    y = tl.sum(Cm * h, axis=1)
    if HAS_D:
        y += tl.load(d_ptr + e, mask=me, other=0.0).to(tl.float32) * u
    if HAS_Z:
        z = tl.load(z_ptr + b * szb + e * sze, mask=me, other=0.0).to(tl.float32)
        y = y * (z / (1.0 + tl.exp(-z)))
    tl.store(y_ptr + b * syb + e, y.to(y_ptr.dtype.element_ty), mask=me)


def selective_state_update_triton(
    state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, *, delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False, discretization: str = "mamba", delta_A: torch.Tensor | None = None,
    a_is_log: bool = False,
) -> torch.Tensor:
    """The Triton path of ``selective_state_update``: state [B, E, N] fp32 (updated in place), u / delta / z
    [B, E] (any strides), A [E, N] (log(-A) when ``a_is_log``), B / C [B, N] or [B, G, N] -> y [B, E] in
    u's dtype. Inputs are assumed valid (the dispatcher checked them)."""
    Bsz, E = u.shape
    N = A.shape[1]
    y = torch.empty(Bsz, E, dtype=u.dtype, device=u.device)
    if Bsz == 0 or E == 0:
        return y
    # [B, N] is one group: a zero group stride (strides read from the shape, no view made).
    b_strides = (B.stride(0), 0, B.stride(1)) if B.dim() == 2 else B.stride()
    c_strides = (C.stride(0), 0, C.stride(1)) if C.dim() == 2 else C.stride()
    per_group = E // (1 if B.dim() == 2 else B.shape[1])
    if delta_A is not None and delta_A.dim() == 1:
        da_strides = (delta_A.stride(0), 0)
    elif delta_A is not None:
        da_strides = (delta_A.stride(0), delta_A.stride(1))
    else:
        da_strides = (0, 0)
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_E = max(1, min(_block_e(Bsz, E), 4096 // BLOCK_N))
    grid = (Bsz, triton.cdiv(E, BLOCK_E))
    dummy = u
    _ssu_kernel[grid](
        state, u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, delta_A if delta_A is not None else dummy, y,
        E, N, per_group,
        state.stride(0), state.stride(1), state.stride(2), u.stride(0), u.stride(1), delta.stride(0),
        delta.stride(1), A.stride(0), A.stride(1), *b_strides, *c_strides,
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0, *da_strides, y.stride(0),
        METHOD=SERVED_DISCRETIZATIONS[discretization], A_IS_LOG=a_is_log, SOFTPLUS=delta_softplus,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_DA=delta_A is not None,
        BLOCK_E=BLOCK_E, BLOCK_N=BLOCK_N, num_warps=4 if BLOCK_E * BLOCK_N >= 1024 else 2,
    )
    return y
