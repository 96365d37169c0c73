"""What every softmax-attention backend shares: argument checks and the masked, modified scores.

One attention call is described by queries, keys and values plus the rules that shape the scores:

    s[b, h, i, j] = scale * q[b, h, i] . k[b, h // G, j]            (G = Hq / Hkv, GQA groups)
    s += alibi: -slope[h] * |qpos[b, i] - kpos[b, j]|                (if alibi_slopes)
    s  = score_mod(s, b, h, qpos[b, i], kpos[b, j])                  (if score_mod)
    s += attn_mask[b, h, i, j]                                       (if a float attn_mask)
    allowed = causal: qpos >= kpos; window: qpos - kpos < window; key_valid[b, j];
              mask_mod(b, h, qpos, kpos); a boolean attn_mask
    out[b, h, i] = sum_j softmax_j(s over allowed j) v[b, h // G, j]; a row with no allowed key is 0.

``qpos`` / ``kpos`` are ABSOLUTE token positions (cache offset + index), so mods, ALiBi, causal and
window masks treat a token the same in a full pass and while decoding with a cache.

Shapes: B batch, H query heads, Hkv key/value heads, G = H / Hkv, Tq queries, Tk keys, K key width,
V value width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = ["AttentionArgs", "make_args", "block_scores", "allowed_mask", "additive_bias", "default_positions",
           "grouped", "acc_dtype"]

ScoreMod = Callable[..., torch.Tensor]
MaskMod = Callable[..., torch.Tensor]


@dataclasses.dataclass
class AttentionArgs:
    """A checked attention request (see the module docstring). Positions are [B, T] int64."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    causal: bool
    window: int | None
    q_positions: torch.Tensor | None
    kv_positions: torch.Tensor | None
    key_valid: torch.Tensor | None
    attn_mask: torch.Tensor | None
    score_mod: ScoreMod | None
    mask_mod: MaskMod | None
    alibi_slopes: torch.Tensor | None
    dropout_p: float

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def default_positions(self) -> bool:
        """Positions are the plain aligned ones (q at the end of the keys, no offsets)."""
        return self.q_positions is None and self.kv_positions is None

    @property
    def has_mask(self) -> bool:
        return (self.causal or self.window is not None or self.key_valid is not None
                or self.mask_mod is not None or (self.attn_mask is not None and self.attn_mask.dtype == torch.bool))

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qpos [B or 1, Tq], kpos [B or 1, Tk]) absolute positions, resolving the defaults."""
        Tq, Tk = self.q.shape[2], self.k.shape[2]
        qpos, kpos = self.q_positions, self.kv_positions
        if qpos is None:
            qpos = default_positions(Tq, Tk, self.q.device)
        if kpos is None:
            kpos = torch.arange(Tk, device=self.q.device)[None]
        return qpos, kpos


def default_positions(Tq: int, Tk: int, device) -> torch.Tensor:
    """Query positions when none are given: the queries are the last Tq of the Tk keys ([1, Tq])."""
    return torch.arange(Tk - Tq, Tk, device=device)[None]


def _positions(pos: torch.Tensor | None, B: int, T: int, name: str, device) -> torch.Tensor | None:
    if pos is None:
        return None
    if not isinstance(pos, torch.Tensor) or pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise TypeError(f"attention: {name} must be an integer tensor, got {getattr(pos, 'dtype', type(pos))}")
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() != 2 or pos.shape[1] != T or pos.shape[0] not in (1, B):
        raise ValueError(f"attention: {name} must have shape [{T}] or [{B}, {T}], got {tuple(pos.shape)}")
    return pos.to(device=device, dtype=torch.long)


def make_args(q, k, v, *, scale, causal, window, q_positions, kv_positions, key_valid, attn_mask, score_mod,
              mask_mod, alibi_slopes, dropout_p) -> AttentionArgs:
    """Check shapes, dtypes and options; raise ValueError / TypeError naming what is wrong."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D tensor [B, H, T, K], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"attention: {name} must be floating point, got {t.dtype}")
    B, H, Tq, K = q.shape
    Bk, Hkv, Tk, Kk = k.shape
    if Bk != B or Kk != K or v.shape[0] != B or v.shape[1] != Hkv or v.shape[2] != Tk:
        raise ValueError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         f"match: expected q [B, H, Tq, K], k [B, Hkv, Tk, K], v [B, Hkv, Tk, V]")
    if H % Hkv:
        raise ValueError(f"attention: query heads {H} must be a multiple of key/value heads {Hkv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise ValueError(f"attention: window={window!r} must be a positive int or None")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p={dropout_p} must be in [0, 1)")
    if key_valid is not None:
        if key_valid.dtype != torch.bool or key_valid.shape != (B, Tk):
            raise ValueError(f"attention: key_valid must be a bool tensor [{B}, {Tk}], got "
                             f"{key_valid.dtype} {tuple(key_valid.shape)}")
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]
        ok = (attn_mask.dim() == 4 and attn_mask.shape[0] in (1, B) and attn_mask.shape[1] in (1, H)
              and attn_mask.shape[2] == Tq and attn_mask.shape[3] == Tk)
        if not ok:
            raise ValueError(f"attention: attn_mask must be [B or 1, H or 1, {Tq}, {Tk}] (or [B, {Tq}, {Tk}]), "
                             f"got {tuple(attn_mask.shape)}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"attention: attn_mask must be bool (True = attend) or float (additive), "
                            f"got {attn_mask.dtype}")
    if alibi_slopes is not None and alibi_slopes.shape != (H,):
        raise ValueError(f"attention: alibi_slopes must have shape [{H}], got {tuple(alibi_slopes.shape)}")
    if scale is None:
        scale = K**-0.5
    return AttentionArgs(
        q=q, k=k, v=v, scale=float(scale), causal=bool(causal), window=window,
        q_positions=_positions(q_positions, B, Tq, "q_positions", q.device),
        kv_positions=_positions(kv_positions, B, Tk, "kv_positions", q.device),
        key_valid=key_valid, attn_mask=attn_mask, score_mod=score_mod, mask_mod=mask_mod,
        alibi_slopes=alibi_slopes, dropout_p=float(dropout_p),
    )


def block_scores(a: AttentionArgs, q: torch.Tensor, k: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Masked, modified scores (in q's dtype: fp32, or float64) [B, H, Tq, stop - start] against keys ``start:stop``.

    ``q`` [B, Hkv, G, Tq, K] and ``k`` [B, Hkv, 1, kb, K] are the fp32 operands (GQA as a broadcast
    group axis, so no key/value copies); disallowed entries are -inf.
    """
    B, H, Tq = a.q.shape[0], a.q.shape[1], a.q.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)).flatten(1, 2) * a.scale  # [B, H, Tq, kb]
    qpos, kpos = a.positions()
    qp = qpos[:, None, :, None]  # [B or 1, 1, Tq, 1]
    kp = kpos[:, start:stop][:, None, None, :]  # [B or 1, 1, 1, kb]
    dt = s.dtype
    if a.alibi_slopes is not None:
        s = s - a.alibi_slopes.to(dt)[None, :, None, None] * (qp - kp).abs().to(dt)
    if a.score_mod is not None:
        b_idx = torch.arange(B, device=s.device)[:, None, None, None]
        h_idx = torch.arange(H, device=s.device)[None, :, None, None]
        s = a.score_mod(s, b_idx, h_idx, qp, kp).to(dt)
    if a.attn_mask is not None and a.attn_mask.dtype != torch.bool:
        s = s + a.attn_mask[..., start:stop].to(dt)
    allowed = allowed_mask(a, start, stop)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s.expand(B, H, Tq, stop - start)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, fp32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H, T, K] queries as [B, Hkv, G, T, K] (a view)."""
    B, H, T, K = x.shape
    return x.view(B, H // groups, groups, T, K)


def allowed_mask(a: AttentionArgs, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
    """Boolean [B or 1, H or 1, Tq, kb] of allowed (query, key) pairs for keys ``start:stop``; None when
    every pair is allowed."""
    B, H = a.q.shape[0], a.q.shape[1]
    stop = a.k.shape[2] if stop is None else stop
    qpos, kpos = a.positions()
    qp = qpos[:, None, :, None]
    kp = kpos[:, start:stop][:, None, None, :]
    allowed = None

    def both(m: torch.Tensor) -> torch.Tensor:
        return m if allowed is None else allowed & m

    if a.causal or a.window is not None:
        allowed = both(qp >= kp)
    if a.window is not None:
        allowed = both(qp - kp < a.window)
    if a.key_valid is not None:
        allowed = both(a.key_valid[:, None, None, start:stop])
    if a.mask_mod is not None:
        b_idx = torch.arange(B, device=a.q.device)[:, None, None, None]
        h_idx = torch.arange(H, device=a.q.device)[None, :, None, None]
        allowed = both(a.mask_mod(b_idx, h_idx, qp, kp).to(torch.bool))
    if a.attn_mask is not None and a.attn_mask.dtype == torch.bool:
        allowed = both(a.attn_mask[..., start:stop])
    return allowed


def additive_bias(a: AttentionArgs) -> torch.Tensor | None:
    """fp32 (float64) [B or 1, H or 1, Tq, Tk] of the ALiBi bias plus a float ``attn_mask``; None without
    either."""
    bias, dt = None, acc_dtype(a.q)
    if a.alibi_slopes is not None:
        qpos, kpos = a.positions()
        dist = (qpos[:, None, :, None] - kpos[:, None, None, :]).abs().to(dt)
        bias = -a.alibi_slopes.to(dt)[None, :, None, None] * dist
    if a.attn_mask is not None and a.attn_mask.dtype != torch.bool:
        bias = a.attn_mask.to(dt) if bias is None else bias + a.attn_mask.to(dt)
    return bias
