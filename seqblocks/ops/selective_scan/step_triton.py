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
rounds it to the activation dtype before dt_proj and the update. ``mamba_layer_step_triton`` runs the
same two kernels with in_proj folded in (kernel A's ``IN_MODE`` 1: its channels' x rows applied to the
layer input; 2: the block's residual add and norm first, formed by every program for its row; kernel
B's ``Z_MODE`` 2: the z rows for the gate).

Every kernel gives one program ``BLOCK_E`` channels of one row; the grids depend on shapes only and
nothing reads the device from the host, so a step can be captured in a CUDA graph.

Shapes: B batch, E channels, N state (padded to a power of two on chip), G groups of B / C, W conv width,
R dt rank, NBLK channel blocks of kernel A.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["conv_step_triton", "selective_state_update_triton", "mamba_step_triton", "mamba_layer_step_triton",
           "mamba_step_config", "SERVED_DISCRETIZATIONS"]

# "zoh" needs an accurate expm1, which Triton's core language lacks; it stays on the PyTorch path.
SERVED_DISCRETIZATIONS = {"mamba": 0, "bilinear": 1, "dirac": 2}


def _block_e(batch: int, channels: int) -> int:
    # Decode is latency-bound: small blocks give enough programs to fill the GPU at batch 1.
    return 16 if batch * channels <= 16384 else 32 if batch * channels <= 65536 else 64


@triton.jit
def _conv_window_step(x, state_ptr, w_ptr, b_ptr, b, e, m, ssb, ssw, sse, swe, sww,
                      W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    # One token of the depthwise conv for channels e of row b: the new input x (its values, as the
    # activation dtype holds them) and the W - 1 cached ones against the taps (+ bias, SiLU), fp32; the
    # window shifted in place (slot k - 1 takes slot k).
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
    x = tl.load(x_ptr + b * sxb + e * sxe, mask=m, other=0.0)
    acc = _conv_window_step(x, state_ptr, w_ptr, b_ptr, b, e, m, ssb, ssw, sse, swe, sww, W, WP, HAS_BIAS, SILU)
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
#
# IN_MODE of kernel A says where the conv's input comes from: 0 loaded (in_proj's x half, computed
# before), 1 in_proj's x rows applied to the layer input h here, 2 the same after the block's residual
# add and norm, computed here from the block input and the residual. Z_MODE of kernel B likewise: 0 no
# gate, 1 loaded, 2 in_proj's z rows applied to h (the layer input, or the normed row kernel A stored).


@triton.jit
def _residual_chunk(x_ptr, res_ptr, rout_ptr, b, sxb, srb, d, md, HAS_RES: tl.constexpr):
    # x + residual for features d of row b in fp32, rounded to the stored residual's dtype (the norm reads
    # the residual as stored, as ops.add_norm does).
    r = tl.load(x_ptr + b * sxb + d, mask=md, other=0.0).to(tl.float32)
    if HAS_RES:
        r += tl.load(res_ptr + b * srb + d, mask=md, other=0.0).to(tl.float32)
    return r.to(rout_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _row_stats(x_ptr, res_ptr, rout_ptr, b, sxb, srb, Dm: tl.constexpr, eps, IS_RMS: tl.constexpr,
               HAS_RES: tl.constexpr, BLOCK_ROW: tl.constexpr):
    # Mean (0 for RMSNorm) and 1 / sqrt(var + eps) of row b's residual, the whole row in one tile (one
    # round trip to memory; BLOCK_ROW = next_pow2(D)), the variance about the mean (two-pass, from registers).
    d = tl.arange(0, BLOCK_ROW)
    md = d < Dm
    r = _residual_chunk(x_ptr, res_ptr, rout_ptr, b, sxb, srb, d, md, HAS_RES)
    mean = 0.0
    if not IS_RMS:
        mean = tl.sum(r, axis=0) / Dm
    c = tl.where(md, r - mean, 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / Dm + eps)


@triton.jit
def _in_proj_chunk(h_ptr, b, shb, shd, win_ptr, swio, swid, rows, mrows, d0, Dm: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    # in_proj's rows `rows` over features d0 .. d0 + BLOCK_D of row b of h, in fp32.
    d = d0 + tl.arange(0, BLOCK_D)
    md = d < Dm
    hv = tl.load(h_ptr + b * shb + d * shd, mask=md, other=0.0).to(tl.float32)
    w = tl.load(win_ptr + rows[:, None] * swio + d[None, :] * swid, mask=mrows[:, None] & md[None, :], other=0.0)
    return tl.sum(w.to(tl.float32) * hv[None, :], axis=1)


@triton.jit
def _in_proj_rows(h_ptr, b, shb, shd, win_ptr, swio, swid, rows, mrows, Dm: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr):
    # in_proj's output rows `rows` for row b of h: sum over d of W_in[rows, d] * h[b, d], in fp32. UNROLL
    # (few chunks) unrolls the loop, so that every chunk's loads are in flight at once.
    acc = tl.zeros([BLOCK_E], tl.float32)
    if UNROLL:
        for d0 in tl.static_range(0, Dm, BLOCK_D):
            acc += _in_proj_chunk(h_ptr, b, shb, shd, win_ptr, swio, swid, rows, mrows, d0, Dm, BLOCK_D)
    else:
        for d0 in range(0, Dm, BLOCK_D):
            acc += _in_proj_chunk(h_ptr, b, shb, shd, win_ptr, swio, swid, rows, mrows, d0, Dm, BLOCK_D)
    return acc


@triton.jit
def _norm_in_proj_chunk(x_ptr, res_ptr, nw_ptr, nb_ptr, rout_ptr, hout_ptr, win_ptr, b, sxb, srb, swio, swid,
                        e, m, d0, keep, mean, rstd, Dm: tl.constexpr, HAS_RES: tl.constexpr, HAS_NW: tl.constexpr,
                        HAS_NB: tl.constexpr, BLOCK_D: tl.constexpr):
    # Features d0 .. d0 + BLOCK_D of row b: the residual and the normed row h (stored where d < keep),
    # and in_proj's x rows e applied to them, in fp32.
    d = d0 + tl.arange(0, BLOCK_D)
    md = d < Dm
    r = _residual_chunk(x_ptr, res_ptr, rout_ptr, b, sxb, srb, d, md, HAS_RES)
    h = (r - mean) * rstd
    if HAS_NW:
        h = h * tl.load(nw_ptr + d, mask=md, other=0.0).to(tl.float32)
    if HAS_NB:
        h = h + tl.load(nb_ptr + d, mask=md, other=0.0).to(tl.float32)
    h = h.to(hout_ptr.dtype.element_ty)
    tl.store(rout_ptr + b * Dm + d, r.to(rout_ptr.dtype.element_ty), mask=d < keep)
    tl.store(hout_ptr + b * Dm + d, h, mask=d < keep)
    w = tl.load(win_ptr + e[:, None] * swio + d[None, :] * swid, mask=m[:, None] & md[None, :], other=0.0)
    return tl.sum(w.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)


@triton.jit
def _mamba_conv_xproj_kernel(x_ptr, res_ptr, nw_ptr, nb_ptr, rout_ptr, hout_ptr, win_ptr, bin_ptr,
                             cs_ptr, cw_ptr, cb_ptr, wx_ptr, xs_ptr, part_ptr, off_ptr,
                             Dm: tl.constexpr, E, J, NBLK, eps,
                             sxb, sxe, srb, swio, swid, ssb, ssw, sse, swe, sww, swxj, swxe, sxsb,
                             IN_MODE: tl.constexpr, IS_RMS: tl.constexpr, HAS_RES: tl.constexpr,
                             HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, HAS_IN_BIAS: tl.constexpr,
                             W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                             ADVANCE: tl.constexpr, UNROLL: tl.constexpr,
                             BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROW: tl.constexpr,
                             BLOCK_J: tl.constexpr):
    # Kernel A: the conv input of BLOCK_E channels of one row (IN_MODE above), its conv step (as
    # _conv_step_kernel), then this block's share of x_proj, part[b, eb, j] = sum over its channels e of
    # W_x[j, e] * xs[e], in fp32. In IN_MODE 2 every program normalises the whole row for itself (D
    # values, cheap beside its weight rows) and program 0 of the row stores the new residual and the
    # normed row, which kernel B reads.
    b = tl.program_id(0)
    eb = tl.program_id(1)
    e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    if IN_MODE == 0:
        x = tl.load(x_ptr + b * sxb + e * sxe, mask=m, other=0.0)
    else:
        if IN_MODE == 1:
            acc_in = _in_proj_rows(x_ptr, b, sxb, sxe, win_ptr, swio, swid, e, m, Dm, BLOCK_E, BLOCK_D, UNROLL)
        else:
            mean, rstd = _row_stats(x_ptr, res_ptr, rout_ptr, b, sxb, srb, Dm, eps, IS_RMS, HAS_RES, BLOCK_ROW)
            keep = tl.where(eb == 0, Dm, 0)  # the row's first program stores its residual and normed row
            acc_in = tl.zeros([BLOCK_E], tl.float32)
            if UNROLL:
                for d0 in tl.static_range(0, Dm, BLOCK_D):
                    acc_in += _norm_in_proj_chunk(x_ptr, res_ptr, nw_ptr, nb_ptr, rout_ptr, hout_ptr, win_ptr, b, sxb,
                                                  srb, swio, swid, e, m, d0, keep, mean, rstd, Dm, HAS_RES, HAS_NW,
                                                  HAS_NB, BLOCK_D)
            else:
                for d0 in range(0, Dm, BLOCK_D):
                    acc_in += _norm_in_proj_chunk(x_ptr, res_ptr, nw_ptr, nb_ptr, rout_ptr, hout_ptr, win_ptr, b, sxb,
                                                  srb, swio, swid, e, m, d0, keep, mean, rstd, Dm, HAS_RES, HAS_NW,
                                                  HAS_NB, BLOCK_D)
        if HAS_IN_BIAS:
            acc_in += tl.load(bin_ptr + e, mask=m, other=0.0).to(tl.float32)
        x = acc_in.to(xs_ptr.dtype.element_ty)  # in_proj's output, rounded as the GEMM's would be
    acc = _conv_window_step(x, cs_ptr, cw_ptr, cb_ptr, b, e, m, ssb, ssw, sse, swe, sww, W, WP, HAS_BIAS, SILU)
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
def _mamba_dt_ssu_kernel(part_ptr, wdt_ptr, xs_ptr, z_ptr, h_ptr, win_ptr, bin_ptr, state_ptr, a_ptr, d_ptr,
                         bias_ptr, y_ptr,
                         Dm: tl.constexpr, E, N, R, J, NBLK,
                         swde, swdr, sxsb, szb, sze, shb, shd, swio, swid, ssb, sse, ssn, sae, san, syb,
                         METHOD: tl.constexpr, A_IS_LOG: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
                         Z_MODE: tl.constexpr, HAS_IN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr):
    # Kernel B: x_dbl from the partials, dt = W_dt[e, :] @ x_dbl[:R] for BLOCK_E channels, then the
    # update of _ssu_kernel (one group, no delta_A), gated by z (Z_MODE above).
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
    if Z_MODE != 0:
        if Z_MODE == 1:
            z = tl.load(z_ptr + b * szb + e * sze, mask=me, other=0.0).to(tl.float32)
        else:
            z = _in_proj_rows(h_ptr, b, shb, shd, win_ptr, swio, swid, E + e, me, Dm, BLOCK_E, BLOCK_D, UNROLL)
            if HAS_IN_BIAS:
                z += tl.load(bin_ptr + E + e, mask=me, other=0.0).to(tl.float32)
            z = z.to(y_ptr.dtype.element_ty).to(tl.float32)  # in_proj's output, rounded
        y = y * (z / (1.0 + tl.exp(-z)))
    tl.store(y_ptr + b * syb + e, y.to(y_ptr.dtype.element_ty), mask=me)


# in_proj's column loops with at most this many chunks are unrolled (their loads all in flight at once).
_MAX_UNROLL = 16


def mamba_step_config(batch: int, channels: int, d_state: int, dt_rank: int, *, d_model: int | None = None,
                      block_e_conv: int | None = None, block_k: int | None = None,
                      block_d: int | None = None, warps: int | None = None) -> dict[str, int]:
    """Block sizes and warps of the two fused-step kernels for a [batch, channels] step with state
    ``d_state`` and dt rank ``dt_rank`` (shapes only, so a captured graph keeps them); ``d_model`` when
    in_proj is folded in (``mamba_layer_step_triton``).

    Kernel A gives a program ``BLOCK_E_A`` channels (64, or 128 above 4096 channels, to keep the partials
    NBLK x (R + 2N) that every program of kernel B adds up short) and walks x_proj's R + 2N rows in
    ``BLOCK_J`` chunks and in_proj's D columns in ``BLOCK_D_A`` chunks (tiles up to 16384 elements, 8 warps
    at batch 1: the fastest of ``benchmarks/mamba_step_fold.py``'s sweep on the H200); kernel B takes the
    state update's ``BLOCK_E`` (as ``selective_state_update``), dt_proj's rank in ``BLOCK_R`` chunks, the
    partials ``BLOCK_K`` blocks at a time and in_proj's z rows ``BLOCK_D_B`` columns at a time, tiles up to
    4096 elements. Four warps each, but kernel A folded at batch 1 (two for kernel B reached 168
    registers a thread at E = 5120, batch 8, from the [BLOCK_E, BLOCK_R] and [BLOCK_K, BLOCK_R] tiles).
    in_proj's column loops of at most 16 chunks are unrolled (``UNROLL_A`` / ``UNROLL_B``) so that their
    loads are in flight together, and the norm's statistics read the whole row at once (``BLOCK_ROW``).
    ``block_e_conv`` / ``block_k`` / ``block_d`` / ``warps`` override the first, the partials' chunk, both
    column chunks and both kernels' warps (tests use small ones to reach the chunked loops at small
    sizes; benchmarks sweep them)."""
    J = dt_rank + 2 * d_state
    folded = d_model is not None
    block_a = block_e_conv or (128 if channels > 4096 else 64)
    nblk = triton.cdiv(channels, block_a)
    block_n = triton.next_power_of_2(d_state)
    block_e = max(1, min(_block_e(batch, channels), 4096 // block_n))
    dpow = triton.next_power_of_2(max(d_model or 1, 1))
    block_d_a = block_d or min(dpow, max(16, 16384 // block_a))
    block_d_b = block_d or min(dpow, max(16, 4096 // block_e))
    chunks = (triton.cdiv(d_model or 0, block_d_a), triton.cdiv(d_model or 0, block_d_b))
    return {
        "BLOCK_E_A": block_a, "BLOCK_J": min(triton.next_power_of_2(J), max(1, 4096 // block_a)), "NBLK": nblk,
        "WARPS_A": warps or (8 if folded and batch == 1 else 4), "BLOCK_D_A": block_d_a, "BLOCK_ROW": dpow,
        "UNROLL_A": chunks[0] <= _MAX_UNROLL,
        "BLOCK_E": block_e, "BLOCK_N": block_n, "BLOCK_R": min(triton.next_power_of_2(max(dt_rank, 1)), 64),
        "BLOCK_K": block_k or min(triton.next_power_of_2(nblk), 32), "BLOCK_D_B": block_d_b,
        "UNROLL_B": chunks[1] <= _MAX_UNROLL, "WARPS_B": warps or 4,
    }


def _launch_step(x, conv_state, conv_weight, x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias, D, *,
                 in_mode, z=None, in_proj_weight=None, in_proj_bias=None, residual=None, norm_weight=None,
                 norm_bias=None, eps=0.0, is_rms=False, residual_dtype=None, delta_bias, delta_softplus,
                 discretization, a_is_log, activation, seqlen_offset, block_e_conv, block_k, block_d, warps=None):
    """Both kernels of the fused step; returns (y [B, E], new residual or None). ``x`` is in_proj's x half
    (in_mode 0) or the layer's input [B, D] (1, 2)."""
    Bsz = x.shape[0]
    E, W = conv_weight.shape
    R = dt_proj_weight.shape[1]
    N = A.shape[1]
    J = R + 2 * N
    Dm = x.shape[1] if in_mode else 0
    dev, dt = x.device, x.dtype
    y = torch.empty(Bsz, E, dtype=dt, device=dev)
    rout = hout = None
    if in_mode == 2:
        rout = torch.empty(Bsz, Dm, dtype=residual_dtype, device=dev)
        hout = torch.empty(Bsz, Dm, dtype=dt, device=dev)
    if Bsz == 0:
        return y, rout
    if E == 0:  # nothing to launch, but the cache still counts the token (in_mode 0: the dispatcher sends
        # an empty layer with in_proj folded in to the PyTorch path)
        if seqlen_offset is not None:
            seqlen_offset.add_(1)
        return y, rout
    cfg = mamba_step_config(Bsz, E, N, R, d_model=Dm or None, block_e_conv=block_e_conv, block_k=block_k,
                            block_d=block_d, warps=warps)
    nblk = cfg["NBLK"]
    xs = torch.empty(Bsz, E, dtype=dt, device=dev)
    partials = torch.empty(Bsz, nblk, J, dtype=torch.float32, device=dev)
    dummy = xs
    win = in_proj_weight if in_proj_weight is not None else dummy
    _mamba_conv_xproj_kernel[(Bsz, nblk)](
        x, residual if residual is not None else dummy, norm_weight if norm_weight is not None else dummy,
        norm_bias if norm_bias is not None else dummy, rout if rout is not None else dummy,
        hout if hout is not None else dummy, win, in_proj_bias if in_proj_bias is not None else dummy,
        conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, x_proj_weight, xs,
        partials, seqlen_offset if seqlen_offset is not None else partials, Dm, E, J, nblk, eps,
        x.stride(0), x.stride(1), residual.stride(0) if residual is not None else 0,
        win.stride(0), win.stride(1), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        conv_weight.stride(0), conv_weight.stride(1), x_proj_weight.stride(0), x_proj_weight.stride(1),
        xs.stride(0),
        IN_MODE=in_mode, IS_RMS=is_rms, HAS_RES=residual is not None, HAS_NW=norm_weight is not None,
        HAS_NB=norm_bias is not None, HAS_IN_BIAS=in_proj_bias is not None,
        W=W, WP=triton.next_power_of_2(max(W - 1, 1)), HAS_BIAS=conv_bias is not None,
        SILU=activation in ("silu", "swish"), ADVANCE=seqlen_offset is not None, BLOCK_E=cfg["BLOCK_E_A"],
        UNROLL=cfg["UNROLL_A"], BLOCK_D=cfg["BLOCK_D_A"], BLOCK_ROW=cfg["BLOCK_ROW"], BLOCK_J=cfg["BLOCK_J"],
        num_warps=cfg["WARPS_A"],
    )
    z_mode = 0 if in_mode == 0 and z is None else 1 if in_mode == 0 else 2
    h = hout if in_mode == 2 else x  # the rows in_proj's z half reads
    _mamba_dt_ssu_kernel[(Bsz, triton.cdiv(E, cfg["BLOCK_E"]))](
        partials, dt_proj_weight, xs, z if z is not None else dummy, h, win,
        in_proj_bias if in_proj_bias is not None else dummy, ssm_state, A, D if D is not None else dummy,
        delta_bias if delta_bias is not None else dummy, y, Dm, E, N, R, J, nblk,
        dt_proj_weight.stride(0), dt_proj_weight.stride(1), xs.stride(0),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0, h.stride(0), h.stride(1),
        win.stride(0), win.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), A.stride(0), A.stride(1), y.stride(0),
        METHOD=SERVED_DISCRETIZATIONS[discretization], A_IS_LOG=a_is_log, SOFTPLUS=delta_softplus,
        HAS_D=D is not None, Z_MODE=z_mode, HAS_IN_BIAS=in_proj_bias is not None, HAS_BIAS=delta_bias is not None,
        BLOCK_E=cfg["BLOCK_E"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_D=cfg["BLOCK_D_B"], UNROLL=cfg["UNROLL_B"], num_warps=cfg["WARPS_B"],
    )
    return y, rout


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
    return _launch_step(x, conv_state, conv_weight, x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias, D,
                        in_mode=0, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                        discretization=discretization, a_is_log=a_is_log, activation=activation,
                        seqlen_offset=seqlen_offset, block_e_conv=block_e_conv, block_k=block_k, block_d=None)[0]


def mamba_layer_step_triton(
    x: torch.Tensor, in_proj_weight: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
    x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor, ssm_state: torch.Tensor, A: torch.Tensor,
    conv_bias: torch.Tensor | None = None, D: torch.Tensor | None = None, *,
    in_proj_bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, norm: str | None = None,
    norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None, eps: float = 1e-5,
    residual_in_fp32: bool = False, delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
    discretization: str = "mamba", a_is_log: bool = False, activation: str | None = "silu",
    seqlen_offset: torch.Tensor | None = None, block_e_conv: int | None = None, block_k: int | None = None,
    block_d: int | None = None, warps: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of ``mamba_layer_step`` (two launches): in_proj (and, with ``norm``, the block's
    residual add and norm before it) folded into the fused step's kernels. x [B, D] the layer's input (or
    the block's, with ``norm``), in_proj_weight [2E, D]; the rest as ``mamba_step_triton``. Returns y, or
    (y, the new residual [B, D]) with ``norm``. Inputs are assumed valid (the dispatcher checked them)."""
    residual_dtype = None
    if norm is not None:
        residual_dtype = residual.dtype if residual is not None else x.dtype
        if residual_in_fp32:
            residual_dtype = torch.promote_types(residual_dtype, torch.float32)
    y, r = _launch_step(x, conv_state, conv_weight, x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias, D,
                        in_mode=1 if norm is None else 2, in_proj_weight=in_proj_weight, in_proj_bias=in_proj_bias,
                        residual=residual, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps,
                        is_rms=norm == "rmsnorm", residual_dtype=residual_dtype, delta_bias=delta_bias,
                        delta_softplus=delta_softplus, discretization=discretization, a_is_log=a_is_log,
                        activation=activation, seqlen_offset=seqlen_offset, block_e_conv=block_e_conv,
                        block_k=block_k, block_d=block_d, warps=warps)
    return y if norm is None else (y, r)
