"""Triton kernels of SSD (Mamba-2's scan): the chunked form forward and backward, and the decode step.

The chunked form (see ``torch.py`` for the same math in PyTorch), with chunks of ``CH`` steps (256 by
default), the log-decay ``a = step * A`` and its within-chunk running sum ``acs``; ``CB[l, s] = C[l] . B[s]``
is the score of source s at row l (one matrix per chunk and group, shared by the group's heads)::

    forward   1. _state_fused_fwd   per (row, head, block of P): walks the chunks in order; acs, and the
                                    state entering every chunk h_in[c] (written), the final state.
                 (or, options["state_fused"] False: _chunk_state_fwd per chunk, the chunk's own end
                  state, then _state_pass_fwd, the sequential pass over those)
              2. _chunk_cb          per (tile pair, chunk, row and group): CB for the tiles on or below
                                    the diagonal (options["cb_shared"]; else each kernel below that needs
                                    CB multiplies its own tiles)
              3. _chunk_scan_fwd    per (row tile, head, block of P, chunk, row): y = (CB * decay * step) x
                                    over the source tiles up to the diagonal + exp(acs) C h_in^T + D x
    backward  1. _dstate_fused_bwd  per (row, head, block of P): walks the chunks backwards; g_c, the
                                    gradient of chunk c's end state, dh0, and the chunk decays' gradient
                 (or _chunk_dstate_bwd + _state_pass_bwd)
              2. _chunk_cb          CB again (not kept from the forward: it would cost activation memory)
              3. _chunk_bwd_dx      per (source tile, head): du (u = step x) -> dx, d step, dD, and the
                                    end-state decay's share of d acs
              4. _chunk_bwd_dcb     per (tile pair, group, block of heads): dCB[l, s] = sum over the
                                    group's heads of decay * step_s * dy_l . x_s, and each head's shares
                                    of d acs through the pair's decays (rows and sources)
              5. _chunk_bwd_db      per (source tile, group, block of heads): dB = dCB^T C + the state part
              6. _chunk_bwd_dc      per (row tile, group, block of heads): dC = dCB B + the state part
              7. _dacs_finish       per (chunk, row, head): the shares of d acs summed, their reverse
                                    cumsum inside the chunk -> d a, added to d step (d a * A) and dA

Every launch parameter (tiles, warps, pipeline stages, the variant switches) comes from
``launch_options``; ``benchmarks/ssd.py --sweep`` times the variants of each kernel.

Steps are processed in PyTorch before the kernels (``dt + dt_bias``, softplus, the limits, zeroed on
padding), so autograd carries d step back to ``dt`` and ``dt_bias``; the z gate is applied after the
kernels the same way. The D skip is fused (output kernel; dD and D dy in the dx kernel).
``lengths`` zero the steps of padding (the state passes through unchanged) and the outputs there;
``cu_seqlens`` run as a padded batch (``unpack`` / ``pack``).

``acs`` is kept in log2 units (the kernels get ``A log2(e)``), so every decay is one ``exp2``.
``exp2(acs[l] - acs[s])`` is used for ``l >= s`` only (the exponent is then <= 0 for a stable A); the
entries above the diagonal are selected away (``tl.where``), never multiplied by zero, so neither an
overflow there nor the unwritten upper tiles of the CB / dCB scratch buffers can reach a result.
Matrix products take the inputs' dtype as operands (bf16 / fp16 on the tensor cores; fp32 as exact
IEEE products) and accumulate in fp32; states, steps, decays, CB and dCB are fp32.

Shapes: B batch, T time, H heads, P head width, N state, G groups, c chunks, CH chunk length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from seqblocks.ops._packing import pack, unpack
from seqblocks.ops.ssd._common import process_dt
from seqblocks.ops.triton_dot import dot, dot_mode

__all__ = ["ssd_triton", "ssd_state_update_triton", "launch_options", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 256  # chunks of 256 steps: few states to store and pass (mamba_ssm's choice too)
LOG2E = 1.4426950408889634


def _block(n: int) -> int:
    """A power-of-two tile width >= 16 (tl.dot needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------------------------------
# Launch parameters


# Tile keys take a power of two >= 16, clipped to the chunk (time tiles) or to the padded P (``*_bp``).
_TIME_TILES = ("state_bl", "cb_block", "scan_bl", "scan_bs", "dstate_bl", "dx_bs", "dx_bl", "dcb_block",
               "db_bs", "db_bl", "dc_bl", "dc_bs")
_P_TILES = ("state_bp", "scan_bp", "dstate_bp")
_WARPS = ("state_warps", "pass_warps", "cb_warps", "scan_warps", "dstate_warps", "dx_warps", "dcb_warps",
          "db_warps", "dc_warps", "finish_warps")
_STAGES = ("state_stages", "cb_stages", "scan_stages", "dstate_stages", "dx_stages", "dcb_stages", "db_stages",
           "dc_stages")
_SWITCHES = ("state_fused", "dstate_fused", "cb_shared")
_COUNTS = ("pass_block", "dcb_heads", "dbc_heads")
OPTION_KEYS = _TIME_TILES + _P_TILES + _WARPS + _STAGES + _SWITCHES + _COUNTS


def launch_options(dtype: torch.dtype, P: int, N: int, H: int, G: int, chunk: int = DEFAULT_CHUNK,
                   overrides: dict | None = None) -> dict:
    """Every launch parameter of the chunked SSD kernels, for inputs of ``dtype``.

    The defaults were picked from an offline sm_90 compile (Triton's ptxas; registers, no spills,
    shared memory well under 200 KB a program) at Mamba-2's P = 64, N = 128, chunk 256;
    ``benchmarks/ssd.py --sweep`` times the alternatives on a GPU; for bf16 / fp16 the output kernel's
    source tile, dx's and dB's row tiles, dCB's stages and dB / dC's heads per program now take each
    group's fastest variant of the H200 sweep of 2026-12-03. Every value computes the same
    function (``tests/test_ssd_triton.py`` runs non-default ones against the reference).

    Keys, with their bf16 / fp16 (fp32) defaults; ``*_warps``: warps per program, ``*_stages``:
    Triton's software-pipelining depth of the kernel's loops::

        state_fused     True: _state_fused_fwd, the chunk states and the pass over chunks in one
                        kernel (no fp32 state round trip); False: _chunk_state_fwd + _state_pass_fwd
                                                                        True
        state_bl        time tile of either form                        64 (16)
        state_bp        P block of _state_fused_fwd (programs per head) 32 (16)
        state_warps, state_stages                                       8, 3
        pass_block, pass_warps   elements of P N per program of the split passes, forward and
                        backward                                        1024, 4
        cb_shared       True: _chunk_cb writes CB once per chunk and group, read by every head;
                        False: the output, dx and dCB kernels multiply their own CB tiles
                                                                        H / G > 1 (fp32: True)
        cb_block, cb_warps, cb_stages   square tile of _chunk_cb        64, 4, 2 (32, 4, 2)
        scan_bl, scan_bs, scan_bp       rows, source tile, P block of _chunk_scan_fwd
                                                                        64, 64, 64 (32, 32, 32)
        scan_warps, scan_stages                                         4 (CB per kernel: 8), 2 (8, 2)
        dstate_fused, dstate_bl, dstate_bp, dstate_warps, dstate_stages   the state_* keys of the
                        backward (False: _chunk_dstate_bwd + _state_pass_bwd)
                                                                        True, 64, 32, 8, 3 (.., 16, 16, 8, 3)
        dx_bs, dx_bl, dx_warps, dx_stages   sources, row tile of _chunk_bwd_dx
                                                                        64, 64, 8, 2 (16, 16, 16, 2)
        dcb_block, dcb_warps, dcb_stages    square tile of _chunk_bwd_dcb
                                                                        64, 8, 2 (32, 8, 2)
        db_bs, db_bl, db_warps, db_stages   sources, row tile of _chunk_bwd_db
                                                                        64, 64, 8, 2 (32, 32, 8, 2)
        dc_bl, dc_bs, dc_warps, dc_stages   rows, source tile of _chunk_bwd_dc
                                                                        64, 64, 8, 2 (32, 32, 8, 2)
        dcb_heads       heads per program of _chunk_bwd_dcb (each block of heads writes its own
                        partial dCB, summed by the dB / dC kernels)     all of a group
        dbc_heads       heads per program of _chunk_bwd_db / _chunk_bwd_dc (partial dB / dC per
                        block, summed in PyTorch; one block writes dB / dC in B's dtype)
                                                                        8
        finish_warps    warps of _dacs_finish (d acs -> d step, dA)     4

    Args:
        dtype: the inputs' dtype (fp32 products run on the FMA units: smaller tiles).
        P, N, H, G: head width, state size, heads, groups of B / C.
        chunk: the chunk length (a power of two in [16, 256]); time tiles are clipped to it.
        overrides: keys above to set; the rest keep their defaults.

    Returns:
        dict: one value per key above (tiles clipped to the chunk / the padded P, head counts to H / G).

    Raises:
        ValueError: an unknown key, a tile that is not a power of two >= 16, warps not in
            {1, 2, 4, 8, 16}, stages, pass_block or head counts below 1.
        TypeError: a switch that is not a bool, any other value that is not an int.
    """
    half = dtype != torch.float32
    # CB shared by a group's heads, except where each head has its own B / C (then the scratch would
    # be as large as the heads' work saves) in bf16 / fp16; fp32 always shares it (its FMA products of
    # K = N spill registers inside the per-head kernels).
    shared = (H // G > 1 or not half) if (overrides or {}).get("cb_shared") is None else overrides["cb_shared"]
    if half:  # bf16 / fp16 operands: wgmma tiles of 64 rows
        o = dict(state_bl=64, state_bp=32, state_warps=8, cb_block=64, cb_warps=4,
                 scan_bl=64, scan_bs=64, scan_bp=64, scan_warps=4 if shared else 8,
                 dstate_bl=64, dstate_bp=32, dstate_warps=8, dx_bs=64, dx_bl=64, dx_warps=8,
                 dcb_block=64, dcb_warps=8, db_bs=64, db_bl=64, db_warps=8, dc_bl=64, dc_bs=64, dc_warps=8)
    else:  # fp32: FMA products, whose operands take a whole K row per thread: small tiles, more warps
        o = dict(state_bl=16, state_bp=16, state_warps=8, cb_block=32, cb_warps=4,
                 scan_bl=32, scan_bs=32, scan_bp=32, scan_warps=8,
                 dstate_bl=16, dstate_bp=16, dstate_warps=8, dx_bs=16, dx_bl=16, dx_warps=16,
                 dcb_block=32, dcb_warps=8, db_bs=32, db_bl=32, db_warps=8, dc_bl=32, dc_bs=32, dc_warps=8)
    o.update(state_fused=True, state_stages=3, pass_block=1024, pass_warps=4, cb_shared=shared, cb_stages=2,
             scan_stages=2, dstate_fused=True, dstate_stages=3, dx_stages=2, dcb_stages=2, db_stages=2, dc_stages=2,
             dcb_heads=H // G, dbc_heads=8, finish_warps=4)
    if half:  # each kernel group's fastest variant in the H200 sweep (Triton 3.6, 2026-12-03; docs/benchmarks.md)
        o.update(scan_bs=32, dx_bl=32, db_bl=32, dcb_stages=3, dbc_heads=64)
    for key, value in (overrides or {}).items():
        if key not in o:
            raise ValueError(f"ssd launch options: unknown key {key!r}; expected one of {sorted(o)}")
        if key in _SWITCHES:
            if not isinstance(value, bool):
                raise TypeError(f"ssd launch options: {key} must be a bool, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"ssd launch options: {key} must be an int, got {value!r}")
        elif key in _TIME_TILES + _P_TILES and (value < 16 or value & (value - 1)):
            raise ValueError(f"ssd launch options: {key} must be a power of two >= 16, got {value}")
        elif key in _WARPS and value not in (1, 2, 4, 8, 16):
            raise ValueError(f"ssd launch options: {key} must be one of 1, 2, 4, 8, 16, got {value}")
        elif value < 1:
            raise ValueError(f"ssd launch options: {key} must be >= 1, got {value}")
        o[key] = value
    for key in _TIME_TILES:
        o[key] = min(o[key], chunk)
    for key in _P_TILES:
        o[key] = min(o[key], _block(P))
    o["pass_block"] = min(triton.next_power_of_2(o["pass_block"]), triton.next_power_of_2(P * N))
    o["dcb_heads"] = min(o["dcb_heads"], H // G)
    o["dbc_heads"] = min(o["dbc_heads"], H // G)
    return o


def _scratch(*shape: int, device) -> torch.Tensor:
    """An fp32 buffer whose unwritten entries are never read into a result (CB, dCB: upper tiles).
    A function of its own so that the tests can fill it with NaN."""
    return torch.empty(*shape, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------------
# Kernels: states


@triton.jit
def _tile_pair(pid, NB: tl.constexpr):
    """The pid-th (row tile j, source tile i <= j) of a chunk of NB tiles, counted row by row."""
    j = pid * 0
    for k in tl.static_range(1, NB):
        j += (pid >= k * (k + 1) // 2).to(tl.int32)
    return j, pid - j * (j + 1) // 2


@triton.jit(do_not_specialize=["T", "H", "nc"])
def _state_fused_fwd(x_ptr, step_ptr, A_ptr, B_ptr, acs_ptr, hlp_ptr, hin_ptr, h0_ptr, final_ptr,
                     T, H, G, P, N, Tp, nc,
                     CH: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
                     HAS_H0: tl.constexpr, SAVE: tl.constexpr):
    """One (row, head, block of P) walks its chunks in order, the state [N, BP] (transposed) held in
    registers: stores h_in[c] at each chunk's start (in the operand dtype for the output kernel, and
    in fp32 for the backward when SAVE), acs (the first P block only), the final state."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    h = pid % H
    pb = pid // H
    g = h // (H // G)
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    A = tl.load(A_ptr + h).to(tl.float32)
    st_off = p[None, :] * N + n[:, None]                                      # [BN, BP] view of [P, N]
    st_m = pm[None, :] & nm[:, None]
    bh = b.to(tl.int64) * H + h
    if HAS_H0:
        state = tl.load(h0_ptr + bh * P * N + st_off, mask=st_m, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BN, BP], dtype=tl.float32)
    zero = tl.sum(tl.zeros([BL], dtype=tl.float32), 0)
    for c in range(nc):
        off = ((b.to(tl.int64) * nc + c) * H + h) * P * N + st_off
        tl.store(hlp_ptr + off, state.to(hlp_ptr.dtype.element_ty), mask=st_m)
        if SAVE:
            tl.store(hin_ptr + off, state, mask=st_m)
        row = b.to(tl.int64) * T + c * CH                                     # the chunk's first step
        xc = x_ptr + (row * H + h) * P
        Bc = B_ptr + (row * G + g) * N
        sc = step_ptr + row * H + h
        Tc = T - c * CH
        running = zero
        for kb in range(CH // BL):
            l = kb * BL + tl.arange(0, BL)
            lm = l < Tc
            step = tl.load(sc + l * H, mask=lm, other=0.0)
            a = step * A
            acs = running + tl.cumsum(a, 0)
            tl.store(acs_ptr + bh * Tp + c * CH + l, acs, mask=l + pb * CH < CH)  # first P block only
            end = running + tl.sum(a, 0)
            x = tl.load(xc + l[:, None] * (H * P) + p[None, :], mask=lm[:, None] & pm[None, :], other=0.0)
            Bm = tl.load(Bc + l[:, None] * (G * N) + n[None, :], mask=lm[:, None] & nm[None, :], other=0.0)
            xw = (x.to(tl.float32) * (tl.exp2(end - acs) * step)[:, None]).to(x.dtype)
            state = tl.exp2(end - running) * state + dot(tl.trans(Bm), xw, IEEE)   # [BN, BP]
            running = end
    tl.store(final_ptr + bh * P * N + st_off, state, mask=st_m)


@triton.jit(do_not_specialize=["T", "H", "nc"])
def _chunk_state_fwd(x_ptr, step_ptr, A_ptr, B_ptr, acs_ptr, S_ptr,
                     T, H, G, P, N, Tp, nc,
                     CH: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, row, head): acs, and the chunk's own end state from a zero start [P, N]."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    row = b.to(tl.int64) * T + c * CH
    x_ptr += (row * H + h) * P
    B_ptr += (row * G + g) * N
    step_ptr += row * H + h
    Tc = T - c * CH
    A = tl.load(A_ptr + h).to(tl.float32)
    S = tl.zeros([BP, BN], dtype=tl.float32)
    running = tl.sum(tl.zeros([BL], dtype=tl.float32), 0)
    # Tiles of BL steps in order; S is the state at the end of the tiles so far (from a zero start).
    for kb in range(CH // BL):
        l = kb * BL + tl.arange(0, BL)
        lm = l < Tc
        step = tl.load(step_ptr + l * H, mask=lm, other=0.0)
        a = step * A
        acs = running + tl.cumsum(a, 0)
        tl.store(acs_ptr + bh.to(tl.int64) * Tp + c * CH + l, acs)
        end = running + tl.sum(a, 0)
        x = tl.load(x_ptr + l[:, None] * (H * P) + p[None, :], mask=lm[:, None] & (p[None, :] < P), other=0.0)
        Bm = tl.load(B_ptr + l[:, None] * (G * N) + n[None, :], mask=lm[:, None] & (n[None, :] < N), other=0.0)
        xw = (x.to(tl.float32) * (tl.exp2(end - acs) * step)[:, None]).to(x.dtype)
        S = tl.exp2(end - running) * S + dot(tl.trans(xw), Bm, IEEE)         # [P, N]
        running = end
    tl.store(S_ptr + (((b.to(tl.int64) * nc + c) * H + h) * P + p[:, None]) * N + n[None, :], S,
             mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit(do_not_specialize=["H", "nc"])
def _state_pass_fwd(S_ptr, acs_ptr, h0_ptr, final_ptr, hlp_ptr, H, PN, Tp, nc,
                    CH: tl.constexpr, BLOCK: tl.constexpr, HAS_H0: tl.constexpr, LOWP: tl.constexpr):
    """The sequential pass over the chunks' own states, ``h_in[c] = h; h = decay_c h + S_c``, written
    over S in place (and, LOWP, in the operand dtype to hlp); the next chunk's S is loaded before this
    chunk's store (no dependence between them)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    i = blk * BLOCK + tl.arange(0, BLOCK)
    m = i < PN
    if HAS_H0:
        state = tl.load(h0_ptr + bh.to(tl.int64) * PN + i, mask=m, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK], dtype=tl.float32)
    nxt = tl.load(S_ptr + (b * nc * H + h) * PN + i, mask=m, other=0.0)
    for c in range(nc):
        S = nxt
        nxt = tl.load(S_ptr + ((b * nc + c + 1) * H + h) * PN + i, mask=i < tl.minimum(nc - 1 - c, 1) * PN,
                      other=0.0)                                              # none after the last
        tl.store(S_ptr + ((b * nc + c) * H + h) * PN + i, state, mask=m)     # S_c becomes h_in[c]
        if LOWP:
            tl.store(hlp_ptr + ((b * nc + c) * H + h) * PN + i, state.to(hlp_ptr.dtype.element_ty), mask=m)
        decay = tl.exp2(tl.load(acs_ptr + bh.to(tl.int64) * Tp + c * CH + CH - 1))
        state = decay * state + S
    tl.store(final_ptr + bh.to(tl.int64) * PN + i, state, mask=m)


# ---------------------------------------------------------------------------------------------------
# Kernels: CB and the output


@triton.jit(do_not_specialize=["T", "nc"])
def _chunk_cb(B_ptr, C_ptr, cb_ptr, T, G, N, nc,
              CH: tl.constexpr, BLK: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """CB[l, s] = C[l] . B[s] (fp32) for one tile pair on or below the diagonal of a chunk and group."""
    j, i = _tile_pair(tl.program_id(0), CH // BLK)
    c = tl.program_id(1)
    bg = tl.program_id(2)
    b = bg // G
    g = bg % G
    row = b.to(tl.int64) * T + c * CH
    Tc = T - c * CH
    l = j * BLK + tl.arange(0, BLK)
    s = i * BLK + tl.arange(0, BLK)
    n = tl.arange(0, BN)
    nm = n < N
    Cl = tl.load(C_ptr + (row * G + g) * N + l[:, None] * (G * N) + n[None, :], mask=(l < Tc)[:, None] & nm[None, :],
                 other=0.0)
    Bs = tl.load(B_ptr + (row * G + g) * N + s[:, None] * (G * N) + n[None, :], mask=(s < Tc)[:, None] & nm[None, :],
                 other=0.0)
    cb = dot(Cl, tl.trans(Bs), IEEE)
    tl.store(cb_ptr + ((b.to(tl.int64) * nc + c) * G + g) * CH * CH + l[:, None] * CH + s[None, :], cb)


@triton.jit(do_not_specialize=["T", "H", "nc"])
def _chunk_scan_fwd(x_ptr, step_ptr, B_ptr, C_ptr, cb_ptr, D_ptr, acs_ptr, hin_ptr, y_ptr,
                    T, H, G, P, N, Tp, nc,
                    CH: tl.constexpr, BL: tl.constexpr, BS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                    IEEE: tl.constexpr, SHARED_CB: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr):
    """y for BL rows and BP channels of one head: the incoming state, the source tiles before the rows
    (no masks), then the diagonal ones (causal mask, non-finite x), then D x."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    NPB = tl.cdiv(P, BP)
    h = pid % H
    rest = pid // H
    pb = rest % NPB
    j = CH // BL - 1 - rest // NPB                                            # the longest rows first
    g = h // (H // G)
    row = b.to(tl.int64) * T + c * CH
    x_ptr += (row * H + h) * P
    y_ptr += (row * H + h) * P
    step_ptr += row * H + h
    B_ptr += (row * G + g) * N
    C_ptr += (row * G + g) * N
    acs_ptr += (b.to(tl.int64) * H + h) * Tp + c * CH
    hin_ptr += ((b.to(tl.int64) * nc + c) * H + h) * P * N
    cb_ptr += ((b.to(tl.int64) * nc + c) * G + g) * CH * CH
    Tc = T - c * CH
    l = j * BL + tl.arange(0, BL)                                             # rows, inside the chunk
    lm = l < Tc
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    acs_l = tl.load(acs_ptr + l)
    Cl = tl.load(C_ptr + l[:, None] * (G * N) + n[None, :], mask=lm[:, None] & nm[None, :], other=0.0)
    hin = tl.load(hin_ptr + p[:, None] * N + n[None, :], mask=pm[:, None] & nm[None, :], other=0.0)
    y = dot(Cl, tl.trans(hin.to(Cl.dtype)), IEEE) * tl.exp2(acs_l)[:, None]  # the incoming state
    free = (j * BL) // BS * BS                                                # sources before every row
    for s0 in range(0, free, BS):
        s = s0 + tl.arange(0, BS)
        sm = s < Tc
        step = tl.load(step_ptr + s * H, mask=sm, other=0.0)
        acs_s = tl.load(acs_ptr + s)
        xs = tl.load(x_ptr + s[:, None] * (H * P) + p[None, :], mask=sm[:, None] & pm[None, :], other=0.0)
        if SHARED_CB:
            cb = tl.load(cb_ptr + l[:, None] * CH + s[None, :])
        else:
            Bs = tl.load(B_ptr + s[:, None] * (G * N) + n[None, :], mask=sm[:, None] & nm[None, :], other=0.0)
            cb = dot(Cl, tl.trans(Bs), IEEE)
        scores = cb * tl.exp2(acs_l[:, None] - acs_s[None, :]) * step[None, :]
        y += dot(scores.to(xs.dtype), xs, IEEE)
    # The diagonal: every entry above it is selected away (a non-finite B or step there never reaches
    # row l), and a non-finite x is zeroed in the product and poisons the rows at and after it (same p).
    # Before the diagonal a non-finite x reaches only later rows, through the product itself.
    first_bad = tl.full([BP], CH, tl.int32)
    for s0 in range(free, (j + 1) * BL, BS):
        s = s0 + tl.arange(0, BS)
        sm = s < Tc
        step = tl.load(step_ptr + s * H, mask=sm, other=0.0)
        acs_s = tl.load(acs_ptr + s)
        xs = tl.load(x_ptr + s[:, None] * (H * P) + p[None, :], mask=sm[:, None] & pm[None, :], other=0.0)
        if SHARED_CB:
            cb = tl.load(cb_ptr + l[:, None] * CH + s[None, :])
        else:
            Bs = tl.load(B_ptr + s[:, None] * (G * N) + n[None, :], mask=sm[:, None] & nm[None, :], other=0.0)
            cb = dot(Cl, tl.trans(Bs), IEEE)
        causal = l[:, None] >= s[None, :]
        scores = tl.where(causal, cb * tl.exp2(acs_l[:, None] - acs_s[None, :]) * step[None, :], 0.0)
        bad = (xs != xs) | (tl.abs(xs.to(tl.float32)) == float("inf"))
        first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, s[:, None], CH), 0))
        y += dot(scores.to(xs.dtype), tl.where(bad, 0.0, xs).to(xs.dtype), IEEE)
    y = tl.where(l[:, None] >= first_bad[None, :], float("nan"), y)
    xp_off = l[:, None] * (H * P) + p[None, :]
    xp_m = lm[:, None] & pm[None, :]
    if HAS_D:
        x = tl.load(x_ptr + xp_off, mask=xp_m, other=0.0).to(tl.float32)
        if D_PER_P:
            y += tl.load(D_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32)[None, :] * x
        else:
            y += tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + xp_off, y.to(y_ptr.dtype.element_ty), mask=xp_m)


# ---------------------------------------------------------------------------------------------------
# Kernels: backward


@triton.jit(do_not_specialize=["T", "H", "nc"])
def _dstate_fused_bwd(dy_ptr, C_ptr, acs_ptr, hin_ptr, dfinal_ptr, gout_ptr, dh0_ptr, ddecay_ptr,
                      T, H, G, P, N, Tp, nc,
                      CH: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
                      HAS_DFINAL: tl.constexpr):
    """One (row, head, block of P) walks its chunks backwards with the gradient of the state [N, BP]
    (transposed): stores g_c (the gradient of chunk c's end state, in the operand dtype: it is only
    ever a product's operand) and this block's share of the chunk decay's gradient (fp32 h_in), then
    adds what the chunk's outputs send to its incoming state; dh0 at the end."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    h = pid % H
    pb = pid // H
    NPB = tl.cdiv(P, BP)
    g = h // (H // G)
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    st_off = p[None, :] * N + n[:, None]
    st_m = pm[None, :] & nm[:, None]
    bh = b.to(tl.int64) * H + h
    if HAS_DFINAL:
        gstate = tl.load(dfinal_ptr + bh * P * N + st_off, mask=st_m, other=0.0).to(tl.float32)
    else:
        gstate = tl.zeros([BN, BP], dtype=tl.float32)
    for k in range(nc):
        c = nc - 1 - k
        off = ((b.to(tl.int64) * nc + c) * H + h) * P * N + st_off
        tl.store(gout_ptr + off, gstate.to(gout_ptr.dtype.element_ty), mask=st_m)
        decay = tl.exp2(tl.load(acs_ptr + bh * Tp + c * CH + CH - 1))
        hin = tl.load(hin_ptr + off, mask=st_m, other=0.0)
        tl.store(ddecay_ptr + (bh * nc + c) * NPB + pb, decay * tl.sum(tl.sum(gstate * hin, 1), 0))
        gstate = decay * gstate
        row = b.to(tl.int64) * T + c * CH
        dyc = dy_ptr + (row * H + h) * P
        Cc = C_ptr + (row * G + g) * N
        Tc = T - c * CH
        for kb in range(CH // BL):
            l = kb * BL + tl.arange(0, BL)
            lm = l < Tc
            acs = tl.load(acs_ptr + bh * Tp + c * CH + l)
            dy = tl.load(dyc + l[:, None] * (H * P) + p[None, :], mask=lm[:, None] & pm[None, :], other=0.0)
            Cm = tl.load(Cc + l[:, None] * (G * N) + n[None, :], mask=lm[:, None] & nm[None, :], other=0.0)
            dye = (dy.to(tl.float32) * tl.exp2(acs)[:, None]).to(Cm.dtype)
            gstate += dot(tl.trans(Cm), dye, IEEE)                               # [BN, BP]
    tl.store(dh0_ptr + bh * P * N + st_off, gstate, mask=st_m)


@triton.jit(do_not_specialize=["T", "H", "nc"])
def _chunk_dstate_bwd(dy_ptr, C_ptr, acs_ptr, dS_ptr,
                      T, H, G, P, N, Tp, nc,
                      CH: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Per chunk: the gradient its outputs send to its incoming state, sum_l exp(acs[l]) dy[l] C[l]^T."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    row = b.to(tl.int64) * T + c * CH
    dy_ptr += (row * H + h) * P
    C_ptr += (row * G + g) * N
    Tc = T - c * CH
    dS = tl.zeros([BP, BN], dtype=tl.float32)
    for kb in range(CH // BL):
        l = kb * BL + tl.arange(0, BL)
        lm = l < Tc
        acs = tl.load(acs_ptr + bh.to(tl.int64) * Tp + c * CH + l)
        dy = tl.load(dy_ptr + l[:, None] * (H * P) + p[None, :], mask=lm[:, None] & (p[None, :] < P), other=0.0)
        Cm = tl.load(C_ptr + l[:, None] * (G * N) + n[None, :], mask=lm[:, None] & (n[None, :] < N), other=0.0)
        dye = (dy.to(tl.float32) * tl.exp2(acs)[:, None]).to(Cm.dtype)
        dS += dot(tl.trans(dye), Cm, IEEE)                                    # [P, N]
    tl.store(dS_ptr + (((b.to(tl.int64) * nc + c) * H + h) * P + p[:, None]) * N + n[None, :], dS,
             mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit(do_not_specialize=["H", "nc"])
def _state_pass_bwd(dS_ptr, g_ptr, hin_ptr, acs_ptr, dfinal_ptr, dh0_ptr, ddecay_ptr, H, PN, Tp, nc,
                    CH: tl.constexpr, BLOCK: tl.constexpr, HAS_DFINAL: tl.constexpr):
    """The reverse pass over chunks: g_c (operand dtype), dh0, this block's share of the chunk decays'
    gradient. The next (earlier) chunk's dS and h_in are loaded before this chunk's store."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    NBLK = tl.num_programs(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    i = blk * BLOCK + tl.arange(0, BLOCK)
    m = i < PN
    if HAS_DFINAL:
        gstate = tl.load(dfinal_ptr + bh.to(tl.int64) * PN + i, mask=m, other=0.0).to(tl.float32)
    else:
        gstate = tl.zeros([BLOCK], dtype=tl.float32)
    last = ((b * nc + nc - 1) * H + h) * PN + i
    dS_n = tl.load(dS_ptr + last, mask=m, other=0.0)
    hin_n = tl.load(hin_ptr + last, mask=m, other=0.0)
    for k in range(nc):
        c = nc - 1 - k
        dS = dS_n
        hin = hin_n
        prev = ((b * nc + c - 1) * H + h) * PN + i
        more = i < tl.minimum(c, 1) * PN                                      # none before the first
        dS_n = tl.load(dS_ptr + prev, mask=more, other=0.0)
        hin_n = tl.load(hin_ptr + prev, mask=more, other=0.0)
        tl.store(g_ptr + ((b * nc + c) * H + h) * PN + i, gstate.to(g_ptr.dtype.element_ty), mask=m)
        decay = tl.exp2(tl.load(acs_ptr + bh.to(tl.int64) * Tp + c * CH + CH - 1))
        # d(chunk decay) * decay: this block's share of the gradient of acs at the chunk's end
        tl.store(ddecay_ptr + (bh.to(tl.int64) * nc + c) * NBLK + blk, decay * tl.sum(gstate * hin, 0))
        gstate = decay * gstate + dS
    tl.store(dh0_ptr + bh.to(tl.int64) * PN + i, gstate, mask=m)


@triton.jit(do_not_specialize=["T", "H", "nc", "NSLOT"])
def _chunk_bwd_dx(x_ptr, step_ptr, B_ptr, C_ptr, cb_ptr, D_ptr, acs_ptr, gout_ptr, dy_ptr,
                  dx_ptr, dstep_ptr, dacs_ptr, w_ptr, dD_ptr,
                  T, H, G, P, N, Tp, nc, NSLOT,
                  CH: tl.constexpr, BS: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                  IEEE: tl.constexpr, SHARED_CB: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr):
    """BS steps of one head as sources s: du = e_out B g^T + sum over rows l >= s of (CB decay)^T dy
    (u = step x), then dx, d step (its share through u), dD, and w = u . (e_out B g^T), the gradient
    of the end-state decay e_out = exp(acs[CH-1] - acs[s]): +w at the chunk's end, -w at s (slot 0)."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    h = pid % H
    i = pid // H                                                               # tile 0 has the most rows
    g = h // (H // G)
    row = b.to(tl.int64) * T + c * CH
    x_ptr += (row * H + h) * P
    dy_ptr += (row * H + h) * P
    dx_ptr += (row * H + h) * P
    step_ptr += row * H + h
    dstep_ptr += row * H + h
    B_ptr += (row * G + g) * N
    C_ptr += (row * G + g) * N
    bh = b.to(tl.int64) * H + h
    acs_ptr += bh * Tp + c * CH
    gout_ptr += ((b.to(tl.int64) * nc + c) * H + h) * P * N
    cb_ptr += ((b.to(tl.int64) * nc + c) * G + g) * CH * CH
    Tc = T - c * CH
    s = i * BS + tl.arange(0, BS)
    sm = s < Tc
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    step = tl.load(step_ptr + s * H, mask=sm, other=0.0)
    acs_s = tl.load(acs_ptr + s)
    total = tl.load(acs_ptr + CH - 1)
    xp_off = s[:, None] * (H * P) + p[None, :]
    xp_m = sm[:, None] & pm[None, :]
    x = tl.load(x_ptr + xp_off, mask=xp_m, other=0.0)
    Bs = tl.load(B_ptr + s[:, None] * (G * N) + n[None, :], mask=sm[:, None] & nm[None, :], other=0.0)
    gout = tl.load(gout_ptr + p[:, None] * N + n[None, :], mask=pm[:, None] & nm[None, :], other=0.0).to(x.dtype)
    du = dot(Bs, tl.trans(gout), IEEE) * tl.exp2(total - acs_s)[:, None]     # [s, P]: to the end state
    u = x.to(tl.float32) * step[:, None]
    w = tl.sum(u * du, 1)
    lo = (i * BS) // BL * BL
    mid = tl.cdiv((i + 1) * BS, BL) * BL                                      # rows from here: l > every s
    hi = tl.minimum(tl.cdiv(Tc, BL) * BL, CH)
    for l0 in range(lo, mid, BL):
        l = l0 + tl.arange(0, BL)
        lm = l < Tc
        acs_l = tl.load(acs_ptr + l)
        dyl = tl.load(dy_ptr + l[:, None] * (H * P) + p[None, :], mask=lm[:, None] & pm[None, :],
                      other=0.0).to(x.dtype)
        if SHARED_CB:
            cbT = tl.load(cb_ptr + l[None, :] * CH + s[:, None])                 # [s, l]
        else:
            Cl = tl.load(C_ptr + l[:, None] * (G * N) + n[None, :], mask=lm[:, None] & nm[None, :], other=0.0)
            cbT = dot(Bs, tl.trans(Cl), IEEE)
        wT = tl.where(l[None, :] >= s[:, None], cbT * tl.exp2(acs_l[None, :] - acs_s[:, None]), 0.0)
        du += dot(wT.to(x.dtype), dyl, IEEE)
    for l0 in range(mid, hi, BL):
        l = l0 + tl.arange(0, BL)
        lm = l < Tc
        acs_l = tl.load(acs_ptr + l)
        dyl = tl.load(dy_ptr + l[:, None] * (H * P) + p[None, :], mask=lm[:, None] & pm[None, :],
                      other=0.0).to(x.dtype)
        if SHARED_CB:
            cbT = tl.load(cb_ptr + l[None, :] * CH + s[:, None])
        else:
            Cl = tl.load(C_ptr + l[:, None] * (G * N) + n[None, :], mask=lm[:, None] & nm[None, :], other=0.0)
            cbT = dot(Bs, tl.trans(Cl), IEEE)
        wT = cbT * tl.exp2(acs_l[None, :] - acs_s[:, None])
        du += dot(wT.to(x.dtype), dyl, IEEE)
    dx = du * step[:, None]
    xf = x.to(tl.float32)
    dstep = tl.sum(du * xf, 1)
    if HAS_D:
        dyf = tl.load(dy_ptr + xp_off, mask=xp_m, other=0.0).to(tl.float32)
        if D_PER_P:
            dx += tl.load(D_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32)[None, :] * dyf
        else:
            dx += tl.load(D_ptr + h).to(tl.float32) * dyf
        tl.store(dD_ptr + (((b.to(tl.int64) * nc + c) * (CH // BS) + i) * H + h) * P + p, tl.sum(dyf * xf, 0),
                 mask=pm)
    tl.store(dx_ptr + xp_off, dx.to(dx_ptr.dtype.element_ty), mask=xp_m)
    tl.store(dstep_ptr + s * H, dstep, mask=sm)
    tl.store(dacs_ptr + bh * NSLOT * Tp + c * CH + s, -w)
    tl.store(w_ptr + bh * Tp + c * CH + s, w)


@triton.jit(do_not_specialize=["T", "H", "nc", "NSLOT", "HPP"])
def _chunk_bwd_dcb(x_ptr, step_ptr, B_ptr, C_ptr, cb_ptr, acs_ptr, dy_ptr, dcb_ptr, dacs_ptr,
                   T, H, G, P, N, Tp, nc, NSLOT, HPP,
                   CH: tl.constexpr, BLK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
                   SHARED_CB: tl.constexpr, SLOT0: tl.constexpr):
    """One tile pair (rows l, sources s <= l) of a chunk, group and block of HPP heads:
    dCB[l, s] = sum over the heads of decay * step_s * dy_l . x_s (stored per block of heads), and
    each head's shares of d acs through this pair's decays, from M = CB * that term: rowsum(M) at the
    rows (slot SLOT0 + j - i), -colsum(M) at the sources (slot SLOT0 + j + 1). At any step the slots
    SLOT0 ... SLOT0 + NB are each written by exactly one pair; both shares come from the same M, so
    their sum over the chunk cancels as it should (no rounding of one side against the other)."""
    j, i = _tile_pair(tl.program_id(0), CH // BLK)
    c = tl.program_id(1)
    z = tl.program_id(2)
    HG = H // G
    NSPLIT = tl.cdiv(HG, HPP)
    k = z % NSPLIT
    bg = z // NSPLIT
    b = bg // G
    g = bg % G
    row = b.to(tl.int64) * T + c * CH
    Tc = T - c * CH
    l = j * BLK + tl.arange(0, BLK)
    s = i * BLK + tl.arange(0, BLK)
    lm = l < Tc
    sm = s < Tc
    p = tl.arange(0, BP)
    pm = p < P
    causal = l[:, None] >= s[None, :]
    if SHARED_CB:
        cb = tl.load(cb_ptr + ((b.to(tl.int64) * nc + c) * G + g) * CH * CH + l[:, None] * CH + s[None, :])
    else:
        n = tl.arange(0, BN)
        nm = n < N
        Cl = tl.load(C_ptr + (row * G + g) * N + l[:, None] * (G * N) + n[None, :], mask=lm[:, None] & nm[None, :],
                     other=0.0)
        Bs = tl.load(B_ptr + (row * G + g) * N + s[:, None] * (G * N) + n[None, :], mask=sm[:, None] & nm[None, :],
                     other=0.0)
        cb = dot(Cl, tl.trans(Bs), IEEE)
    cb = tl.where(causal, cb, 0.0)
    dcb = tl.zeros([BLK, BLK], dtype=tl.float32)
    h0 = g * HG + k * HPP
    for h in range(h0, tl.minimum(h0 + HPP, (g + 1) * HG)):
        bh = b.to(tl.int64) * H + h
        acs_l = tl.load(acs_ptr + bh * Tp + c * CH + l)
        acs_s = tl.load(acs_ptr + bh * Tp + c * CH + s)
        step = tl.load(step_ptr + row * H + h + s * H, mask=sm, other=0.0)
        xs = tl.load(x_ptr + (row * H + h) * P + s[:, None] * (H * P) + p[None, :], mask=sm[:, None] & pm[None, :],
                     other=0.0)
        dyl = tl.load(dy_ptr + (row * H + h) * P + l[:, None] * (H * P) + p[None, :],
                      mask=lm[:, None] & pm[None, :], other=0.0).to(xs.dtype)
        dyx = dot(dyl, tl.trans(xs), IEEE)                                     # [l, s]
        val = tl.where(causal, dyx * tl.exp2(acs_l[:, None] - acs_s[None, :]) * step[None, :], 0.0)
        dcb += val
        m = cb * val                                                           # d acs through the decay
        tl.store(dacs_ptr + (bh * NSLOT + SLOT0 + j - i) * Tp + c * CH + l, tl.sum(m, 1))
        tl.store(dacs_ptr + (bh * NSLOT + SLOT0 + j + 1) * Tp + c * CH + s, -tl.sum(m, 0))
    tl.store(dcb_ptr + (((b.to(tl.int64) * nc + c) * G + g) * NSPLIT + k) * CH * CH + l[:, None] * CH + s[None, :],
             dcb)


@triton.jit(do_not_specialize=["T", "H", "nc", "HPP", "NSPLIT_CB"])
def _chunk_bwd_db(x_ptr, step_ptr, C_ptr, acs_ptr, gout_ptr, dcb_ptr, dB_ptr,
                  T, H, G, P, N, Tp, nc, HPP, NSPLIT_CB,
                  CH: tl.constexpr, BS: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                  IEEE: tl.constexpr):
    """dB for BS sources of a chunk and group from a block of HPP heads: the end-state part
    sum_h e_out u_h g_h (u = step x), and (first block only) sum over rows l >= s of dCB^T C."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    z = tl.program_id(2)
    HG = H // G
    NSPLIT = tl.cdiv(HG, HPP)
    k = z % NSPLIT
    bg = z // NSPLIT
    b = bg // G
    g = bg % G
    row = b.to(tl.int64) * T + c * CH
    Tc = T - c * CH
    s = i * BS + tl.arange(0, BS)
    sm = s < Tc
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    C_ptr += (row * G + g) * N
    dB = tl.zeros([BS, BN], dtype=tl.float32)
    h0 = g * HG + k * HPP
    for h in range(h0, tl.minimum(h0 + HPP, (g + 1) * HG)):
        bh = b.to(tl.int64) * H + h
        step = tl.load(step_ptr + row * H + h + s * H, mask=sm, other=0.0)
        acs_s = tl.load(acs_ptr + bh * Tp + c * CH + s)
        total = tl.load(acs_ptr + bh * Tp + c * CH + CH - 1)
        xs = tl.load(x_ptr + (row * H + h) * P + s[:, None] * (H * P) + p[None, :], mask=sm[:, None] & pm[None, :],
                     other=0.0)
        gout = tl.load(gout_ptr + ((b.to(tl.int64) * nc + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                       mask=pm[:, None] & nm[None, :], other=0.0).to(xs.dtype)
        u = (xs.to(tl.float32) * step[:, None]).to(xs.dtype)
        dB += dot(u, gout, IEEE) * tl.exp2(total - acs_s)[:, None]
    if k == 0:
        dcb_ptr += ((b.to(tl.int64) * nc + c) * G + g) * NSPLIT_CB * CH * CH
        hi = tl.minimum(tl.cdiv(Tc, BL) * BL, CH)
        for l0 in range((i * BS) // BL * BL, hi, BL):
            l = l0 + tl.arange(0, BL)
            Cl = tl.load(C_ptr + l[:, None] * (G * N) + n[None, :], mask=(l < Tc)[:, None] & nm[None, :], other=0.0)
            dT = tl.zeros([BS, BL], dtype=tl.float32)
            for kk in range(NSPLIT_CB):
                dT += tl.load(dcb_ptr + kk * CH * CH + l[None, :] * CH + s[:, None])   # [s, l]
            dT = tl.where(l[None, :] >= s[:, None], dT, 0.0)                   # upper tiles: unwritten
            dB += dot(dT.to(Cl.dtype), Cl, IEEE)
    tl.store(dB_ptr + ((row + s[:, None]) * G + g) * (NSPLIT * N) + k * N + n[None, :],
             dB.to(dB_ptr.dtype.element_ty), mask=sm[:, None] & nm[None, :])


@triton.jit(do_not_specialize=["T", "H", "nc", "NSLOT", "HPP", "NSPLIT_CB"])
def _chunk_bwd_dc(B_ptr, C_ptr, acs_ptr, hin_ptr, dy_ptr, dcb_ptr, dC_ptr, dacs_ptr,
                  T, H, G, P, N, Tp, nc, NSLOT, HPP, NSPLIT_CB,
                  CH: tl.constexpr, BL: tl.constexpr, BS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                  IEEE: tl.constexpr, SLOT: tl.constexpr):
    """dC for BL rows of a chunk and group from a block of HPP heads: the incoming-state part
    sum_h exp(acs) dy_h h_in_h (and each head's row share of d acs from it, slot SLOT), and (first
    block only) sum over sources s <= l of dCB B."""
    j = CH // BL - 1 - tl.program_id(0)                                         # the longest rows first
    c = tl.program_id(1)
    z = tl.program_id(2)
    HG = H // G
    NSPLIT = tl.cdiv(HG, HPP)
    k = z % NSPLIT
    bg = z // NSPLIT
    b = bg // G
    g = bg % G
    row = b.to(tl.int64) * T + c * CH
    Tc = T - c * CH
    l = j * BL + tl.arange(0, BL)
    lm = l < Tc
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    B_ptr += (row * G + g) * N
    C_ptr += (row * G + g) * N
    Cl = tl.load(C_ptr + l[:, None] * (G * N) + n[None, :], mask=lm[:, None] & nm[None, :], other=0.0)
    Clf = Cl.to(tl.float32)
    dC = tl.zeros([BL, BN], dtype=tl.float32)
    h0 = g * HG + k * HPP
    for h in range(h0, tl.minimum(h0 + HPP, (g + 1) * HG)):
        bh = b.to(tl.int64) * H + h
        acs_l = tl.load(acs_ptr + bh * Tp + c * CH + l)
        dyl = tl.load(dy_ptr + (row * H + h) * P + l[:, None] * (H * P) + p[None, :],
                      mask=lm[:, None] & pm[None, :], other=0.0).to(Cl.dtype)
        hin = tl.load(hin_ptr + ((b.to(tl.int64) * nc + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                      mask=pm[:, None] & nm[None, :], other=0.0).to(Cl.dtype)
        dCs = dot(dyl, hin, IEEE) * tl.exp2(acs_l)[:, None]                   # [l, N]
        dC += dCs
        tl.store(dacs_ptr + (bh * NSLOT + SLOT) * Tp + c * CH + l, tl.sum(dCs * Clf, 1))
    if k == 0:
        dcb_ptr += ((b.to(tl.int64) * nc + c) * G + g) * NSPLIT_CB * CH * CH
        for s0 in range(0, (j + 1) * BL, BS):
            s = s0 + tl.arange(0, BS)
            Bs = tl.load(B_ptr + s[:, None] * (G * N) + n[None, :], mask=(s < Tc)[:, None] & nm[None, :], other=0.0)
            d = tl.zeros([BL, BS], dtype=tl.float32)
            for kk in range(NSPLIT_CB):
                d += tl.load(dcb_ptr + kk * CH * CH + l[:, None] * CH + s[None, :])
            d = tl.where(l[:, None] >= s[None, :], d, 0.0)                     # upper tiles: unwritten
            dC += dot(d.to(Bs.dtype), Bs, IEEE)
    tl.store(dC_ptr + ((row + l[:, None]) * G + g) * (NSPLIT * N) + k * N + n[None, :],
             dC.to(dC_ptr.dtype.element_ty), mask=lm[:, None] & nm[None, :])



@triton.jit(do_not_specialize=["T", "H", "nc", "NSLOT"])
def _dacs_finish(slots_ptr, w_ptr, ddecay_ptr, step_ptr, A_ptr, dstep_ptr, dA_ptr, T, H, Tp, nc, NSLOT,
                 CH: tl.constexpr, BSLOT: tl.constexpr):
    """Per (chunk, row, head): d acs = the sum of its shares (slots); d a = its reverse cumsum inside the
    chunk + the gradient of the chunk's end value (sum of w, plus the chunk decay's); d step += d a * A
    (in place); this chunk's share of dA, sum of d a * step."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    l = tl.arange(0, CH)
    k = tl.arange(0, BSLOT)
    base = bh.to(tl.int64) * Tp + c * CH
    shares = tl.load(slots_ptr + bh.to(tl.int64) * NSLOT * Tp + c * CH + k[:, None] * Tp + l[None, :],
                     mask=(k < NSLOT)[:, None], other=0.0)
    dlast = tl.sum(tl.load(w_ptr + base + l), 0) + tl.load(ddecay_ptr + bh.to(tl.int64) * nc + c)
    da = tl.cumsum(tl.sum(shares, 0), 0, reverse=True) + dlast
    t = c * CH + l
    tm = t < T
    off = (b.to(tl.int64) * T + t) * H + h
    step = tl.load(step_ptr + off, mask=tm, other=0.0)
    ds = tl.load(dstep_ptr + off, mask=tm, other=0.0)
    tl.store(dstep_ptr + off, ds + da * tl.load(A_ptr + h), mask=tm)
    tl.store(dA_ptr + bh.to(tl.int64) * nc + c, tl.sum(da * step, 0))

# ---------------------------------------------------------------------------------------------------
# Launchers: one per step of the forward / backward (``benchmarks/ssd.py --sweep`` times them one by one)


def _launch_shape(x: torch.Tensor, B: torch.Tensor, CH: int):
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc = triton.cdiv(T, CH)
    return Bsz, T, H, P, G, N, nc, nc * CH


def _states_fwd(x, step, A2, B, h0, CH, o, save=True):
    """acs [B, H, Tp] (log2 units), h_in [B, c, H, P, N] in x's dtype (the output kernel's operand),
    h_in in fp32 (the backward's; None unless ``save``; the same tensor for fp32 inputs) and the
    final state [B, H, P, N] (fp32)."""
    Bsz, T, H, P, G, N, nc, Tp = _launch_shape(x, B, CH)
    dev = x.device
    acs = torch.empty(Bsz, H, Tp, dtype=torch.float32, device=dev)
    final = torch.empty(Bsz, H, P, N, dtype=torch.float32, device=dev)
    lowp = x.dtype != torch.float32
    ieee, BN = dot_mode(x), _block(N)
    if o["state_fused"]:
        hlp = torch.empty(Bsz, nc, H, P, N, dtype=x.dtype, device=dev)
        states = torch.empty(Bsz, nc, H, P, N, dtype=torch.float32, device=dev) if save and lowp else None
        BP = o["state_bp"]
        _state_fused_fwd[(H * triton.cdiv(P, BP), Bsz)](
            x, step, A2, B, acs, hlp, states if states is not None else hlp, h0 if h0 is not None else final, final,
            T, H, G, P, N, Tp, nc, CH=CH, BL=o["state_bl"], BP=BP, BN=BN, IEEE=ieee, HAS_H0=h0 is not None,
            SAVE=states is not None, num_warps=o["state_warps"], num_stages=o["state_stages"])
        return acs, hlp, states if lowp else (hlp if save else None), final
    states = torch.empty(Bsz, nc, H, P, N, dtype=torch.float32, device=dev)
    hlp = torch.empty(Bsz, nc, H, P, N, dtype=x.dtype, device=dev) if lowp else states
    _chunk_state_fwd[(nc, Bsz * H)](x, step, A2, B, acs, states, T, H, G, P, N, Tp, nc, CH=CH, BL=o["state_bl"],
                                    BP=_block(P), BN=BN, IEEE=ieee, num_warps=o["state_warps"],
                                    num_stages=o["state_stages"])
    SB = o["pass_block"]
    _state_pass_fwd[(triton.cdiv(P * N, SB), Bsz * H)](states, acs, h0 if h0 is not None else final, final, hlp, H,
                                                       P * N, Tp, nc, CH=CH, BLOCK=SB, HAS_H0=h0 is not None,
                                                       LOWP=lowp, num_warps=o["pass_warps"])
    return acs, hlp, states if save else None, final


def _cb(B, C, CH, o):
    """CB [B, c, G, CH, CH] fp32 on and below the diagonal tiles (the rest unwritten)."""
    Bsz, T, G, N = B.shape
    nc = triton.cdiv(T, CH)
    cb = _scratch(Bsz, nc, G, CH, CH, device=B.device)
    BLK = o["cb_block"]
    NB = CH // BLK
    _chunk_cb[(NB * (NB + 1) // 2, nc, Bsz * G)](B, C, cb, T, G, N, nc, CH=CH, BLK=BLK, BN=_block(N),
                                                 IEEE=dot_mode(C), num_warps=o["cb_warps"],
                                                 num_stages=o["cb_stages"])
    return cb


def _scan_fwd(x, step, B, C, cb, D, acs, hlp, CH, o, out_dtype):
    """y [B, T, H, P] in ``out_dtype`` (``hlp``: h_in in x's dtype)."""
    Bsz, T, H, P, G, N, nc, Tp = _launch_shape(x, B, CH)
    y = torch.empty(Bsz, T, H, P, dtype=out_dtype, device=x.device)
    BL, BP = o["scan_bl"], o["scan_bp"]
    _chunk_scan_fwd[(H * triton.cdiv(P, BP) * (CH // BL), nc, Bsz)](
        x, step, B, C, cb if cb is not None else acs, D if D is not None else acs, acs, hlp, y,
        T, H, G, P, N, Tp, nc, CH=CH, BL=BL, BS=o["scan_bs"], BP=BP, BN=_block(N), IEEE=dot_mode(x),
        SHARED_CB=cb is not None, HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2,
        num_warps=o["scan_warps"], num_stages=o["scan_stages"])
    return y


def _states_bwd(dy, C, acs, states, dfinal, CH, o):
    """g [B, c, H, P, N] (gradient of each chunk's end state, in C's dtype: only ever an operand),
    dh0 [B, H, P, N] and the gradient of each chunk decay times the decay, [B, H, c] (fp32)."""
    Bsz, T, H, P = dy.shape
    G, N = C.shape[2], C.shape[3]
    nc = states.shape[1]
    Tp = acs.shape[-1]
    f32 = dict(dtype=torch.float32, device=dy.device)
    gout = torch.empty(Bsz, nc, H, P, N, dtype=C.dtype, device=dy.device)
    dh0 = torch.empty(Bsz, H, P, N, **f32)
    ieee, BN = dot_mode(C), _block(N)
    if o["dstate_fused"]:
        BP = o["dstate_bp"]
        NPB = triton.cdiv(P, BP)
        ddecay = torch.empty(Bsz, H, nc, NPB, **f32)
        _dstate_fused_bwd[(H * NPB, Bsz)](dy, C, acs, states, dfinal if dfinal is not None else dh0, gout, dh0,
                                          ddecay, T, H, G, P, N, Tp, nc, CH=CH, BL=o["dstate_bl"], BP=BP, BN=BN,
                                          IEEE=ieee, HAS_DFINAL=dfinal is not None, num_warps=o["dstate_warps"],
                                          num_stages=o["dstate_stages"])
        return gout, dh0, ddecay.sum(-1)
    dS = torch.empty(Bsz, nc, H, P, N, **f32)
    _chunk_dstate_bwd[(nc, Bsz * H)](dy, C, acs, dS, T, H, G, P, N, Tp, nc, CH=CH, BL=o["dstate_bl"],
                                     BP=_block(P), BN=BN, IEEE=ieee, num_warps=o["dstate_warps"],
                                     num_stages=o["dstate_stages"])
    SB = o["pass_block"]
    nblk = triton.cdiv(P * N, SB)
    ddecay = torch.empty(Bsz, H, nc, nblk, **f32)
    _state_pass_bwd[(nblk, Bsz * H)](dS, gout, states, acs, dfinal if dfinal is not None else dh0, dh0, ddecay,
                                     H, P * N, Tp, nc, CH=CH, BLOCK=SB, HAS_DFINAL=dfinal is not None,
                                     num_warps=o["pass_warps"])
    return gout, dh0, ddecay.sum(-1)


def _slots(x, CH, o):
    """The shares of d acs [B, H, 3 + CH / dcb_block, Tp], each slot written at every step: slot 0 the
    end-state decay's (dx kernel), slot 1 the incoming state's (dC kernel), slots 2... the intra-chunk
    decays' (dCB kernel)."""
    Bsz, T, H, _ = x.shape
    Tp = triton.cdiv(T, CH) * CH
    return torch.empty(Bsz, H, 3 + CH // o["dcb_block"], Tp, dtype=torch.float32, device=x.device)


def _dx_bwd(x, step, B, C, cb, D, acs, gout, dy, slots, CH, o):
    """dx [B, T, H, P] (x's dtype), d step's share through u [B, T, H], w [B, H, Tp], dD per tile or
    None; writes slot 0 of ``slots`` (-w)."""
    Bsz, T, H, P, G, N, nc, Tp = _launch_shape(x, B, CH)
    f32 = dict(dtype=torch.float32, device=x.device)
    BS = o["dx_bs"]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dstep = torch.empty(Bsz, T, H, **f32)
    w = torch.empty(Bsz, H, Tp, **f32)
    dD = torch.empty(Bsz, nc * (CH // BS), H, P, **f32) if D is not None else None
    _chunk_bwd_dx[(H * (CH // BS), nc, Bsz)](
        x, step, B, C, cb if cb is not None else acs, D if D is not None else acs, acs, gout, dy, dx, dstep, slots,
        w, dD if dD is not None else w, T, H, G, P, N, Tp, nc, slots.shape[2], CH=CH, BS=BS, BL=o["dx_bl"],
        BP=_block(P), BN=_block(N), IEEE=dot_mode(x), SHARED_CB=cb is not None, HAS_D=D is not None,
        D_PER_P=D is not None and D.dim() == 2, num_warps=o["dx_warps"], num_stages=o["dx_stages"])
    return dx, dstep, w, dD


def _dcb_bwd(x, step, B, C, cb, acs, dy, slots, CH, o):
    """dCB [B, c, G, blocks of heads, CH, CH] (fp32; upper tiles unwritten); writes slots 2 ...."""
    Bsz, T, H, P, G, N, nc, Tp = _launch_shape(x, B, CH)
    HPP = o["dcb_heads"]
    nsplit = triton.cdiv(H // G, HPP)
    BLK = o["dcb_block"]
    NB = CH // BLK
    dcb = _scratch(Bsz, nc, G, nsplit, CH, CH, device=x.device)
    _chunk_bwd_dcb[(NB * (NB + 1) // 2, nc, Bsz * G * nsplit)](
        x, step, B, C, cb if cb is not None else acs, acs, dy, dcb, slots, T, H, G, P, N, Tp, nc, slots.shape[2],
        HPP, CH=CH, BLK=BLK, BP=_block(P), BN=_block(N), IEEE=dot_mode(x), SHARED_CB=cb is not None, SLOT0=2,
        num_warps=o["dcb_warps"], num_stages=o["dcb_stages"])
    return dcb


def _db_bwd(x, step, C, acs, gout, dcb, CH, o, out_dtype=torch.float32):
    """dB [B, T, G, N] in ``out_dtype`` (written by the kernel with one block of heads, else the sum
    of fp32 partials)."""
    Bsz, T, H, P, G, N, nc, Tp = _launch_shape(x, C, CH)
    HPP = o["dbc_heads"]
    nsplit = triton.cdiv(H // G, HPP)
    BS = o["db_bs"]
    dB = torch.empty(Bsz, T, G, nsplit, N, dtype=out_dtype if nsplit == 1 else torch.float32, device=x.device)
    _chunk_bwd_db[(CH // BS, nc, Bsz * G * nsplit)](
        x, step, C, acs, gout, dcb, dB, T, H, G, P, N, Tp, nc, HPP, dcb.shape[3], CH=CH, BS=BS, BL=o["db_bl"],
        BP=_block(P), BN=_block(N), IEEE=dot_mode(x), num_warps=o["db_warps"], num_stages=o["db_stages"])
    return dB[:, :, :, 0] if nsplit == 1 else dB.sum(3).to(out_dtype)


def _dc_bwd(B, C, acs, states, dy, dcb, slots, CH, o, out_dtype=torch.float32):
    """dC [B, T, G, N] in ``out_dtype`` (as ``_db_bwd``); writes slot 1 of ``slots``."""
    Bsz, T, H, P = dy.shape
    G, N = C.shape[2], C.shape[3]
    nc, Tp = states.shape[1], acs.shape[-1]
    HPP = o["dbc_heads"]
    nsplit = triton.cdiv(H // G, HPP)
    BL = o["dc_bl"]
    dC = torch.empty(Bsz, T, G, nsplit, N, dtype=out_dtype if nsplit == 1 else torch.float32, device=C.device)
    _chunk_bwd_dc[(CH // BL, nc, Bsz * G * nsplit)](
        B, C, acs, states, dy, dcb, dC, slots, T, H, G, P, N, Tp, nc, slots.shape[2], HPP, dcb.shape[3], CH=CH,
        BL=BL, BS=o["dc_bs"], BP=_block(P), BN=_block(N), IEEE=dot_mode(C), SLOT=1, num_warps=o["dc_warps"],
        num_stages=o["dc_stages"])
    return dC[:, :, :, 0] if nsplit == 1 else dC.sum(3).to(out_dtype)


def _finish_bwd(slots, w, ddecay, step, A, dstep, CH, o):
    """d acs -> d a (a reverse cumsum inside each chunk, plus the gradient of the chunk's end value),
    added to ``dstep`` in place as d a * A; returns dA [H] fp32."""
    Bsz, H, NSLOT, Tp = slots.shape
    T = step.shape[1]
    nc = Tp // CH
    dA = torch.empty(Bsz, H, nc, dtype=torch.float32, device=step.device)
    _dacs_finish[(nc, Bsz * H)](slots, w, ddecay, step, A, dstep, dA, T, H, Tp, nc, NSLOT, CH=CH,
                                BSLOT=triton.next_power_of_2(NSLOT), num_warps=o["finish_warps"])
    return dA.sum((0, 2))


class _SSDCore(torch.autograd.Function):
    """(x, step, A, B, C, D, h0) -> (y, final fp32): the chunked scan with steps already processed and
    the D skip fused; y in ``out_dtype``; ``opts`` from ``launch_options``."""

    @staticmethod
    def forward(ctx, x, step, A, B, C, D, h0, CH, opts, out_dtype):
        A2 = A * LOG2E
        acs, hlp, states, final = _states_fwd(x, step, A2, B, h0, CH, opts, save=any(ctx.needs_input_grad))
        cb = _cb(B, C, CH, opts) if opts["cb_shared"] else None
        y = _scan_fwd(x, step, B, C, cb, D, acs, hlp, CH, opts, out_dtype)
        ctx.save_for_backward(x, step, A, B, C, D, acs, states)
        ctx.CH, ctx.opts, ctx.has_h0 = CH, opts, h0 is not None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, step, A, B, C, D, acs, states = ctx.saved_tensors
        CH, o = ctx.CH, ctx.opts
        Bsz, T, H, P, G, N, nc, Tp = _launch_shape(x, B, CH)
        dy = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if dy is None else dy.contiguous()
        dfinal = None if dfinal is None else dfinal.contiguous()
        gout, dh0, ddecay = _states_bwd(dy, C, acs, states, dfinal, CH, o)
        cb = _cb(B, C, CH, o) if o["cb_shared"] else None
        slots = _slots(x, CH, o)
        dx, dstep, w, dD = _dx_bwd(x, step, B, C, cb, D, acs, gout, dy, slots, CH, o)
        dcb = _dcb_bwd(x, step, B, C, cb, acs, dy, slots, CH, o)
        dB = _db_bwd(x, step, C, acs, gout, dcb, CH, o, B.dtype)
        dC = _dc_bwd(B, C, acs, states, dy, dcb, slots, CH, o, C.dtype)
        dA = _finish_bwd(slots, w, ddecay, step, A, dstep, CH, o)
        dDout = None
        if D is not None:
            dDout = dD.sum((0, 1))
            dDout = (dDout if D.dim() == 2 else dDout.sum(-1)).to(D.dtype)
        return (dx, dstep, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dDout, dh0 if ctx.has_h0 else None,
                None, None, None)


def ssd_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    block_len: int | None = None,
    options: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SSD through the Triton kernels; see ``seqblocks.ops.ssd.ssd`` for the contract (inputs valid,
    fp16 / bf16 / fp32). ``chunk_size`` is rounded up to a power of two in [16, 256]. ``options``
    overrides ``launch_options`` keys for this call (forward and backward); ``block_len`` sets every
    time tile at once (applied before ``options``)."""
    if cu_seqlens is not None:
        xx, dd, BB, CC = (unpack(t, cu_seqlens)[0] for t in (x, dt, B, C))
        zz = None if z is None else unpack(z, cu_seqlens)[0]
        y, final = ssd_triton(xx, dd, A, BB, CC, D, zz, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                              initial_state=initial_state, return_final_state=True, lengths=cu_seqlens.diff(),
                              chunk_size=chunk_size, block_len=block_len, options=options)
        y = pack(y, cu_seqlens)
        return (y, final) if return_final_state else y

    Bsz, T, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    CH = _block(min(chunk_size, 256))
    overrides = {} if block_len is None else dict.fromkeys(_TIME_TILES, _block(block_len))
    opts = launch_options(x.dtype, P, N, H, G, CH, {**overrides, **(options or {})})
    if Bsz == 0 or T == 0:
        h0 = torch.zeros(Bsz, H, P, N, dtype=torch.float32, device=x.device) if initial_state is None \
            else initial_state.float()
        y = x.new_zeros(x.shape)
        return (y, h0.clone()) if return_final_state else y
    step = process_dt(dt, dt_bias, dt_softplus, dt_limit, torch.float32)       # [B, T, H]
    valid = None
    if lengths is not None:
        valid = torch.arange(T, device=x.device) < lengths.to(x.device).unsqueeze(1)  # [B, T]
        step = torch.where(valid.unsqueeze(-1), step, torch.zeros((), device=x.device))
    if valid is not None:  # padding never reads x or B (0 * NaN would reach the state and earlier rows)
        x = torch.where(valid[..., None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        B = torch.where(valid[..., None, None], B, torch.zeros((), dtype=B.dtype, device=B.device))
    h0 = None if initial_state is None else initial_state.float().contiguous()
    # Without a gate or padding to apply afterwards, the kernel writes y in x's dtype directly.
    out_dtype = x.dtype if z is None and valid is None else torch.float32
    y, final = _SSDCore.apply(x.contiguous(), step.contiguous(), A.float().contiguous(), B.contiguous(),
                              C.contiguous(), None if D is None else D.contiguous(), h0, CH, opts, out_dtype)
    if z is not None:
        y = y * F.silu(z.float())
    if valid is not None:
        y = torch.where(valid[..., None, None], y, torch.zeros((), device=x.device))
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y


@triton.jit
def _state_update(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                  H, G, P, N, lo, hi,
                  BP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr,
                  HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr):
    bh = tl.program_id(0)
    pb = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B T H P passes 2^31 at long contexts
    h = bh % H
    g = h // (H // G)
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    dt = tl.load(dt_ptr + bh).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))), dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + bh * P + p, mask=pm, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + (b * G + g) * N + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + (b * G + g) * N + n, mask=nm, other=0.0).to(tl.float32)
    s_off = (bh * P + p[:, None]) * N + n[None, :]
    s_m = pm[:, None] & nm[None, :]
    s = tl.load(state_ptr + s_off, mask=s_m, other=0.0).to(tl.float32)
    s = decay * s + (dt * x)[:, None] * Bv[None, :]
    tl.debug_barrier()  # every thread holding a copy of a state element has read it before it is overwritten
    tl.store(state_ptr + s_off, s.to(state_ptr.dtype.element_ty), mask=s_m)
    y = tl.sum(s * Cv[None, :], 1)
    if HAS_D:
        if D_PER_P:
            y += tl.load(D_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32) * x
        else:
            y += tl.load(D_ptr + h).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + bh * P + p, mask=pm, other=0.0).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    tl.store(y_ptr + bh * P + p, y, mask=pm)


def ssd_state_update_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    """The decode step in one kernel (grid: rows x heads x blocks of P); ``state`` must be contiguous
    and is overwritten in place. See ``seqblocks.ops.ssd.ssd_state_update``."""
    Bsz, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    # The kernel addresses every input as contiguous, the per-head A and dt_bias too (element h at offset h),
    # so they are copied like the rest: passed as given, a strided [H] view of either (a column of a larger
    # tensor) was read at the wrong heads.
    x, dt, A, B, C = x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous()
    z = None if z is None else z.contiguous()
    D = None if D is None else D.contiguous()
    dt_bias = None if dt_bias is None else dt_bias.contiguous()
    y = torch.empty_like(x)
    BN = triton.next_power_of_2(N)
    BP = min(triton.next_power_of_2(P), max(1, 4096 // BN))
    lo, hi = dt_limit
    clamp = lo > 0 or hi < math.inf
    _state_update[(Bsz * H, triton.cdiv(P, BP))](
        state, x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else dt, y, H, G, P, N, float(lo), float(min(hi, 3.0e38)),
        BP=BP, BN=BN, HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp, num_warps=4)
    return y
