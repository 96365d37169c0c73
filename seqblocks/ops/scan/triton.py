"""Triton kernels of the diagonal linear scan ``h_t = a_t * h_{t-1} + b_t``, forward and backward.

Imported only through the dispatcher in ``seqblocks/ops/scan/__init__.py`` once
``seqblocks.ops._backend.resolve_backend`` has chosen "triton"; nothing else imports this module.

Design (see docs/kernels.md):

- One program owns one sequence (a batch row, or one packed sequence of ``cu_seqlens``) and a block
  of ``BLOCK_D`` channels, and walks the whole sequence in chunks of ``BLOCK_T`` steps. A chunk is one
  [BLOCK_T, BLOCK_D] tile load per input (many bytes in flight, coalesced along the channels); inside
  the tile ``tl.associative_scan`` composes the affine maps ``h -> a h + b`` along time, and the
  carried fp32 state is applied once: ``h = A_cum * carry + B_cum``. Each input is read once and each
  output written once: the kernel is a single pass over memory.
- The backward reads ``a``, ``b`` and the cotangent, and writes ``da`` and ``db`` (one pass again).
  It walks the chunks from the end. ``h_{t-1}`` is recomputed inside the chunk from the state at the
  chunk's start, which the forward stored (one fp32 state per chunk: 1/BLOCK_T of the traffic), so the
  backward needs no saved ``h`` and keeps fp32 accuracy for bf16 inputs. The adjoint
  ``g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}`` is a reverse associative scan of the same kind.
- Complex tensors are read as interleaved (real, imaginary) fp32 pairs; the combine multiplies
  complex numbers written out in real arithmetic.
- Reverse scans, variable lengths and packed sequences only change which memory row a time step
  maps to and where a sequence ends; padding is never read and its outputs are zero.
- Block shapes and warps come from the call's ``ScanTuning`` (``tuning.py``; None fields: the
  defaults in ``_blocks`` / ``_bwd_blocks``). No module-level setting changes them.

Shapes: B batch, T time, S the state's trailing shape flattened to D channels, C chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops._backend import interpreter_enabled
from seqblocks.ops.scan.reference import state_dtype
from seqblocks.ops.scan.tuning import ScanTuning

__all__ = ["linear_scan_triton", "seq_bounds", "INTERPRETED"]

# Triton fixes compile-or-interpret process-wide when it is imported (TRITON_INTERPRET must be set
# before that); the default block shapes follow the mode. Explicit tuning (``ScanTuning``) wins in both.
INTERPRETED = interpreter_enabled()
_DEFAULT_TUNING = ScanTuning()


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _combine_real(a1, x1, a2, x2):
    # (h -> a2 (a1 h + x1) + x2): earlier element first.
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _combine_complex(ar1, ai1, xr1, xi1, ar2, ai2, xr2, xi2):
    ar = ar1 * ar2 - ai1 * ai2
    ai = ar1 * ai2 + ai1 * ar2
    xr = ar2 * xr1 - ai2 * xi1 + xr2
    xi = ar2 * xi1 + ai2 * xr1 + xi2
    return ar, ai, xr, xi


@triton.jit
def seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE: tl.constexpr):
    # (batch row, first memory position, length) of sequence pid_s, all int64.
    row = pid_s.to(tl.int64)
    start = row * 0
    L = start + T
    if SEQ_MODE == 2:
        start = tl.load(cu_ptr + pid_s).to(tl.int64)
        L = tl.load(cu_ptr + pid_s + 1).to(tl.int64) - start
        row = row * 0
    if SEQ_MODE == 1:
        L = tl.load(lens_ptr + pid_s).to(tl.int64)
    return row, start, L


@triton.jit
def _last_row(x, rows, BLOCK_T: tl.constexpr):
    return tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, x, 0.0), axis=0)


@triton.jit
def _first_row(x, rows):
    return tl.sum(tl.where(rows[:, None] == 0, x, 0.0), axis=0)


@triton.jit
def _load_pair(ptr, off, m, FILL_RE: tl.constexpr, COMPLEX: tl.constexpr):
    # [BT, BD] tiles (real, imaginary) as fp32; a complex element is one 2-wide vector load.
    if COMPLEX:
        k = tl.arange(0, 2)
        v = tl.load(ptr + off[:, :, None] + k[None, None, :], mask=m[:, :, None], other=0.0)
        re, im = tl.split(v.to(tl.float32))
        re = tl.where(m, re, FILL_RE)
    else:
        re = tl.load(ptr + off, mask=m, other=FILL_RE).to(tl.float32)
        im = re
    return re, im


@triton.jit
def _store_pair(ptr, off, re, im, m, COMPLEX: tl.constexpr):
    if COMPLEX:
        k = tl.arange(0, 2)
        v = tl.join(re, im).to(ptr.dtype.element_ty)
        tl.store(ptr + off[:, :, None] + k[None, None, :], v, mask=m[:, :, None])
    else:
        tl.store(ptr + off, re.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _time(c, rows, start, L, BLOCK_T: tl.constexpr, REVERSE: tl.constexpr):
    # memory positions and validity of logical steps c * BLOCK_T + rows (c may be out of range)
    s = c * BLOCK_T + rows
    valid = (s >= 0) & (s < L)
    if REVERSE:
        t = start + L - 1 - s
    else:
        t = start + s
    return tl.where(valid, t, 0), valid


@triton.jit
def _scan_fwd_kernel(
    a_ptr, b_ptr, h_ptr, h0_ptr, hT_ptr, ck_ptr, lens_ptr, cu_ptr,
    T, D, NC,
    s_ab, s_at, s_ad, s_bb, s_bt,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, COMPLEX: tl.constexpr, REVERSE: tl.constexpr,
    HAS_H0: tl.constexpr, SEQ_MODE: tl.constexpr, SAVE: tl.constexpr,
):
    # b and h are contiguous [.., T, D] (x2 interleaved when COMPLEX); a has strides (s_ab, s_at, s_ad)
    # in real elements (0 where broadcast); states h0 / hT / checkpoints are contiguous fp32.
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row, start, L = seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    rows = tl.arange(0, BLOCK_T)
    W: tl.constexpr = 2 if COMPLEX else 1
    st_off = pid_s.to(tl.int64) * D * W + dd * W  # state element offsets
    a_base = row * s_ab + dd[None, :] * s_ad
    b_base = row * s_bb + dd[None, :] * W
    hr = tl.zeros([BLOCK_D], dtype=tl.float32)
    hi = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_H0:
        hr = tl.load(h0_ptr + st_off, mask=dmask, other=0.0)
        if COMPLEX:
            hi = tl.load(h0_ptr + st_off + 1, mask=dmask, other=0.0)
    n_chunks = tl.cdiv(L, BLOCK_T)
    # Software pipelining by hand: chunk c + 1 is loaded before chunk c is scanned, so its loads are
    # in flight while this program computes.
    t, valid = _time(0, rows, start, L, BLOCK_T, REVERSE)
    m = valid[:, None] & dmask[None, :]
    ar, ai = _load_pair(a_ptr, a_base + t[:, None] * s_at, m, 1.0, COMPLEX)
    xr, xi = _load_pair(b_ptr, b_base + t[:, None] * s_bt, m, 0.0, COMPLEX)
    for c in range(0, n_chunks):
        t_n, valid_n = _time(c + 1, rows, start, L, BLOCK_T, REVERSE)
        m_n = valid_n[:, None] & dmask[None, :]
        ar_n, ai_n = _load_pair(a_ptr, a_base + t_n[:, None] * s_at, m_n, 1.0, COMPLEX)
        xr_n, xi_n = _load_pair(b_ptr, b_base + t_n[:, None] * s_bt, m_n, 0.0, COMPLEX)
        if SAVE:
            ck = (pid_s.to(tl.int64) * NC + c) * D * W + dd * W
            tl.store(ck_ptr + ck, hr, mask=dmask)
            if COMPLEX:
                tl.store(ck_ptr + ck + 1, hi, mask=dmask)
        b_off = b_base + t[:, None] * s_bt
        if COMPLEX:
            Ar, Ai, Xr, Xi = tl.associative_scan((ar, ai, xr, xi), 0, _combine_complex)
            out_r = Ar * hr[None, :] - Ai * hi[None, :] + Xr
            out_i = Ar * hi[None, :] + Ai * hr[None, :] + Xi
            _store_pair(h_ptr, b_off, out_r, out_i, m, COMPLEX)
            hr = _last_row(out_r, rows, BLOCK_T)
            hi = _last_row(out_i, rows, BLOCK_T)
        else:
            Ar, Xr = tl.associative_scan((ar, xr), 0, _combine_real)
            out_r = Ar * hr[None, :] + Xr
            _store_pair(h_ptr, b_off, out_r, out_r, m, COMPLEX)
            # Rows past the end have a = 1, b = 0: the last row holds the state after the chunk.
            hr = _last_row(out_r, rows, BLOCK_T)
        t, m, ar, ai, xr, xi = t_n, m_n, ar_n, ai_n, xr_n, xi_n
    tl.store(hT_ptr + st_off, hr, mask=dmask)
    if COMPLEX:
        tl.store(hT_ptr + st_off + 1, hi, mask=dmask)


@triton.jit
def _bwd_load(c, rows, start, L, dmask, a_ptr, b_ptr, g_ptr, a_base, b_base, s_at, s_bt,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, COMPLEX: tl.constexpr,
              REVERSE: tl.constexpr, HAS_G: tl.constexpr):
    # Everything chunk c needs: a, b at the previous step (row 0 takes the stored chunk-start state
    # instead: identity there), a at the next step (past the end: 1, which passes gT through) and the
    # cotangent at the step itself.
    t, valid = _time(c, rows, start, L, BLOCK_T, REVERSE)
    s = c * BLOCK_T + rows
    vp = (rows >= 1) & valid
    vn = (s + 1 < L) & valid
    if REVERSE:
        tp = tl.where(vp, t + 1, 0)
        tn = tl.where(vn, t - 1, 0)
    else:
        tp = tl.where(vp, t - 1, 0)
        tn = tl.where(vn, t + 1, 0)
    m = valid[:, None] & dmask[None, :]
    mp = vp[:, None] & dmask[None, :]
    mn = vn[:, None] & dmask[None, :]
    apr, api = _load_pair(a_ptr, a_base + tp[:, None] * s_at, mp, 1.0, COMPLEX)
    xpr, xpi = _load_pair(b_ptr, b_base + tp[:, None] * s_bt, mp, 0.0, COMPLEX)
    anr, ani = _load_pair(a_ptr, a_base + tn[:, None] * s_at, mn, 1.0, COMPLEX)
    if HAS_G:
        yr, yi = _load_pair(g_ptr, b_base + t[:, None] * s_bt, m, 0.0, COMPLEX)
    else:
        yr = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        yi = yr
    return t, m, apr, api, xpr, xpi, anr, ani, yr, yi


@triton.jit
def _scan_bwd_kernel(
    a_ptr, b_ptr, g_ptr, gT_ptr, ck_ptr, da_ptr, db_ptr, dh0_ptr, lens_ptr, cu_ptr,
    T, D, NC,
    s_ab, s_at, s_ad, s_bb, s_bt,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, COMPLEX: tl.constexpr, REVERSE: tl.constexpr,
    SEQ_MODE: tl.constexpr, HAS_G: tl.constexpr, HAS_GT: tl.constexpr, NEED_DH0: tl.constexpr,
):
    # g, db, da are contiguous like b (da in a's dtype, or fp32 where a was broadcast).
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row, start, L = seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    rows = tl.arange(0, BLOCK_T)
    W: tl.constexpr = 2 if COMPLEX else 1
    st_off = pid_s.to(tl.int64) * D * W + dd * W
    a_base = row * s_ab + dd[None, :] * s_ad
    b_base = row * s_bb + dd[None, :] * W
    # Adjoint carried from the step after the chunk (the final state's cotangent at the end).
    gr = tl.zeros([BLOCK_D], dtype=tl.float32)
    gi = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_GT:
        gr = tl.load(gT_ptr + st_off, mask=dmask, other=0.0)
        if COMPLEX:
            gi = tl.load(gT_ptr + st_off + 1, mask=dmask, other=0.0)
    n_chunks = tl.cdiv(L, BLOCK_T)
    t, m, apr, api, xpr, xpi, anr, ani, yr, yi = _bwd_load(
        n_chunks - 1, rows, start, L, dmask, a_ptr, b_ptr, g_ptr, a_base, b_base, s_at, s_bt,
        BLOCK_T, BLOCK_D, COMPLEX, REVERSE, HAS_G)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        # prefetch the chunk before this one (masked out after the first)
        t_n, m_n, apr_n, api_n, xpr_n, xpi_n, anr_n, ani_n, yr_n, yi_n = _bwd_load(
            c - 1, rows, start, L, dmask, a_ptr, b_ptr, g_ptr, a_base, b_base, s_at, s_bt,
            BLOCK_T, BLOCK_D, COMPLEX, REVERSE, HAS_G)
        off = b_base + t[:, None] * s_bt
        ck = (pid_s.to(tl.int64) * NC + c) * D * W + dd * W
        h_r = tl.load(ck_ptr + ck, mask=dmask, other=0.0)
        if COMPLEX:
            h_i = tl.load(ck_ptr + ck + 1, mask=dmask, other=0.0)
            Pr, Pi, Qr, Qi = tl.associative_scan((apr, api, xpr, xpi), 0, _combine_complex)
            hpr = Pr * h_r[None, :] - Pi * h_i[None, :] + Qr  # h_{s-1}
            hpi = Pr * h_i[None, :] + Pi * h_r[None, :] + Qi
            # The adjoint runs with conj(a).
            Rr, Ri, Gr, Gi = tl.associative_scan((anr, -ani, yr, yi), 0, _combine_complex, reverse=True)
            dr = Rr * gr[None, :] - Ri * gi[None, :] + Gr
            di = Rr * gi[None, :] + Ri * gr[None, :] + Gi
            # da = g conj(h_{s-1}); db = g.
            _store_pair(da_ptr, off, dr * hpr + di * hpi, di * hpr - dr * hpi, m, COMPLEX)
            _store_pair(db_ptr, off, dr, di, m, COMPLEX)
            gr = _first_row(dr, rows)
            gi = _first_row(di, rows)
        else:
            Pr, Qr = tl.associative_scan((apr, xpr), 0, _combine_real)
            hpr = Pr * h_r[None, :] + Qr
            Rr, Gr = tl.associative_scan((anr, yr), 0, _combine_real, reverse=True)
            dr = Rr * gr[None, :] + Gr
            _store_pair(da_ptr, off, dr * hpr, dr, m, COMPLEX)
            _store_pair(db_ptr, off, dr, dr, m, COMPLEX)
            gr = _first_row(dr, rows)
        t, m, apr, api, xpr, xpi, anr, ani, yr, yi = t_n, m_n, apr_n, api_n, xpr_n, xpi_n, anr_n, ani_n, yr_n, yi_n
    if NEED_DH0:
        # dL/dh_{-1} = conj(a_first) g_first; with an empty sequence the cotangent passes through.
        if REVERSE:
            t0 = start + L - 1
        else:
            t0 = start
        m0 = dmask & ((dd * 0 + L) > 0)
        a0 = a_ptr + a_base + tl.where(L > 0, t0, 0) * s_at
        a0r = tl.sum(tl.load(a0, mask=m0[None, :], other=1.0).to(tl.float32), axis=0)
        if COMPLEX:
            a0i = tl.sum(tl.load(a0 + 1, mask=m0[None, :], other=0.0).to(tl.float32), axis=0)
            tl.store(dh0_ptr + st_off, a0r * gr + a0i * gi, mask=dmask)
            tl.store(dh0_ptr + st_off + 1, a0r * gi - a0i * gr, mask=dmask)
        else:
            tl.store(dh0_ptr + st_off, a0r * gr, mask=dmask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(T: int, D: int, wide: bool, complex_: bool, tuning: ScanTuning) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) of the forward: ``tuning``'s values, defaults for its None fields."""
    if INTERPRETED:
        # The interpreter's cost is per element and per program; small tiles keep masks cheap.
        bt, bd, warps = min(16, _next_pow2(max(T, 1))), min(16, _next_pow2(D)), 1
    else:
        # Measured on an H100 (benchmarks/scans.py --sweep): small programs, many of them, keep the most
        # loads in flight for 2-byte inputs; 4-byte inputs move enough per program with wider blocks.
        if complex_:
            # the four-tensor complex scan is cheapest over short chunks
            bt, bd, warps = 8, 64, 2
        elif wide:
            bt, bd, warps = 32, 64, 4
        else:
            bt, bd, warps = 32, 64, 2
        bt, bd = min(bt, _next_pow2(max(T, 1))), min(bd, _next_pow2(D))
    return (bt if tuning.block_t is None else tuning.block_t, bd if tuning.block_d is None else tuning.block_d,
            warps if tuning.num_warps is None else tuning.num_warps)


def _bwd_blocks(plan: _Plan, tuning: ScanTuning) -> tuple[int, int]:
    """(BLOCK_D, num_warps) of the backward; its BLOCK_T is the forward's checkpoint interval."""
    if INTERPRETED or plan.complex or plan.wide:
        bd, warps = plan.bd, plan.warps
    else:
        bd, warps = min(32, plan.bd), 1
    return (bd if tuning.bwd_block_d is None else tuning.bwd_block_d,
            warps if tuning.bwd_num_warps is None else tuning.bwd_num_warps)


def _real_view(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(x) if x.is_complex() else x


class _Plan:
    """Flattened views and launch geometry shared by the forward and the backward."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, lengths: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None, tuning: ScanTuning):
        self.B, self.T = b.shape[:2]
        self.S = tuple(b.shape[2:])
        D = 1
        for s in self.S:
            D *= s
        self.D = D
        self.complex = b.is_complex()
        if cu_seqlens is not None:
            self.seq_mode, self.n_seq = 2, cu_seqlens.numel() - 1
        elif lengths is not None:
            self.seq_mode, self.n_seq = 1, self.B
        else:
            self.seq_mode, self.n_seq = 0, self.B
        self.wide = b.dtype.itemsize >= 4 and not self.complex
        self.bt, self.bd, self.warps = _blocks(self.T, D, self.wide, self.complex, tuning)
        self.nc = max(1, -(-self.T // self.bt))
        # a: broadcast to b's shape and flattened without copying where the strides allow it.
        a3 = torch.broadcast_to(a, b.shape).reshape(self.B, self.T, D)
        a3r = _real_view(a3)
        self.a_strides = (a3r.stride(0), a3r.stride(1), a3r.stride(2))
        self.a = a3r
        dummy = torch.zeros(1, dtype=torch.int64, device=b.device)
        self.lens = lengths if lengths is not None else dummy
        self.cu = cu_seqlens if cu_seqlens is not None else dummy
        self.grid = (self.n_seq, triton.cdiv(D, self.bd))


def _forward(plan: _Plan, b3r: torch.Tensor, h0: torch.Tensor | None, out_dtype: torch.dtype,
             reverse: bool, save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    dev = b3r.device
    W = 2 if plan.complex else 1
    real_out = out_dtype.to_real() if out_dtype.is_complex else out_dtype
    alloc = torch.zeros if plan.seq_mode == 1 else torch.empty  # padding outputs are 0
    h = alloc((plan.B, plan.T, plan.D * W), dtype=real_out, device=dev)
    hT = torch.empty((plan.n_seq, plan.D * W), dtype=torch.float32, device=dev)
    ck = torch.empty((plan.n_seq, plan.nc, plan.D * W), dtype=torch.float32, device=dev) if save else hT
    h0_ = h0 if h0 is not None else hT
    if plan.T > 0 or plan.seq_mode != 0:
        _scan_fwd_kernel[plan.grid](
            plan.a, b3r, h, h0_, hT, ck, plan.lens, plan.cu,
            plan.T, plan.D, plan.nc,
            *plan.a_strides, b3r.stride(0), b3r.stride(1) if plan.T > 0 else 0,
            BLOCK_T=plan.bt, BLOCK_D=plan.bd, COMPLEX=plan.complex, REVERSE=reverse,
            HAS_H0=h0 is not None, SEQ_MODE=plan.seq_mode, SAVE=save, num_warps=plan.warps,
        )
    elif h0 is not None:
        hT.copy_(h0)
    else:
        hT.zero_()
    return h, hT, (ck if save else None)


class _LinearScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, reverse, lengths, cu_seqlens, out_dtype, tuning):
        plan = _Plan(a, b, lengths, cu_seqlens, tuning)
        b3r = _real_view(b.reshape(plan.B, plan.T, plan.D).contiguous()).reshape(plan.B, plan.T, -1)
        h0r = None
        if h0 is not None:
            sdt = torch.complex64 if plan.complex else torch.float32
            h0r = _real_view(h0.reshape(plan.n_seq, plan.D).to(sdt).contiguous()).reshape(plan.n_seq, -1)
        save = any(ctx.needs_input_grad[:3])
        h, hT, ck = _forward(plan, b3r, h0r, out_dtype, reverse, save)
        if plan.complex:
            h = torch.view_as_complex(h.view(plan.B, plan.T, plan.D, 2))
            hT = torch.view_as_complex(hT.view(plan.n_seq, plan.D, 2))
        ctx.save_for_backward(a, b3r, ck, lengths, cu_seqlens, h0)
        ctx.reverse = reverse
        ctx.tuning = tuning
        ctx.plan_args = (b.shape, b.dtype, a.shape, a.dtype)
        return h.reshape(b.shape), hT.reshape(plan.n_seq, *plan.S)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_hT):
        a, b3r, ck, lengths, cu_seqlens, h0 = ctx.saved_tensors
        b_shape, b_dtype, a_shape, a_dtype = ctx.plan_args
        plan = _Plan(a, _Shape(b_shape, b_dtype, a.device), lengths, cu_seqlens, ctx.tuning)
        W = 2 if plan.complex else 1
        dev = b3r.device
        need_da, need_db, need_dh0 = ctx.needs_input_grad[:3]
        g = None
        if grad_h is not None:
            g = _real_view(grad_h.reshape(plan.B, plan.T, plan.D).contiguous()).reshape(plan.B, plan.T, -1)
        gT = None
        if grad_hT is not None:
            sdt = torch.complex64 if plan.complex else torch.float32
            gT = _real_view(grad_hT.reshape(plan.n_seq, plan.D).to(sdt).contiguous()).reshape(plan.n_seq, -1)
        alloc = torch.zeros if plan.seq_mode == 1 else torch.empty
        # da goes straight to a's dtype unless a was broadcast (then summed in fp32 below).
        da_dtype = a.dtype if tuple(a_shape) == tuple(b_shape) else torch.float32
        da_dtype = da_dtype.to_real() if da_dtype.is_complex else da_dtype
        da = alloc((plan.B, plan.T, plan.D * W), dtype=da_dtype, device=dev)
        db_dtype = b3r.dtype
        db = alloc((plan.B, plan.T, plan.D * W), dtype=db_dtype, device=dev)
        dh0 = torch.empty((plan.n_seq, plan.D * W), dtype=torch.float32, device=dev)
        if plan.T > 0 or plan.seq_mode != 0:
            bbd, bwarps = _bwd_blocks(plan, ctx.tuning)
            _scan_bwd_kernel[(plan.n_seq, triton.cdiv(plan.D, bbd))](
                plan.a, b3r, g if g is not None else b3r, gT if gT is not None else dh0, ck, da, db, dh0,
                plan.lens, plan.cu, plan.T, plan.D, plan.nc,
                *plan.a_strides, b3r.stride(0), b3r.stride(1) if plan.T > 0 else 0,
                BLOCK_T=plan.bt, BLOCK_D=bbd, COMPLEX=plan.complex, REVERSE=ctx.reverse,
                SEQ_MODE=plan.seq_mode, HAS_G=g is not None, HAS_GT=gT is not None, NEED_DH0=need_dh0,
                num_warps=bwarps,
            )
        elif gT is not None:
            dh0.copy_(gT)
        else:
            dh0.zero_()
        grad_a = grad_b = grad_h0 = None
        if plan.complex:
            da = torch.view_as_complex(da.view(plan.B, plan.T, plan.D, 2))
            db = torch.view_as_complex(db.view(plan.B, plan.T, plan.D, 2))
            dh0 = torch.view_as_complex(dh0.view(plan.n_seq, plan.D, 2))
        if need_da:
            grad_a = da.reshape(b_shape).sum_to_size(a_shape).to(a_dtype)
        if need_db:
            grad_b = db.reshape(b_shape)
        if need_dh0:
            grad_h0 = dh0.reshape(h0.shape).to(h0.dtype)
        return grad_a, grad_b, grad_h0, None, None, None, None, None


class _Shape:
    """Stand-in carrying only ``shape`` / ``dtype`` / ``is_complex`` for re-planning in backward."""

    def __init__(self, shape, dtype, device):
        self.shape, self.dtype, self.device = shape, dtype, device

    def is_complex(self):
        return self.dtype.is_complex


def linear_scan_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    tuning: ScanTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of ``seqblocks.ops.scan.linear_scan`` (see there); inputs are assumed valid and
    served (fp16 / bf16 / fp32 / complex64; the dispatcher checks). ``tuning``: the kernels' block
    shapes and warps (``ScanTuning``; None: the defaults)."""
    if tuning is None:
        tuning = _DEFAULT_TUNING
    elif not isinstance(tuning, ScanTuning):
        raise TypeError(f"linear_scan: tuning must be a ScanTuning or None, got {type(tuning).__name__}")
    if b.numel() == 0:
        # nothing to scan (empty batch, time or state): the PyTorch path handles the edge cases
        from seqblocks.ops.scan.torch import linear_scan_torch

        return linear_scan_torch(a, b, initial_state, reverse=reverse, lengths=lengths, cu_seqlens=cu_seqlens)
    dtypes = (a.dtype, b.dtype) + ((initial_state.dtype,) if initial_state is not None else ())
    sdt = state_dtype(*dtypes)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    if sdt.is_complex:
        # Mixed real / complex inputs: both sides complex (rare; costs a conversion).
        if not a.is_complex():
            a = a.to(torch.complex64)
        if not b.is_complex():
            b = b.to(torch.complex64)
    return _LinearScanTriton.apply(a, b, initial_state, reverse, lengths, cu_seqlens, out_dtype, tuning)
