"""Decode attention over a paged KV cache, reading the pages where they lie: ``paged_attention``.

A paged cache (``seqblocks.layers.attention.paged``) keeps row b's position p in page
``block_table[b, p // N]`` at offset ``p % N`` of a pool ``k_pages`` / ``v_pages`` [P, Hkv, N, K].
Gathering a row's pages into a contiguous [B, Hkv, S, K] tensor before SDPA costs one copy of every
key and value per layer and step; ``paged_attention`` computes the same attention without that copy.

The function, for row b of length L = ``seq_lens[b]`` and its Tq queries at positions
``L - Tq .. L - 1`` (the row's newest positions, written to the cache before the call):

    s[h, t, p] = scale * q[b, h, t] . k(b, h // G, p)          (G = H / Hkv query heads per kv head)
    s = softcap * tanh(s / softcap)                               (if softcap)
    allowed(t, p) = p <= L - Tq + t                               (causal; hence p < L)
                    and L - Tq + t - p < window                   (if window)
                    and valid_pages[block_table[b, p // N], p % N] (if valid_pages)
                    and p < max_seqlen
    out[b, h, t] = sum_p softmax_p(s over allowed p) v(b, h // G, p); 0 when no key is allowed.

Backends: ``paged_attention_reference`` (below) gathers the pages and takes an fp32 softmax, the
readable spec; ``paged_triton.py`` is a split-K ("flash-decoding") Triton kernel: one program per
(row, kv head, range of positions) holds all G * Tq queries of that kv head, walks its positions
block by block through the block table with an online fp32 softmax, and a second small kernel
combines the ranges. Its grid depends on shapes only and each row's length is read on the device,
so a decode step through it has no host sync and can be captured in a CUDA graph. ``backend="auto"``
takes the kernel for CUDA inputs (fp16 / bf16 / fp32, at most ``PAGED_MAX_QUERIES`` queries) and the
reference otherwise; ``"triton"`` also runs it on CPU under ``TRITON_INTERPRET=1``. The kernel is
forward-only: inputs that require grad take the reference, whose gradients autograd computes.

Shapes: B batch, H query heads, Hkv key/value heads, G = H / Hkv, Tq queries per row, P pages in the
pool, N page_size, S positions read (``max_seqlen``), K key width, V value width.
"""

from __future__ import annotations

import torch

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.attention._common import acc_dtype

__all__ = ["paged_attention", "paged_attention_reference", "PAGED_MAX_QUERIES", "kernel_serves", "paged_kernel_runs",
           "bytes_read"]

#: The most queries per row the Triton kernel takes (decode steps, speculative / small chunked blocks);
#: longer calls are prefill, where the gather's cost is small next to the attention itself.
PAGED_MAX_QUERIES = 16
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_WIDTH = 256  # widest key / value head the kernel keeps in registers
_MAX_ROWS = 128  # G * Tq query rows of one program


def _check(q, k_pages, v_pages, block_table, seq_lens, valid_pages, scale, window, softcap, max_seqlen) -> int:
    """Check the arguments of ``paged_attention``; return S, the positions that may be read."""
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"paged_attention: {name} must be a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"paged_attention: {name} must be floating point, got {t.dtype}")
    B, H, _, K = q.shape
    P, Hkv, N, Kk = k_pages.shape
    if v_pages.shape[:3] != k_pages.shape[:3]:
        raise ValueError(f"paged_attention: v_pages {tuple(v_pages.shape)} must share [P, Hkv, N] with k_pages "
                         f"{tuple(k_pages.shape)}")
    if Kk != K:
        raise ValueError(f"paged_attention: q's head width {K} differs from k_pages' {Kk}")
    if H % Hkv:
        raise ValueError(f"paged_attention: {H} query heads are not a multiple of {Hkv} key/value heads")
    for name, t, dims in (("block_table", block_table, 2), ("seq_lens", seq_lens, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"paged_attention: {name} must be a {dims}-D integer tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if block_table.shape[0] != B or seq_lens.shape[0] != B:
        raise ValueError(f"paged_attention: block_table {tuple(block_table.shape)} and seq_lens "
                         f"{tuple(seq_lens.shape)} must have q's batch size {B} first")
    if valid_pages is not None and (not isinstance(valid_pages, torch.Tensor) or valid_pages.dtype != torch.bool
                                    or tuple(valid_pages.shape) != (P, N)):
        raise ValueError(f"paged_attention: valid_pages must be a bool [P, N] = [{P}, {N}] tensor, got "
                         f"{getattr(valid_pages, 'dtype', type(valid_pages).__name__)} "
                         f"{tuple(getattr(valid_pages, 'shape', ()))}")
    for t in (k_pages, v_pages, block_table, seq_lens, valid_pages):
        if t is not None and t.device != q.device:
            raise ValueError(f"paged_attention: every tensor must be on q's device {q.device}, got one on {t.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0):
        raise ValueError(f"paged_attention: scale={scale!r} must be a positive number or None")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"paged_attention: window={window!r} must be a positive int or None")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, int | float) or not softcap > 0):
        raise ValueError(f"paged_attention: softcap={softcap!r} must be a positive number or None")
    capacity = block_table.shape[1] * N
    if max_seqlen is None:
        return capacity
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or not 1 <= max_seqlen <= capacity:
        raise ValueError(f"paged_attention: max_seqlen={max_seqlen!r} must be an int in [1, {capacity}] (the "
                         f"block table's {block_table.shape[1]} pages of {N})")
    return max_seqlen


def _gather(pages: torch.Tensor, cols: torch.Tensor, S: int) -> torch.Tensor:
    """Positions 0..S-1 of every row: pages [P, Hkv, N, W] through cols [B, n] -> [B, Hkv, S, W]."""
    B, n = cols.shape
    picked = pages[cols]  # [B, n, Hkv, N, W]
    return picked.transpose(1, 2).reshape(B, pages.shape[1], n * pages.shape[2], pages.shape[3])[:, :, :S]


def paged_attention_reference(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                              valid_pages: torch.Tensor | None = None, scale: float | None = None,
                              window: int | None = None, softcap: float | None = None,
                              max_seqlen: int | None = None) -> torch.Tensor:
    """The spec of ``paged_attention`` (module docstring): gather positions 0..S-1 of every row, mask,
    soft-max in fp32 (float64 for float64 queries). Arguments as ``paged_attention``; inputs are
    assumed checked. Keys and values are cast to q's dtype before the fp32 products, as the kernel
    does.

    Returns:
        Tensor: out [B, H, Tq, V] in q's dtype.
    """
    B, H, Tq, K = q.shape
    Hkv, N = k_pages.shape[1], k_pages.shape[2]
    S = block_table.shape[1] * N if max_seqlen is None else max_seqlen
    cols = block_table[:, : -(-S // N)].long()
    dt = acc_dtype(q)
    k = _gather(k_pages, cols, S).to(q.dtype).to(dt)  # [B, Hkv, S, K]
    v = _gather(v_pages, cols, S).to(q.dtype).to(dt)
    qpos = seq_lens.long()[:, None] - Tq + torch.arange(Tq, device=q.device)  # [B, Tq]
    kpos = torch.arange(S, device=q.device)
    distance = qpos[:, :, None] - kpos  # [B, Tq, S]
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    if valid_pages is not None:
        allowed = allowed & valid_pages[cols].reshape(B, -1)[:, None, :S]
    qg = q.to(dt).view(B, Hkv, H // Hkv, Tq, K)
    s = torch.einsum("bhgtk,bhsk->bhgts", qg, k) * (K**-0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed[:, None, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)  # -inf for a query with no allowed key
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0))
    out = torch.einsum("bhgts,bhsv->bhgtv", p, v)
    return out.reshape(B, H, Tq, v.shape[-1]).to(q.dtype)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def kernel_serves(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these shapes and dtypes, without gradients (else ``"auto"`` runs
    the reference)."""
    G, Tq = q.shape[1] // k_pages.shape[1], q.shape[2]
    return (all(t.dtype in _KERNEL_DTYPES for t in (q, k_pages, v_pages)) and Tq <= PAGED_MAX_QUERIES
            and G * Tq <= _MAX_ROWS and max(q.shape[3], v_pages.shape[3]) <= _MAX_WIDTH
            and not _needs_grad(q, k_pages, v_pages))


def paged_kernel_runs(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> bool:
    """Whether ``paged_attention(..., backend="auto")`` runs the Triton kernel for these inputs (CUDA, or
    a ``prefer_backend("triton")`` region under the interpreter). The attention layers read pages in
    place only then: on the CPU the gather plus SDPA's fused kernel is faster than the reference."""
    return resolve_backend("auto", q, k_pages, v_pages, op="paged_attention",
                           has_kernel=kernel_serves(q, k_pages, v_pages)) == "triton"


@outside_autocast
def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, *, valid_pages: torch.Tensor | None = None, scale: float | None = None,
                    window: int | None = None, softcap: float | None = None, max_seqlen: int | None = None,
                    num_splits: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention of each row's newest Tq queries on its keys in a paged cache (module docstring).

    Args:
        q (Tensor): [B, H, Tq, K] queries; row b's sit at positions ``seq_lens[b] - Tq + arange(Tq)``.
        k_pages (Tensor): [P, Hkv, N, K] the key pool; H must be a multiple of Hkv (GQA / MQA).
        v_pages (Tensor): [P, Hkv, N, V] the value pool.
        block_table (Tensor): [B, max_pages] integer page ids: position p of row b is in page
            ``block_table[b, p // N]``.
        seq_lens (Tensor): [B] integer, the positions row b holds (this call's included).
        valid_pages (Tensor | None): [P, N] bool, False where a written position is padding. Default:
            None (all valid).
        scale (float | None): score scale. Default: None (K ** -0.5).
        window (int | None): sliding window: a query at p sees keys in (p - window, p]. Default: None.
        softcap (float | None): ``softcap * tanh(score / softcap)`` on the scaled scores. Default: None.
        max_seqlen (int | None): only positions below it are read; a bound on ``seq_lens`` known on the
            host (e.g. the longest row), which lets the kernel spread its programs over the positions
            in use. Default: None (the block table's whole span, ``max_pages * N``).
        num_splits (int | None): ranges of positions per (row, kv head) in the kernel. Default: None
            (enough programs for about two waves on the device); the result does not depend on it.
        backend (str): "auto", "torch" (the reference) or "triton". Default: "auto".

    Returns:
        Tensor: out [B, H, Tq, V] in q's dtype (fp32 softmax and accumulation).

    Raises:
        ValueError: shapes that do not fit together, bad options, tensors on different devices, an
            unknown backend, "triton" for inputs it cannot run on (``resolve_backend``).
        TypeError: non-float q / pools, non-integer block_table / seq_lens.
    """
    S = _check(q, k_pages, v_pages, block_table, seq_lens, valid_pages, scale, window, softcap, max_seqlen)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"paged_attention: num_splits={num_splits!r} must be a positive int or None")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    if backend == "triton" and _needs_grad(q, k_pages, v_pages):
        raise ValueError("paged_attention: the Triton kernel is forward-only (decoding); inputs that require "
                         "grad take backend='torch' or 'auto' (the reference, differentiable by autograd)")
    served = kernel_serves(q, k_pages, v_pages)
    if resolve_backend(backend, q, k_pages, v_pages, op="paged_attention", has_kernel=served) == "triton":
        from seqblocks.ops.attention.paged_triton import paged_attention_triton

        return paged_attention_triton(q, k_pages, v_pages, block_table, seq_lens, valid_pages=valid_pages,
                                      scale=scale, window=window, softcap=softcap, max_seqlen=S,
                                      num_splits=num_splits)
    return paged_attention_reference(q, k_pages, v_pages, block_table, seq_lens, valid_pages=valid_pages,
                                     scale=scale, window=window, softcap=softcap, max_seqlen=S)


def bytes_read(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, seq_lens: torch.Tensor,
               window: int | None = None) -> int:
    """The fewest bytes a call must read: each row's attended keys and values once (for benchmarks)."""
    Hkv = k_pages.shape[1]
    lens = seq_lens.long().clamp(min=0)
    if window is not None:
        lens = lens.clamp(max=window + q.shape[2] - 1)
    per_position = Hkv * (k_pages.shape[3] * k_pages.element_size() + v_pages.shape[3] * v_pages.element_size())
    return int(lens.sum()) * per_position + q.numel() * q.element_size()
