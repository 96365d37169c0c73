"""Triton kernels of ``paged_attention`` (``paged.py`` has the function and its reference): split-K
("flash-decoding") attention that reads keys and values from the page pools through the block table.

``_paged_attention_kernel``: one program per (row b, kv head, split). Its BLOCK_M rows are the G * Tq
queries of that kv head (row m is head ``hk * G + m // Tq``, query ``m % Tq``), so each key block is
loaded once for all the query heads that share it (GQA / MQA). The split covers positions
``[split * SPLIT_LEN, (split + 1) * SPLIT_LEN)``; the program reads the row's length from ``seq_lens``
on the device, skips the positions past it (and before the sliding window) and walks the rest
BLOCK_N positions at a time: position p's page id comes from ``block_table[b, p // N]``, its keys and
values from offset ``p % N`` of that page (any page size; a block may span several pages). Scores
take an online softmax in fp32 (base 2). With one split the program writes the normalised output;
with several it writes its normalised partial output and log-sum-exp, and ``_combine_kernel`` (one
program per (row, head, query)) weighs the splits by their log-sum-exps.

The grid depends on shapes only and the loop bounds are device values, so a call has no host sync
and can be captured in a CUDA graph (with ``max_seqlen`` fixed).

Shapes: B batch, H query heads, Hkv key/value heads, G = H / Hkv, Tq queries, N page_size, S positions
read, K key width, V value width, NS splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops.triton_dot import dot, dot_mode

__all__ = ["paged_attention_triton"]


@triton.jit
def _tanh(x):
    # tanh through one exp of a non-positive argument (no overflow): sign(x) (1 - e) / (1 + e), e = exp(-2|x|)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit(do_not_specialize=["max_seqlen", "split_len", "num_splits", "window"])
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, valid_ptr, o_ptr, lse_ptr,
    sq_b, sq_h, sq_t, sq_k,
    sk_p, sk_h, sk_n, sk_k,
    sv_p, sv_h, sv_n, sv_v,
    sbt_b, sbt_c, sval_p, sval_n,
    H, Hkv, max_seqlen, split_len, num_splits, scale, softcap, window,
    G: tl.constexpr, TQ: tl.constexpr, PAGE: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    m = tl.arange(0, BLOCK_M)
    row_ok = m < G * TQ
    t = m % TQ
    h = hk * G + m // TQ
    kk = tl.arange(0, BLOCK_K)
    vv = tl.arange(0, BLOCK_V)

    L = tl.load(len_ptr + b).to(tl.int64)
    qpos = L - TQ + t  # [BLOCK_M] absolute query positions
    stop = tl.minimum(L, max_seqlen)
    start = split.to(tl.int64) * split_len
    stop = tl.minimum(stop, start + split_len)
    if HAS_WINDOW:  # blocks wholly before the first query's window hold nothing it may see
        lo = tl.maximum(L - TQ - window + 1, 0)
        start = tl.maximum(start, (lo // BLOCK_N) * BLOCK_N)

    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + kk[None, :] * sq_k,
                mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
    qk_scale = scale * 1.4426950408889634  # scores in base 2 (exp2 below)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    bt_row = bt_ptr + b * sbt_b
    for n0 in range(start, stop, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        inside = pos < stop
        page = tl.load(bt_row + (pos // PAGE) * sbt_c, mask=inside, other=0).to(tl.int64)
        off = pos % PAGE
        k = tl.load(k_ptr + page[:, None] * sk_p + hk * sk_h + off[:, None] * sk_n + kk[None, :] * sk_k,
                    mask=inside[:, None] & (kk[None, :] < K), other=0.0).to(q.dtype)
        s = dot(q, tl.trans(k), IEEE)  # [BLOCK_M, BLOCK_N] fp32
        if HAS_SOFTCAP:
            s = softcap * _tanh(s * (scale / softcap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        ok = inside[None, :] & (pos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            ok = ok & (qpos[:, None] - pos[None, :] < window)
        if HAS_VALID:
            written = tl.load(valid_ptr + page * sval_p + off * sval_n, mask=inside, other=0)
            ok = ok & (written != 0)[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays at 0
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vals = tl.load(v_ptr + page[:, None] * sv_p + hk * sv_h + off[:, None] * sv_n + vv[None, :] * sv_v,
                       mask=inside[:, None] & (vv[None, :] < V), other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + dot(p.to(q.dtype), vals, IEEE)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a query that saw no key: 0
    row = (b * H + h) * TQ + t  # [BLOCK_M] index of (b, h, t) in [B, H, Tq]
    store = row_ok[:, None] & (vv[None, :] < V)
    if SPLIT:
        tl.store(o_ptr + (row[:, None] * num_splits + split) * V + vv[None, :], out, mask=store)
        tl.store(lse_ptr + row * num_splits + split, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)),
                                                             float("-inf")), mask=row_ok)
    else:
        tl.store(o_ptr + row[:, None] * V + vv[None, :], out.to(o_ptr.dtype.element_ty), mask=store)


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, out_ptr, num_splits, V: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0)  # (b, h, t) flattened
    s = tl.arange(0, BLOCK_S)
    vv = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # 0 for an empty split
    total = tl.sum(w, 0)
    part = tl.load(part_ptr + (row * num_splits + s[:, None]) * V + vv[None, :],
                   mask=(s[:, None] < num_splits) & (vv[None, :] < V), other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * V + vv, out.to(out_ptr.dtype.element_ty), mask=vv < V)


def _default_splits(q: torch.Tensor, programs: int, blocks: int) -> int:
    """Splits per (row, kv head): about two waves of programs on the device, at most one per block."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2
    return max(1, min(blocks, -(-2 * sms // max(1, programs)), 64))


def paged_attention_triton(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, *, valid_pages: torch.Tensor | None, scale: float,
                           window: int | None, softcap: float | None, max_seqlen: int,
                           num_splits: int | None) -> torch.Tensor:
    """``paged_attention`` on the kernels (arguments checked and resolved by ``paged.paged_attention``)."""
    B, H, Tq, K = q.shape
    Hkv, N, V = k_pages.shape[1], k_pages.shape[2], v_pages.shape[3]
    G = H // Hkv
    BLOCK_M = max(16, triton.next_power_of_2(G * Tq))
    BLOCK_K, BLOCK_V = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
    BLOCK_N = 64 if max(BLOCK_K, BLOCK_V) <= 128 and BLOCK_M <= 64 else 32
    blocks = triton.cdiv(max_seqlen, BLOCK_N)
    ns = _default_splits(q, B * Hkv, blocks) if num_splits is None else min(num_splits, blocks)
    split_len = triton.cdiv(blocks, ns) * BLOCK_N
    ns = triton.cdiv(max_seqlen, split_len)
    out = torch.empty(B, H, Tq, V, device=q.device, dtype=q.dtype)
    if ns > 1:
        part = torch.empty(B, H, Tq, ns, V, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, H, Tq, ns, device=q.device, dtype=torch.float32)
    else:
        part, lse = out, out  # written directly; lse unused
    valid = valid_pages.view(torch.uint8) if valid_pages is not None else seq_lens
    sval = valid_pages.stride() if valid_pages is not None else (0, 0)
    _paged_attention_kernel[(B * Hkv, ns)](
        q, k_pages, v_pages, block_table, seq_lens, valid, part, lse,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(), *sval,
        H, Hkv, max_seqlen, split_len, ns, scale, softcap if softcap is not None else 1.0,
        window if window is not None else 1,
        G=G, TQ=Tq, PAGE=N, K=K, V=V, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V,
        HAS_VALID=valid_pages is not None, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        SPLIT=ns > 1, IEEE=dot_mode(q), num_warps=4,
    )
    if ns > 1:
        _combine_kernel[(B * H * Tq,)](part, lse, out, ns, V=V, BLOCK_S=max(2, triton.next_power_of_2(ns)),
                                       BLOCK_V=BLOCK_V, num_warps=1 if BLOCK_V <= 64 else 2)
    return out
