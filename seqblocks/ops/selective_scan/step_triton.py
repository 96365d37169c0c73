"""Triton kernels of Mamba's decode step: the conv update, the fused selective state update, and the
fused step that folds x_proj and dt_proj into them.

Imported only through the dispatchers (``selective_state_update`` in this package, ``conv_step`` and
``mamba_step`` in ``step.py``) once ``resolve_backend`` has chosen "triton".

Unfused, a Mamba layer's step is six launches: in_proj (cuBLAS), ``conv_step_triton`` (the depthwise conv
over the cached window + SiLU, the window shifted in place, the cache's token count advanced), x_proj
and dt_proj (cuBLAS, on views), ``selective_state_update_triton`` (softplus(dt + bias), ``A = -exp(A_log)``,
the state update in place in fp32, the C readout, the D skip and the SiLU(z) gate) and out_proj.
``mamba_step_triton`` makes it four: kernel A (``_mamba_conv_xproj_kernel``) is the conv step plus each
channel block's share of x_proj, written as fp32 partial sums [B, NBLK, R + 2N] (no atomics); kernel B
(``_mamba_dt_ssu_kernel``) adds the partials up in a fixed order, forms dt through dt_proj for its
channels, and runs the state update. The x_proj output stays in fp32 there, where the unfused step
rounds it to the activation dtype before dt_proj and the update.

Every kernel gives one program ``BLOCK_E`` channels of one row; the grids depend on shapes only and
nothing reads the device from the host, so a step can be captured in a CUDA graph.

Shapes: B batch, E channels, N state (padded to a power of two on chip), G groups of B / C, W conv width,
R dt rank, NBLK channel blocks of kernel A.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["conv_step_triton", "selective_state_update_triton", "mamba_step_triton", "mamba_step_config",
           "SERVED_DISCRETIZATIONS"]

# "zoh" needs an accurate expm1, which Triton's core language lacks; it stays on the PyTorch path.
SERVED_DISCRETIZATIONS = {"mamba": 0, "bilinear": 1, "dirac": 2}


def _block_e(batch: int, channels: int) -> int:
    # Decode is latency-bound: small blocks give enough programs to fill the GPU at batch 1.
    return 16 if batch * channels <= 16384 else 32 if batch * channels <= 65536 else 64


@triton.jit
def _conv_window_step(x_ptr, state_ptr, w_ptr, b_ptr, b, e, m, sxb, sxe, ssb, ssw, sse, swe, sww,
                      W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    # One token of the depthwise conv for channels e of row b: the new input and the W - 1 cached ones
    # against the taps (+ bias, SiLU), fp32; the window shifted in place (slot k - 1 takes slot k).
    x = tl.load(x_ptr + b * sxb + e * sxe, mask=m, other=0.0)
    acc = tl.load(w_ptr + e * swe + (W - 1) * sww, mask=m, other=0.0).to(tl.float32) * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e, mask=m, other=0.0).to(tl.float32)
    if W > 1:
        # The whole cached window as one [BLOCK_E, WP] tile (WP = W - 1 rounded up to a power of two), read
        # before anything is written back.
        k = tl.arange(0, WP)
        mk = m[:, None] & (k[None, :] < W - 1)
        row = state_ptr + b * ssb + e[:, None] * sse
        win = tl.load(row + k[None, :] * ssw, mask=mk, other=0.0)
        taps = tl.load(w_ptr + e[:, None] * swe + k[None, :] * sww, mask=mk, other=0.0)
        acc += tl.sum(taps.to(tl.float32) * win.to(tl.float32), axis=1)
        # A tile smaller than the program's threads is held by several threads: all of them must have read
        # the window before it is shifted, or a late reader's acc (which kernel A's x_proj tile takes
        # through a layout change) sees shifted slots. On the GPU that was a race (docs/kernels.md).
        tl.debug_barrier()
        tl.store(row + (k[None, :] - 1) * ssw, win, mask=mk & (k[None, :] >= 1))
        tl.store(state_ptr + b * ssb + e * sse + (W - 2) * ssw, x.to(state_ptr.dtype.element_ty), mask=m)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    return acc


@triton.jit
def _conv_step_kernel(x_ptr, state_ptr, w_ptr, b_ptr, y_ptr, off_ptr, E,
                      sxb, sxe, ssb, ssw, sse, swe, sww, syb,
                      W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                      ADVANCE: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    eb = tl.program_id(1)
    e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    acc = _conv_window_step(x_ptr, state_ptr, w_ptr, b_ptr, b, e, m, sxb, sxe, ssb, ssw, sse, swe, sww,
                            W, WP, HAS_BIAS, SILU)
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
        W=W, WP=triton.next_power_of_2(max(W - 1, 1)), HAS_BIAS=bias is not None,
        SILU=activation in ("silu", "swish"), ADVANCE=seqlen_offset is not None, BLOCK_E=BLOCK_E, num_warps=2,
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
    tl.debug_barrier()  # every (possibly replicated) thread has read the state before it is overwritten
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


# ---- the fused Mamba step: conv + x_proj partials (kernel A), dt_proj + state update (kernel B) ----------


@triton.jit
def _mamba_conv_xproj_kernel(x_ptr, cs_ptr, cw_ptr, cb_ptr, wx_ptr, xs_ptr, part_ptr, off_ptr,
                             E, J, NBLK,
                             sxb, sxe, ssb, ssw, sse, swe, sww, swxj, swxe, sxsb,
                             W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                             ADVANCE: tl.constexpr,
                             BLOCK_E: tl.constexpr, BLOCK_J: tl.constexpr):
    # Kernel A: the conv step of BLOCK_E channels of one row (as _conv_step_kernel), then this block's
    # share of x_proj, part[b, eb, j] = sum over its channels e of W_x[j, e] * xs[e], in fp32.
    b = tl.program_id(0)
    eb = tl.program_id(1)
    e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    acc = _conv_window_step(x_ptr, cs_ptr, cw_ptr, cb_ptr, b, e, m, sxb, sxe, ssb, ssw, sse, swe, sww,
                            W, WP, HAS_BIAS, SILU)
    xs = acc.to(xs_ptr.dtype.element_ty)
    tl.store(xs_ptr + b * sxsb + e, xs, mask=m)
    # x_proj reads xs as stored (rounded to its dtype), as the GEMM of the unfused step does.
    xv = tl.where(m, xs.to(tl.float32), 0.0)
    part_row = part_ptr + (b * NBLK + eb) * J
    for j0 in range(0, J, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mj = j < J
        w = tl.load(wx_ptr + j[:, None] * swxj + e[None, :] * swxe, mask=mj[:, None] & m[None, :], other=0.0)
        tl.store(part_row + j, tl.sum(w.to(tl.float32) * xv[None, :], axis=1), mask=mj)
    if ADVANCE:
        if eb == 0:
            tl.store(off_ptr + b, tl.load(off_ptr + b) + 1)


@triton.jit
def _sum_partials(row_ptr, cols, mask, NBLK, J, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    # x_dbl[cols] of one row: its NBLK partial sums added in a fixed order (chunks of BLOCK_K blocks in
    # turn), so every program of kernel B gets the same bits.
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for k0 in range(0, NBLK, BLOCK_K):
        kk = k0 + k
        p = tl.load(row_ptr + kk[:, None] * J + cols[None, :], mask=(kk < NBLK)[:, None] & mask[None, :], other=0.0)
        acc += tl.sum(p, axis=0)
    return acc


@triton.jit
def _mamba_dt_ssu_kernel(part_ptr, wdt_ptr, xs_ptr, z_ptr, state_ptr, a_ptr, d_ptr, bias_ptr, y_ptr,
                         E, N, R, J, NBLK,
                         swde, swdr, sxsb, szb, sze, ssb, sse, ssn, sae, san, syb,
                         METHOD: tl.constexpr, A_IS_LOG: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
                         HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    # Kernel B: x_dbl from the partials, dt = W_dt[e, :] @ x_dbl[:R] for BLOCK_E channels, then the
    # update of _ssu_kernel (one group, no delta_A).
    b = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    me = e < E
    part_row = part_ptr + b * NBLK * J
    dt = tl.zeros([BLOCK_E], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mr = r < R
        xr = _sum_partials(part_row, r, mr, NBLK, J, BLOCK_K, BLOCK_R)
        w = tl.load(wdt_ptr + e[:, None] * swde + r[None, :] * swdr, mask=me[:, None] & mr[None, :], other=0.0)
        dt += tl.sum(w.to(tl.float32) * xr[None, :], axis=1)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + e, mask=me, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    n = tl.arange(0, BLOCK_N)
    mn = n < N
    m2 = me[:, None] & mn[None, :]
    Bm = _sum_partials(part_row, R + n, mn, NBLK, J, BLOCK_K, BLOCK_N)
    Cm = _sum_partials(part_row, R + N + n, mn, NBLK, J, BLOCK_K, BLOCK_N)
    u = tl.load(xs_ptr + b * sxsb + e, mask=me, other=0.0).to(tl.float32)
    A = tl.load(a_ptr + e[:, None] * sae + n[None, :] * san, mask=m2, other=0.0).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    s_ptrs = state_ptr + b * ssb + e[:, None] * sse + n[None, :] * ssn
    h = tl.load(s_ptrs, mask=m2, other=0.0)
    if METHOD == 1:  # bilinear
        sA = dt[:, None] * A * 0.5
        a_bar = (1.0 + sA) / (1.0 - sA)
        gamma = dt[:, None] / (1.0 - sA)
    else:
        a_bar = tl.exp(dt[:, None] * A)
        if METHOD == 2:  # dirac
            gamma = tl.full((BLOCK_E, BLOCK_N), 1.0, tl.float32)
        else:  # mamba
            gamma = dt[:, None] + tl.zeros((BLOCK_E, BLOCK_N), tl.float32)
    h = a_bar * h + gamma * Bm[None, :] * u[:, None]
    tl.debug_barrier()  # as in _ssu_kernel
    tl.store(s_ptrs, h, mask=m2)
    y = tl.sum(Cm[None, :] * h, axis=1)
    if HAS_D:
        y += tl.load(d_ptr + e, mask=me, other=0.0).to(tl.float32) * u
    if HAS_Z:
        z = tl.load(z_ptr + b * szb + e * sze, mask=me, other=0.0).to(tl.float32)
        y = y * (z / (1.0 + tl.exp(-z)))
    tl.store(y_ptr + b * syb + e, y.to(y_ptr.dtype.element_ty), mask=me)


def mamba_step_config(batch: int, channels: int, d_state: int, dt_rank: int, *, block_e_conv: int | None = None,
                      block_k: int | None = None) -> dict[str, int]:
    """Block sizes and warps of the two fused-step kernels for a [batch, channels] step with state
    ``d_state`` and dt rank ``dt_rank`` (shapes only, so a captured graph keeps them).

    Kernel A gives a program ``BLOCK_E_A`` channels (64, or 128 above 4096 channels, to keep the partials
    NBLK x (R + 2N) that every program of kernel B adds up short) and walks x_proj's R + 2N rows in
    ``BLOCK_J`` chunks; kernel B takes the state update's ``BLOCK_E`` (as ``selective_state_update``),
    dt_proj's rank in ``BLOCK_R`` chunks and the partials ``BLOCK_K`` blocks at a time, so no tile
    exceeds 4096 elements. Four warps each (two for kernel B reached 168 registers a thread at E = 5120,
    batch 8, from the [BLOCK_E, BLOCK_R] and [BLOCK_K, BLOCK_R] tiles). ``block_e_conv`` / ``block_k``
    override the first and the last (tests use small ones to reach the chunked loops at small sizes)."""
    J = dt_rank + 2 * d_state
    block_a = block_e_conv or (64 if channels <= 4096 else 128)
    nblk = triton.cdiv(channels, block_a)
    block_n = triton.next_power_of_2(d_state)
    block_e = max(1, min(_block_e(batch, channels), 4096 // block_n))
    return {
        "BLOCK_E_A": block_a, "BLOCK_J": min(triton.next_power_of_2(J), max(1, 4096 // block_a)), "NBLK": nblk,
        "WARPS_A": 4,
        "BLOCK_E": block_e, "BLOCK_N": block_n, "BLOCK_R": min(triton.next_power_of_2(max(dt_rank, 1)), 64),
        "BLOCK_K": block_k or min(triton.next_power_of_2(nblk), 32),
        "WARPS_B": 4,
    }


def mamba_step_triton(
    x: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor, x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor, ssm_state: torch.Tensor, A: torch.Tensor, conv_bias: torch.Tensor | None = None,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, *, delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True, discretization: str = "mamba", a_is_log: bool = False,
    activation: str | None = "silu", seqlen_offset: torch.Tensor | None = None,
    block_e_conv: int | None = None, block_k: int | None = None,
) -> torch.Tensor:
    """The Triton path of ``mamba_step`` (two launches): x [B, E] and z [B, E] (any strides),
    conv_state [B, W - 1, E] shifted in place, conv_weight [E, W], x_proj_weight [R + 2N, E],
    dt_proj_weight [E, R], ssm_state [B, E, N] fp32 updated in place, A [E, N] -> y [B, E] in x's dtype.
    Allocates xs [B, E] and the fp32 partials [B, NBLK, R + 2N] besides y. Inputs are assumed valid (the
    dispatcher checked them)."""
    Bsz, E = x.shape
    W = conv_weight.shape[1]
    R = dt_proj_weight.shape[1]
    N = A.shape[1]
    J = R + 2 * N
    y = torch.empty(Bsz, E, dtype=x.dtype, device=x.device)
    if Bsz == 0:
        return y
    if E == 0:  # nothing to launch, but the cache still counts the token
        if seqlen_offset is not None:
            seqlen_offset.add_(1)
        return y
    cfg = mamba_step_config(Bsz, E, N, R, block_e_conv=block_e_conv, block_k=block_k)
    nblk = cfg["NBLK"]
    xs = torch.empty(Bsz, E, dtype=x.dtype, device=x.device)
    partials = torch.empty(Bsz, nblk, J, dtype=torch.float32, device=x.device)
    _mamba_conv_xproj_kernel[(Bsz, nblk)](
        x, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, x_proj_weight, xs,
        partials, seqlen_offset if seqlen_offset is not None else partials, E, J, nblk,
        x.stride(0), x.stride(1), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        conv_weight.stride(0), conv_weight.stride(1), x_proj_weight.stride(0), x_proj_weight.stride(1),
        xs.stride(0),
        W=W, WP=triton.next_power_of_2(max(W - 1, 1)), HAS_BIAS=conv_bias is not None,
        SILU=activation in ("silu", "swish"), ADVANCE=seqlen_offset is not None, BLOCK_E=cfg["BLOCK_E_A"],
        BLOCK_J=cfg["BLOCK_J"], num_warps=cfg["WARPS_A"],
    )
    dummy = xs
    _mamba_dt_ssu_kernel[(Bsz, triton.cdiv(E, cfg["BLOCK_E"]))](
        partials, dt_proj_weight, xs, z if z is not None else dummy, ssm_state, A, D if D is not None else dummy,
        delta_bias if delta_bias is not None else dummy, y, E, N, R, J, nblk,
        dt_proj_weight.stride(0), dt_proj_weight.stride(1), xs.stride(0),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), A.stride(0), A.stride(1), y.stride(0),
        METHOD=SERVED_DISCRETIZATIONS[discretization], A_IS_LOG=a_is_log, SOFTPLUS=delta_softplus,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        BLOCK_E=cfg["BLOCK_E"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["WARPS_B"],
    )
    return y
