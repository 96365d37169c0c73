"""Reference (the spec) of the Mamba-3 recurrence, SISO and MIMO, as mamba_ssm 2.3.2's kernels compute it.

Per sequence and head h (group ``g(h) = h // (H / G)``), with lambda_t = sigmoid(trap_t) the trapezoid
weight, alpha_t = exp(adt_t) (adt = A * dt, A < 0), beta_t = alpha_t dt_t (1 - lambda_t), gamma_t = dt_t lambda_t::

    theta_t  = theta_{t-1} + pi * tanh(angles_t) * dt_t                    (mod 2 pi)     [S]
    k'_{t,r} = rot(theta_t, k_{t,r,g(h)} + k_bias[h, r]),  q'_{t,r} likewise             [N]
    x_{t,r}  = v_t * mimo_v[h, r]            (SISO: R = 1, x = v)                       [P]
    h_t      = alpha_t h_{t-1} + beta_t sum_r x_{t-1,r} k'_{t-1,r}^T + gamma_t sum_r x_{t,r} k'_{t,r}^T   [P, N]
    y_{t,r}  = h_t q'_{t,r} + D[h] x_{t,r}
    y_{t,r} *= silu(z_t * mimo_z[h, r])      (optional gate; SISO: silu(z_t))
    y_t      = sum_r mimo_o[h, r] * y_{t,r}  (MIMO with mimo_o; SISO: y_{t,0})

``rot`` turns channel pairs (2i, 2i + 1) (SISO) or (i, i + N / 2) (MIMO) by theta_t[i] for i < S and leaves
the other channels alone. The state carried between steps is (theta, h, k'_{t}, v_t): the trapezoid's
second term needs the previous step's key and value.

Sequential over time, one step at a time, everything in fp32 (float64 for float64 inputs). Slow and
obviously right. ``mamba3_step_ref`` is one step of it, shared with the decode step.

Shapes: B batch, T time, H heads, P head width, N state width, G groups of B / C, R MIMO rank,
S rotary angles per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqblocks.ops.mamba3._common import TWO_PI, Mamba3State, compute_dtype, expand_groups, rotate

__all__ = ["mamba3_ref", "mamba3_step_ref", "zero_state"]


def zero_state(rows: int, H: int, P: int, N: int, R: int, S: int, *, device, dtype) -> Mamba3State:
    """A zero ``Mamba3State`` for ``rows`` sequences."""
    return Mamba3State(torch.zeros(rows, H, S, device=device, dtype=dtype),
                       torch.zeros(rows, H, P, N, device=device, dtype=dtype),
                       torch.zeros(rows, R, H, N, device=device, dtype=dtype),
                       torch.zeros(rows, H, P, device=device, dtype=dtype))


def mamba3_step_ref(state: Mamba3State, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=None, z=None,
                    mimo_v=None, mimo_z=None, mimo_o=None) -> tuple[torch.Tensor, Mamba3State]:
    """One step of the recurrence (inputs valid, every tensor in the accumulation dtype).

    Args: state (Mamba3State) [B, ...]; q, k [B, R, G, N]; v, z [B, H, P]; adt, dt, trap [B, H];
    q_bias, k_bias [H, R, N]; angles [B, H, S]; D [H]; mimo_v / mimo_z / mimo_o [H, R, P].
    Returns (y [B, H, P], or [B, R, H, P] for MIMO without mimo_o; the new state)."""
    H = v.shape[1]
    mimo = mimo_v is not None
    lam = torch.sigmoid(trap)                                              # [B, H]
    alpha = torch.exp(adt)
    beta, gamma = alpha * dt * (1 - lam), dt * lam
    theta = torch.remainder(state.angle + math.pi * torch.tanh(angles) * dt[..., None], TWO_PI)  # [B, H, S]
    qr = rotate(expand_groups(q, H) + q_bias.transpose(0, 1), theta[:, None], halves=mimo)    # [B, R, H, N]
    kr = rotate(expand_groups(k, H) + k_bias.transpose(0, 1), theta[:, None], halves=mimo)
    proj = mimo_v.transpose(0, 1) if mimo else 1.0                          # [R, H, P]
    x, x_prev = v[:, None] * proj, state.v[:, None] * proj                 # [B, R, H, P]
    h = (alpha[..., None, None] * state.ssm
         + beta[..., None, None] * torch.einsum("brhp,brhn->bhpn", x_prev, state.k)
         + gamma[..., None, None] * torch.einsum("brhp,brhn->bhpn", x, kr))
    y = torch.einsum("bhpn,brhn->brhp", h, qr)
    if D is not None:
        y = y + D[:, None] * x
    if z is not None:
        y = y * F.silu(z[:, None] * (mimo_z.transpose(0, 1) if mimo else 1.0))
    if not mimo:
        y = y[:, 0]
    elif mimo_o is not None:
        y = torch.einsum("brhp,hrp->bhp", y, mimo_o)
    return y, Mamba3State(theta, h, kr, v)


def mamba3_ref(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=None, z=None, *, mimo_v=None, mimo_z=None,
               mimo_o=None, initial_state=None, return_final_state=False, lengths=None, cu_seqlens=None):
    """Sequential Mamba-3; see ``seqblocks.ops.mamba3.mamba3`` for the contract. Inputs are assumed valid."""
    acc = compute_dtype(q, k, v, adt, dt, angles)
    Bsz, T, R, G, N = q.shape
    H, P, S = v.shape[2], v.shape[3], angles.shape[-1]
    f = [None if t is None else t.to(acc) for t in (q, k, v, adt, dt, trap, angles, z)]
    params = [None if t is None else t.to(acc) for t in (q_bias, k_bias, D, mimo_v, mimo_z, mimo_o)]
    q_bias, k_bias, D, mimo_v, mimo_z, mimo_o = params

    # Each sequence is (row, start, stop, index of its initial / final state).
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        seqs = [(0, bounds[i], bounds[i + 1], i) for i in range(len(bounds) - 1)]
    else:
        seqs = [(b, 0, T if lengths is None else int(lengths[b]), b) for b in range(Bsz)]
    per_rank = mimo_v is not None and mimo_o is None
    y = v.new_zeros((Bsz, T, R, H, P) if per_rank else (Bsz, T, H, P), dtype=acc)
    finals = []
    for row, start, stop, i in seqs:
        if initial_state is None:
            state = zero_state(1, H, P, N, R, S, device=v.device, dtype=acc)
        else:
            state = Mamba3State(*(s[i: i + 1].to(acc) for s in initial_state))
        for t in range(start, stop):
            qt, kt, vt, adtt, dtt, trapt, angt, zt = (None if a is None else a[row: row + 1, t] for a in f)
            yt, state = mamba3_step_ref(state, qt, kt, vt, adtt, dtt, trapt, q_bias, k_bias, angt, D, zt,
                                        mimo_v, mimo_z, mimo_o)
            y[row, t] = yt[0]
        finals.append(state)
    y = y.to(v.dtype)
    if not return_final_state:
        return y
    return y, Mamba3State(*(torch.cat([s[j] for s in finals], 0) for j in range(4)))
