"""Chunked PyTorch path of ``mamba3``: quadratic inside a chunk, the state passed between chunks.

The trapezoid rule's two terms fold into one weight per key: the key of step s enters h_s with
gamma_s and h_{s+1} with beta_{s+1} = alpha_{s+1} dt_{s+1} (1 - lambda_{s+1}), so every later step t > s sees
``exp(sum_{s < u <= t} adt_u) * scale_s`` with ``scale_s = gamma_s + dt_{s+1} (1 - lambda_{s+1})``, and step s
itself sees gamma_s. Inside a chunk of L steps (L * R rows for MIMO: every rank is a row)::

    y_intra[t, r] = sum_{s <= t, r'} w[t, s] (q'_{t,r} . k'_{s,r'}) x_{s,r'},
                    w[t, s] = exp(cum_t - cum_s) scale_s (s < t),  gamma_t (s = t)
    y_inter[t, r] = exp(cum_t) H q'_{t,r}
    H            <- exp(cum_L) H + sum_{s, r'} exp(cum_L - cum_s) scale_s x_{s,r'} k'_{s,r'}^T

where H is the carried state ``h_s + dt_{s+1} (1 - lambda_{s+1}) x_s k'_s^T`` (the next step's beta term
without its decay), exactly h at the sequence's end where dt_{T} = 0. Padding (``lengths``) gets
dt = adt = 0: alpha = 1 and beta = gamma = 0 there, so it neither reads nor writes the state.
Packed sequences (``cu_seqlens``) are unpacked into a padded batch. Differentiated by autograd.

Non-finite values: inside a chunk future keys and values meet a zero weight, and ``0 * NaN = NaN``
would leak backwards in time. So tokens with a non-finite k, v, adt, dt, trap or angle are zeroed
before the chunk arithmetic, and their row's outputs from that token on (and its final state) are set
to NaN afterwards, as the sequential recurrence has them. A non-finite q or z touches only its own
token's output, in both.

Shapes: B batch, T time, L chunk, H heads, P head width, N state width, G groups, R MIMO rank, S angles.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from seqblocks.ops._packing import pack, unpack
from seqblocks.ops.mamba3._common import TWO_PI, Mamba3State, compute_dtype, expand_groups, rotate
from seqblocks.ops.mamba3.reference import mamba3_step_ref, zero_state

__all__ = ["mamba3_torch", "mamba3_step_torch", "chunk_scan_torch", "prepare", "epilogue", "finish", "Prepared"]


class Prepared(NamedTuple):
    """The scan's inputs after the elementwise prologue (all in the accumulation dtype)."""

    qr: torch.Tensor | None  # [B, T, R, H, N] rotated, biased q (None: the kernels rotate on load)
    kr: torch.Tensor | None  # [B, T, R, H, N] rotated, biased k
    x: torch.Tensor       # [B, T, R, H, P] x (MIMO: lifted by mimo_v)
    adt: torch.Tensor     # [B, T, H] log decay, 0 at padding and poisoned tokens
    scale: torch.Tensor   # [B, T, H] a key's weight for every later step
    gamma: torch.Tensor   # [B, T, H] a key's weight for its own step
    h0: torch.Tensor      # [B, H, P, N] the carried state to start from
    theta: torch.Tensor   # [B, H, S] the final angles
    bad: torch.Tensor     # [B, T] tokens with a non-finite input of the state
    valid: torch.Tensor | None  # [B, T] inside lengths
    state: Mamba3State    # the initial state
    q_in: torch.Tensor    # [B, T, R, G, N] q before bias and rotation
    k_in: torch.Tensor    # [B, T, R, G, N] k before bias and rotation, 0 at poisoned tokens
    q_bias: torch.Tensor  # [R, H, N]
    k_bias: torch.Tensor  # [R, H, N]
    th: torch.Tensor      # [B, T, H, S] the accumulated angles of every step
    halves: bool          # MIMO's (i, i + N / 2) pairs, else SISO's (2i, 2i + 1)


def accumulate_angles(theta0: torch.Tensor, inc: torch.Tensor, chunk: int) -> torch.Tensor:
    """theta0 [B, H, S] + running sum of inc [B, T, H, S], mod 2 pi: summed inside chunks, the chunk totals
    carried mod 2 pi in float64, so the rounding does not grow with T."""
    Bsz, T = inc.shape[:2]
    pad = (-T) % chunk
    c = F.pad(inc, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, chunk)).cumsum(2)      # [B, nc, L, H, S]
    totals = torch.remainder(c[:, :, -1].double().cumsum(1), TWO_PI)              # [B, nc, H, S]
    start = torch.cat([torch.zeros_like(totals[:, :1]), totals[:, :-1]], 1).to(inc.dtype)
    theta = torch.remainder(theta0[:, None, None] + start[:, :, None] + c, TWO_PI)
    return theta.flatten(1, 2)[:, :T]


def prepare(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_v, initial_state, lengths, chunk_size,
            rotate_now=True) -> Prepared:
    """Everything before the chunked scan: masks, non-finite tokens, the trapezoid weights, the angles, the
    rotated keys and queries (unless ``rotate_now=False``: the Triton kernels bias and rotate q and k as
    they load them) and the carried initial state (module docstring)."""
    acc = compute_dtype(q, k, v, adt, dt, angles)
    Bsz, T, R, G, N = q.shape
    H, P, S = v.shape[2], v.shape[3], angles.shape[-1]
    mimo, dev = mimo_v is not None, v.device
    q, k, v, adt, dt, trap, angles = (t.to(acc) for t in (q, k, v, adt, dt, trap, angles))
    q_bias, k_bias = q_bias.to(acc).transpose(0, 1), k_bias.to(acc).transpose(0, 1)  # [R, H, N]
    valid = None
    if lengths is not None:
        valid = torch.arange(T, device=dev)[None] < lengths.to(dev)[:, None]     # [B, T]
    # Tokens with a non-finite input of the state poison it from there on (module docstring).
    bad = ~(torch.isfinite(k).flatten(2).all(-1) & torch.isfinite(v).flatten(2).all(-1)
            & torch.isfinite(angles).flatten(2).all(-1)
            & torch.isfinite(torch.stack([adt, dt, trap], -1)).flatten(2).all(-1))  # [B, T]
    if valid is not None:
        bad = bad & valid
    keep = ~bad if valid is None else valid & ~bad
    zero = torch.zeros((), dtype=acc, device=dev)
    k, v, angles = (torch.where(keep.view(Bsz, T, *([1] * (t.dim() - 2))), t, zero) for t in (k, v, angles))
    adt, dt, trap = (torch.where(keep[..., None], t, zero) for t in (adt, dt, trap))
    state = initial_state if initial_state is not None else zero_state(Bsz, H, P, N, R, S, device=dev, dtype=acc)
    state = Mamba3State(*(s.to(acc) for s in state))

    lam = torch.sigmoid(trap)                                                    # [B, T, H]
    gamma = dt * lam
    carry_in = dt * (1 - lam)                                                    # beta_t / alpha_t
    scale = gamma + F.pad(carry_in[:, 1:], (0, 0, 0, 1))                         # [B, T, H]
    inc = math.pi * torch.tanh(angles) * dt[..., None]                           # [B, T, H, S]
    th = accumulate_angles(state.angle, inc, chunk_size)                         # [B, T, H, S]
    proj = mimo_v.to(acc).transpose(0, 1) if mimo else torch.ones(1, H, P, device=dev, dtype=acc)  # [R, H, P]
    x = v[:, :, None] * proj                                                     # [B, T, R, H, P]
    qr = kr = None
    if rotate_now:
        qr = rotate(expand_groups(q, H) + q_bias, th[:, :, None], halves=mimo)     # [B, T, R, H, N]
        kr = rotate(expand_groups(k, H) + k_bias, th[:, :, None], halves=mimo)
    # The carried state starts with the first step's beta term of the given previous key and value.
    x_prev = state.v[:, None] * proj                                            # [B, R, H, P]
    h0 = state.ssm + carry_in[:, 0, :, None, None] * torch.einsum("brhp,brhn->bhpn", x_prev, state.k)
    return Prepared(qr, kr, x, adt, scale, gamma, h0, th[:, -1], bad, valid, state, q, k, q_bias, k_bias, th, mimo)


def chunk_scan_torch(qr, kr, x, adt, scale, gamma, h0, chunk_size):
    """The chunked scan (module docstring): y [B, T, R, H, P] and the final carried state [B, H, P, N]."""
    T, dev = qr.shape[1], qr.device
    Hc, ys = h0, []
    for c0 in range(0, T, chunk_size):
        c1 = min(c0 + chunk_size, T)
        L = c1 - c0
        q_, k_, xc = qr[:, c0:c1], kr[:, c0:c1], x[:, c0:c1]                   # [B, L, R, H, .]
        cum = torch.cumsum(adt[:, c0:c1], 1)                                     # [B, L, H]
        seg = cum[:, :, None] - cum[:, None]                                     # [B, L(t), L(s), H]
        below = torch.ones(L, L, dtype=torch.bool, device=dev).tril(-1)[None, :, :, None]
        w = torch.exp(torch.where(below, seg, -math.inf)) * scale[:, None, c0:c1]
        w = w + torch.diag_embed(gamma[:, c0:c1].transpose(1, 2)).permute(0, 2, 3, 1)  # diagonal: gamma_t
        scores = torch.einsum("btrhn,bsuhn->bhtrsu", q_, k_) * w.permute(0, 3, 1, 2)[:, :, :, None, :, None]
        y = torch.einsum("bhtrsu,bsuhp->btrhp", scores, xc)
        y = y + torch.einsum("bhpn,btrhn->btrhp", Hc, q_) * torch.exp(cum)[:, :, None, :, None]
        to_end = torch.exp(cum[:, -1:] - cum) * scale[:, c0:c1]                 # [B, L, H]
        Hc = torch.exp(cum[:, -1])[..., None, None] * Hc + torch.einsum(
            "bsuhp,bsuhn->bhpn", xc * to_end[:, :, None, :, None], k_)
        ys.append(y)
    return torch.cat(ys, 1), Hc


def epilogue(y, x, D, z, mimo_v, mimo_z, mimo_o):
    """Skip, gate and MIMO fold of the scan's output y [B, T, R, H, P] (x the scan's input, same shape)."""
    acc, mimo = x.dtype, mimo_v is not None
    if D is not None:
        y = y + D.to(acc)[:, None] * x
    if z is not None:
        zp = mimo_z.to(acc).transpose(0, 1) if mimo else 1.0
        y = y * F.silu(z.to(acc)[:, :, None] * zp)
    if not mimo:
        return y[:, :, 0]
    if mimo_o is not None:
        return torch.einsum("btrhp,hrp->bthp", y, mimo_o.to(acc))
    return y


def finish(y, hf, prep: Prepared, v, lengths, return_final_state, out_dtype):
    """Everything after the scan and its epilogue: poisoning and padding, the final state."""
    valid, bad = prep.valid, prep.bad
    Bsz, T = prep.x.shape[:2]
    acc = prep.x.dtype
    y = y.to(acc)
    poisoned = (bad.to(torch.int32).cumsum(1) > 0).view(Bsz, T, *([1] * (y.dim() - 2)))
    y = y.masked_fill(poisoned, math.nan)
    zero = torch.zeros((), dtype=acc, device=y.device)
    if valid is not None:
        y = torch.where(valid.view(Bsz, T, *([1] * (y.dim() - 2))), y, zero)
    y = y.to(out_dtype)
    if not return_final_state:
        return y
    final = _final_state(prep, hf, v.to(acc), lengths)
    # A poisoned row's whole state is NaN.
    return y, Mamba3State(*(s.masked_fill(poisoned[:, -1].view(Bsz, *([1] * (s.dim() - 1))), math.nan)
                            for s in final))


def _final_state(prep: Prepared, hf, v, lengths) -> Mamba3State:
    # The last valid step's key and value (the initial ones for an empty row).
    state = prep.state
    Bsz, dev, H = v.shape[0], v.device, v.shape[2]

    def key(rows, t):  # the rotated, biased key of step t of each row: [B, R, H, N]
        if prep.kr is not None:
            return prep.kr[rows, t]
        return rotate(expand_groups(prep.k_in[rows, t], H) + prep.k_bias, prep.th[rows, t][:, None], prep.halves)

    if lengths is None:
        return Mamba3State(prep.theta, hf, key(slice(None), -1).contiguous(), v[:, -1])
    last = (lengths.to(dev) - 1).clamp(min=0)
    has = lengths.to(dev) > 0
    rows = torch.arange(Bsz, device=dev)
    k_last = torch.where(has[:, None, None, None], key(rows, last), state.k)
    v_last = torch.where(has[:, None, None], v[rows, last], state.v)
    return Mamba3State(prep.theta, hf, k_last, v_last)


def mamba3_torch(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=None, z=None, *, mimo_v=None, mimo_z=None,
                 mimo_o=None, initial_state=None, return_final_state=False, lengths=None, cu_seqlens=None,
                 chunk_size=64, scan=None):
    """Chunked Mamba-3; see ``seqblocks.ops.mamba3.mamba3`` for the contract. Inputs are assumed valid.

    ``scan`` replaces the rotation, ``chunk_scan_torch`` and ``epilogue`` (the Triton path passes its
    kernels, which bias and rotate q and k on load and apply the skip, gate and MIMO fold themselves);
    the rest of the prologue and ``finish`` are the same for both."""
    if cu_seqlens is not None:
        unpacked = [None if t is None else unpack(t, cu_seqlens)[0] for t in (q, k, v, adt, dt, trap, angles, z)]
        y, final = mamba3_torch(*unpacked[:6], q_bias, k_bias, unpacked[6], D, unpacked[7], mimo_v=mimo_v,
                                mimo_z=mimo_z, mimo_o=mimo_o, initial_state=initial_state, return_final_state=True,
                                lengths=cu_seqlens.diff(), chunk_size=chunk_size, scan=scan)
        y = pack(y, cu_seqlens)
        return (y, final) if return_final_state else y
    Bsz, T, R = q.shape[:3]
    H, P = v.shape[2:]
    if T == 0:
        acc = compute_dtype(q, k, v, adt, dt, angles)
        y = v.new_zeros((Bsz, 0, R, H, P) if mimo_v is not None and mimo_o is None else (Bsz, 0, H, P))
        if not return_final_state:
            return y
        S, N = angles.shape[-1], q.shape[-1]
        state = initial_state or zero_state(Bsz, H, P, N, R, S, device=v.device, dtype=acc)
        return y, Mamba3State(*(s.to(acc).clone() for s in state))
    prep = prepare(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_v, initial_state, lengths, chunk_size,
                   rotate_now=scan is None)
    if scan is not None:  # the kernels also bias and rotate q and k, and apply the skip, gate and MIMO fold
        y, hf = scan(prep.q_in, prep.k_in, prep.q_bias, prep.k_bias, prep.th, prep.x, prep.adt, prep.scale,
                     prep.gamma, prep.h0, chunk_size, D, z, mimo_z, mimo_o)
        if mimo_v is None:
            y = y[:, :, 0]
    else:
        y, hf = chunk_scan_torch(prep.qr, prep.kr, prep.x, prep.adt, prep.scale, prep.gamma, prep.h0, chunk_size)
        y = epilogue(y, prep.x, D, z, mimo_v, mimo_z, mimo_o)
    return finish(y, hf, prep, v, lengths, return_final_state, v.dtype)


def mamba3_step_torch(state: Mamba3State, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=None, z=None,
                      mimo_v=None, mimo_z=None, mimo_o=None) -> torch.Tensor:
    """One decode step of ``mamba3``, writing the new state into ``state``'s tensors; returns y in v's dtype."""
    acc = state.ssm.dtype
    cast = [None if t is None else t.to(acc) for t in (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z,
                                                         mimo_v, mimo_z, mimo_o)]
    y, new = mamba3_step_ref(Mamba3State(*(s.to(acc) for s in state)), *cast)
    for old, fresh in zip(state, new):
        old.copy_(fresh)
    return y.to(v.dtype)
