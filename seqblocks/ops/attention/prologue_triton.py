"""Triton kernel of ``rope_nonfinite_qkv`` (``prologue.py`` has the function and its reference).

``_prologue_kernel``: one program per (token, part). Part 0 is the token's query heads, part 1 its key
and value heads. A program loads the token's heads of its tensor(s) as [heads, pairs] tiles (the two
members of each rotated pair, then the channels past ``rotary_dim``), rotates in fp32 with the token's
cos / sin, rounds to the output dtype, replaces non-finite values by 0, writes them, and writes one flag
for the token: whether any value it tested was non-finite. A decode step's prologue is then one launch
instead of about 40 elementwise kernels.

Shapes: B batch, T time, H heads of the tensor, K width, R rotary width, R2 = R / 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rope_nonfinite_qkv_triton"]


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _rows(X, XO, COS, SIN, b, t, T, NH, sxb, sxt, sxh, scb, sct,
          W: tl.constexpr, R: tl.constexpr, ROTATE: tl.constexpr, INTERLEAVED: tl.constexpr,
          BLOCK_H: tl.constexpr, BLOCK_R2: tl.constexpr, BLOCK_REST: tl.constexpr):
    # Rotate (or copy), zero non-finite values and write one token's NH heads; return how many were bad.
    h = tl.arange(0, BLOCK_H)
    hm = h < NH
    src = X + b * sxb + t * sxt + h[:, None] * sxh
    dst = XO + (b * T + t) * NH * W + h[:, None] * W
    out_ty = XO.dtype.element_ty
    nbad = 0
    if ROTATE:
        j = tl.arange(0, BLOCK_R2)
        jm = j < R // 2
        if INTERLEAVED:
            c1 = 2 * j
            c2 = 2 * j + 1
        else:
            c1 = j
            c2 = j + R // 2
        m = hm[:, None] & jm[None, :]
        x1 = tl.load(src + c1[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + c2[None, :], mask=m, other=0.0).to(tl.float32)
        c = tl.load(COS + b * scb + t * sct + j, mask=jm, other=0.0)[None, :]
        s = tl.load(SIN + b * scb + t * sct + j, mask=jm, other=0.0)[None, :]
        o1 = (x1 * c - x2 * s).to(out_ty)
        o2 = (x2 * c + x1 * s).to(out_ty)
        f1 = _finite(o1.to(tl.float32))
        f2 = _finite(o2.to(tl.float32))
        tl.store(dst + c1[None, :], tl.where(f1, o1, 0.0).to(out_ty), mask=m)
        tl.store(dst + c2[None, :], tl.where(f2, o2, 0.0).to(out_ty), mask=m)
        nbad += tl.sum(tl.sum((m & ~(f1 & f2)).to(tl.int32), axis=1), axis=0)
    if R < W:
        r = R + tl.arange(0, BLOCK_REST)
        m = hm[:, None] & (r < W)[None, :]
        x = tl.load(src + r[None, :], mask=m, other=0.0)
        f = _finite(x.to(tl.float32))
        tl.store(dst + r[None, :], tl.where(f, x, 0.0).to(out_ty), mask=m)
        nbad += tl.sum(tl.sum((m & ~f).to(tl.int32), axis=1), axis=0)
    return nbad


@triton.jit
def _prologue_kernel(Q, K, V, QO, KO, VO, COS, SIN, BADQ, BADKV, T, H, HKV,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, scb, sct,
                     KW: tl.constexpr, VW: tl.constexpr, R: tl.constexpr, ROTATE: tl.constexpr,
                     INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr,
                     BLOCK_R2: tl.constexpr, BLOCK_KREST: tl.constexpr, BLOCK_V: tl.constexpr):
    n = tl.program_id(0)
    part = tl.program_id(1)
    b = (n // T).to(tl.int64)
    t = (n % T).to(tl.int64)
    if part == 0:
        nbad = _rows(Q, QO, COS, SIN, b, t, T, H, sqb, sqt, sqh, scb, sct, KW, R, ROTATE, INTERLEAVED,
                     BLOCK_H, BLOCK_R2, BLOCK_KREST)
        tl.store(BADQ + n, (nbad > 0).to(tl.int8))
    else:
        nbad = _rows(K, KO, COS, SIN, b, t, T, HKV, skb, skt, skh, scb, sct, KW, R, ROTATE, INTERLEAVED,
                     BLOCK_HKV, BLOCK_R2, BLOCK_KREST)
        nbad += _rows(V, VO, COS, SIN, b, t, T, HKV, svb, svt, svh, scb, sct, VW, 0, False, False,
                      BLOCK_HKV, 1, BLOCK_V)
        tl.store(BADKV + n, (nbad > 0).to(tl.int8))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_nonfinite_qkv_triton(q, k, v, cos, sin, rotary_dim, interleaved):
    """``rope_nonfinite_qkv`` on its Triton kernel (arguments checked by the caller)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, T, H, KW = q.shape
    HKV, VW = k.shape[2], v.shape[3]
    qo, ko, vo = torch.empty(q.shape, dtype=q.dtype, device=q.device), \
        torch.empty(k.shape, dtype=k.dtype, device=k.device), torch.empty(v.shape, dtype=v.dtype, device=v.device)
    bad_q = torch.empty(B, T, dtype=torch.int8, device=q.device)
    bad_kv = torch.empty(B, T, dtype=torch.int8, device=q.device)
    rotate = cos is not None
    R = rotary_dim if rotate else 0
    if rotate:
        cos, sin = cos.contiguous(), sin.contiguous()
        scb, sct = (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)
    else:
        cos = sin = q  # never read
        scb = sct = 0
    _prologue_kernel[(B * T, 2)](
        q, k, v, qo, ko, vo, cos, sin, bad_q, bad_kv, T, H, HKV,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), scb, sct,
        KW=KW, VW=VW, R=R, ROTATE=rotate, INTERLEAVED=interleaved,
        BLOCK_H=triton.next_power_of_2(H), BLOCK_HKV=triton.next_power_of_2(HKV),
        BLOCK_R2=max(triton.next_power_of_2(max(R // 2, 1)), 1),
        BLOCK_KREST=triton.next_power_of_2(max(KW - R, 1)), BLOCK_V=triton.next_power_of_2(VW),
        num_warps=4,
    )
    return qo, ko, vo, bad_q.view(torch.bool), bad_kv.view(torch.bool)
