"""Triton kernel of the Mamba-3 decode step ``mamba3_step``: one launch for the state update and the
output (imported only once ``resolve_backend`` has chosen "triton"; nothing else imports this module).

One program per (batch, head) computes the new angles, rotates the biased q and k of every rank, then
walks the head width in slices of ``BLOCK_P``: the [BLOCK_P, N] slice of h is read, advanced by the
trapezoid rule (the previous key and value with beta, the new ones with gamma), written back in place
and contracted with the rotated q for the output, to which the skip, the gate and the MIMO fold are
applied. The angle, key and value of the state are read before and written after the walk, by the one
program that owns them, so the in-place update has no race. Everything is fp32 (the state must be);
the grid depends on shapes only, so a step can be captured in a CUDA graph.

Shapes: B batch, H heads, P head width, N state, G groups, R rank, S angles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops.mamba3.tuning import Mamba3Tuning

__all__ = ["mamba3_step_triton"]


@triton.jit
def _rotated(ptr, bias_ptr, offs_n, partner, sign, cos, sin, mn):
    # rot(u + bias) over the N channels: u cos + sign partner(u) sin (sign -1 on a pair's first channel).
    u = tl.load(ptr + offs_n, mask=mn, other=0.0).to(tl.float32) + tl.load(bias_ptr + offs_n, mask=mn, other=0.0)
    w = tl.load(ptr + partner, mask=mn, other=0.0).to(tl.float32) + tl.load(bias_ptr + partner, mask=mn, other=0.0)
    return u * cos + sign * w * sin


@triton.jit
def _mamba3_step_kernel(ANGLE, SSM, KST, VST, Q, K, V, ADT, DT, TRAP, QB, KB, ANG, D, Z, MV, MZ, MO, Y,
                        H, G, N, P, S, R: tl.constexpr, HALVES: tl.constexpr, HAS_D: tl.constexpr,
                        HAS_Z: tl.constexpr, MIMO: tl.constexpr, FOLD: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    bh = pid_b * H + pid_h
    g = pid_h // (H // G)
    offs_n = tl.arange(0, BLOCK_N)
    mn = offs_n < N
    # The pair of channel n, its partner, and whether n is the pair's first channel.
    if HALVES:
        pair = offs_n % (N // 2)
        first = offs_n < N // 2
        partner = tl.where(first, offs_n + N // 2, offs_n - N // 2)
    else:
        pair = offs_n // 2
        first = (offs_n % 2) == 0
        partner = offs_n ^ 1
    sign = tl.where(first, -1.0, 1.0)
    ma = mn & (pair < S)
    dt = tl.load(DT + bh).to(tl.float32)
    adt = tl.load(ADT + bh).to(tl.float32)
    lam = 1.0 / (1.0 + tl.exp(-tl.load(TRAP + bh).to(tl.float32)))
    alpha = tl.exp(adt)
    beta = alpha * dt * (1.0 - lam)
    gamma = dt * lam
    rate = tl.load(ANG + bh * S + pair, mask=ma, other=0.0).to(tl.float32)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * rate) + 1.0)
    theta = tl.load(ANGLE + bh * S + pair, mask=ma, other=0.0) + 3.141592653589793 * tanh * dt
    theta = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)      # mod 2 pi, in [0, 2 pi)
    theta = tl.where(ma, theta, 0.0)
    cos, sin = tl.cos(theta), tl.sin(theta)
    offs_r = tl.arange(0, R)
    # [R, N]: the previous key (state), the new rotated key and query of every rank.
    k_old = tl.load(KST + ((pid_b * R + offs_r[:, None]) * H + pid_h) * N + offs_n[None, :], mask=mn[None, :],
                    other=0.0)
    qk_row = ((pid_b * R + offs_r[:, None]) * G + g) * N                       # q / k [B, R, G, N]
    bias_row = (pid_h * R + offs_r[:, None]) * N                                # biases [H, R, N]
    kr = _rotated(K + qk_row, KB + bias_row, offs_n[None, :], partner[None, :], sign[None, :], cos[None, :],
                  sin[None, :], mn[None, :])
    qr = _rotated(Q + qk_row, QB + bias_row, offs_n[None, :], partner[None, :], sign[None, :], cos[None, :],
                  sin[None, :], mn[None, :])
    if HAS_D:
        d = tl.load(D + pid_h).to(tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mp = offs_p < P
        v = tl.load(V + bh * P + offs_p, mask=mp, other=0.0).to(tl.float32)      # [BLOCK_P]
        v_old = tl.load(VST + bh * P + offs_p, mask=mp, other=0.0)
        if MIMO:
            proj = tl.load(MV + (pid_h * R + offs_r[:, None]) * P + offs_p[None, :], mask=mp[None, :], other=0.0)
            x = v[None, :] * proj                                                 # [R, BLOCK_P]
            x_old = v_old[None, :] * proj
        else:
            x = v[None, :] + tl.zeros((R, BLOCK_P), dtype=tl.float32)
            x_old = v_old[None, :] + tl.zeros((R, BLOCK_P), dtype=tl.float32)
        st = SSM + (bh * P + offs_p[:, None]) * N + offs_n[None, :]
        sm = mp[:, None] & mn[None, :]
        h = alpha * tl.load(st, mask=sm, other=0.0) \
            + tl.sum(beta * x_old[:, :, None] * k_old[:, None, :] + gamma * x[:, :, None] * kr[:, None, :], 0)
        tl.debug_barrier()  # every thread holding a copy of a state element has read it before it is overwritten
        tl.store(st, h, mask=sm)
        y = tl.sum(h[None, :, :] * qr[:, None, :], 2)                            # [R, BLOCK_P]
        if HAS_D:
            y += d * x
        if HAS_Z:
            z = tl.load(Z + bh * P + offs_p, mask=mp, other=0.0).to(tl.float32)
            if MIMO:
                zr = z[None, :] * tl.load(MZ + (pid_h * R + offs_r[:, None]) * P + offs_p[None, :],
                                          mask=mp[None, :], other=0.0)
            else:
                zr = z[None, :] + tl.zeros((R, BLOCK_P), dtype=tl.float32)
            y = y * zr / (1.0 + tl.exp(-zr))
        if FOLD:
            mo = tl.load(MO + (pid_h * R + offs_r[:, None]) * P + offs_p[None, :], mask=mp[None, :], other=0.0)
            tl.store(Y + bh * P + offs_p, tl.sum(y * mo, 0).to(Y.dtype.element_ty), mask=mp)
        elif MIMO:
            tl.store(Y + ((pid_b * R + offs_r[:, None]) * H + pid_h) * P + offs_p[None, :],
                     y.to(Y.dtype.element_ty), mask=mp[None, :])
        else:
            tl.store(Y + bh * P + offs_p, tl.sum(y, 0).to(Y.dtype.element_ty), mask=mp)
        tl.store(VST + bh * P + offs_p, v, mask=mp)
    tl.debug_barrier()  # the cached key and angles were read by every thread before they are replaced
    tl.store(KST + ((pid_b * R + offs_r[:, None]) * H + pid_h) * N + offs_n[None, :], kr, mask=mn[None, :])
    tl.store(ANGLE + bh * S + pair, theta, mask=ma & first)


def mamba3_step_triton(state, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=None, z=None, mimo_v=None,
                       mimo_z=None, mimo_o=None, tuning: Mamba3Tuning | None = None) -> torch.Tensor:
    """``mamba3_step_torch`` in one launch: writes the new state into ``state``'s fp32 tensors and returns y
    ([B, H, P], [B, R, H, P] for MIMO without ``mimo_o``) in v's dtype."""
    tuning = tuning or Mamba3Tuning()
    Bsz, R, G, N = q.shape
    H, P, S = v.shape[1], v.shape[2], angles.shape[-1]
    mimo = mimo_v is not None
    fold = mimo and mimo_o is not None
    y = torch.empty((Bsz, R, H, P) if mimo and not fold else (Bsz, H, P), device=v.device, dtype=v.dtype)
    # The kernel writes contiguous fp32 tensors in place; any other layout goes through a copy.
    bufs = [s if s.is_contiguous() and s.dtype == torch.float32 else s.float().contiguous() for s in state]
    c = [None if t is None else t.contiguous() for t in (q, k, v, adt, dt, trap, angles, z)]
    params = [None if t is None else t.float().contiguous() for t in (q_bias, k_bias, D, mimo_v, mimo_z, mimo_o)]
    dummy = bufs[0]
    args = [t if t is not None else dummy for t in (*c[:6], params[0], params[1], c[6], params[2], c[7],
                                                     *params[3:])]
    block_n = max(2, triton.next_power_of_2(N))
    block_p = min(tuning.step_block_p, triton.next_power_of_2(P))
    _mamba3_step_kernel[(H, Bsz)](*bufs, *args, y, H, G, N, P, S, R=R, HALVES=mimo, HAS_D=D is not None,
                                  HAS_Z=z is not None, MIMO=mimo, FOLD=fold, BLOCK_N=block_n, BLOCK_P=block_p,
                                  num_warps=tuning.step_num_warps)
    for buf, s in zip(bufs, state):
        if buf is not s:
            s.copy_(buf)
    return y

