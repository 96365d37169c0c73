"""``attention_fn=``: a user's own attention kernel inside the seqblocks softmax-attention layers.

A layer built with ``attention_fn=fn`` (``MHA`` / ``GQA`` / ``MQA`` / ``SlidingWindowAttention``,
``CrossAttention``, ``EncoderBlock``, ``DecoderBlock`` and the transformer models, which pass it to
their layers) keeps its projections, RoPE, caches, padding and non-finite rules, and hands the
attention itself to ``fn``, called as::

    out = fn(query, key, value, *, mask=None, score_mod=None, dropout_rate=0.0, deterministic=True)

- ``query`` [B, H, Tq, K], ``key`` [B, H, Tk, K], ``value`` [B, H, Tk, V]: key/value heads are
  repeated to the H query heads first (GQA / MQA), so a kernel sees plain multi-head attention.
- ``mask``: bool [B, H, Tq, Tk] (True = attend) holding everything the layer masks (causal, sliding
  window, key padding, a bool ``mask``, every mask mod), or None when every pair is allowed.
- ``score_mod``: ``score_mod(scores, b_idx, h_idx, q_idx, kv_idx) -> scores`` with ``scores``
  [B, H, Tq, Tk] (after the scale), b_idx [B, 1, 1, 1], h_idx [1, H, 1, 1], q_idx [1, 1, Tq, 1],
  kv_idx [1, 1, 1, Tk]: the indices into this call's tensors. The layer's score mods see absolute
  token positions (cache offset + index), so this function translates the indices before calling
  them, and adds ALiBi and a float (additive) ``mask``; None when there is nothing to add.
- ``dropout_rate`` / ``deterministic``: the layer's attention-probability dropout, to apply when
  ``deterministic`` is False (training mode; True in eval mode). PyTorch draws from its global generator, so there is no
  ``dropout_rng`` argument.
- The kernel scales scores by ``K ** -0.5`` (SDPA's and the usual kernels' default). A layer with
  another ``softmax_scale`` rescales the queries by ``softmax_scale * K ** 0.5`` first, which gives
  exactly its scale.
- ``out`` [B, H, Tq, V]. A query with no allowed key is set to 0 afterwards (seqblocks' rule), so a
  kernel may return anything finite there.

``standard_attention_fn`` is the contract written out in plain PyTorch: a template for a kernel of
one's own, and what the tests compare the layers with.

Shapes: B batch, H query heads, Hkv key/value heads, Tq queries, Tk keys, K key width, V value width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from seqblocks.ops.attention._common import allowed_mask, make_args

__all__ = ["standard_attention_fn", "call_attention_fn", "check_attention_fn"]


def standard_attention_fn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                          mask: torch.Tensor | None = None, score_mod: Callable | None = None,
                          dropout_rate: float = 0.0, deterministic: bool = True) -> torch.Tensor:
    """Softmax attention under the ``attention_fn`` contract (see the module docstring), in fp32
    (float64 for float64 inputs).

    Args:
        query (Tensor): [B, H, Tq, K].
        key (Tensor): [B, H, Tk, K].
        value (Tensor): [B, H, Tk, V].
        mask (Tensor | None): bool [B, H, Tq, Tk], True = attend. Default: None.
        score_mod (Callable | None): ``(scores, b_idx, h_idx, q_idx, kv_idx) -> scores``. Default: None.
        dropout_rate (float): attention-probability dropout when not ``deterministic``. Default: 0.0.
        deterministic (bool): no dropout. Default: True.

    Returns:
        Tensor: [B, H, Tq, V] in ``query``'s dtype; rows with no allowed key are 0.
    """
    B, H, Tq, K = query.shape
    Tk = key.shape[2]
    dt = torch.float64 if query.dtype == torch.float64 else torch.float32
    scores = torch.matmul(query.to(dt), key.to(dt).transpose(-1, -2)) * K**-0.5  # [B, H, Tq, Tk]
    if score_mod is not None:
        b_idx = torch.arange(B, device=query.device)[:, None, None, None]
        h_idx = torch.arange(H, device=query.device)[None, :, None, None]
        q_idx = torch.arange(Tq, device=query.device)[None, None, :, None]
        kv_idx = torch.arange(Tk, device=query.device)[None, None, None, :]
        scores = score_mod(scores, b_idx, h_idx, q_idx, kv_idx).to(dt)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # A row with no finite score (every key masked) gets zero weights instead of NaN.
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
    if dropout_rate > 0 and not deterministic:
        weights = torch.nn.functional.dropout(weights, dropout_rate, training=True)
    return torch.matmul(weights, value.to(dt)).to(query.dtype)  # [B, H, Tq, V]


def check_attention_fn(owner: str, attention_fn: Callable | None, attention_type: str) -> None:
    """``attention_fn`` must be None or a callable, and not combined with ``attention_type="linear"``.

    Raises:
        TypeError: not callable. ValueError: given with the linear alias.
    """
    if attention_fn is None:
        return
    if not callable(attention_fn):
        raise TypeError(f"{owner}: attention_fn must be a callable (query, key, value, *, mask, score_mod, "
                        f"dropout_rate, deterministic) -> out, got {type(attention_fn).__name__}")
    if attention_type == "linear":
        raise ValueError(f"{owner}: attention_fn replaces the softmax attention and cannot be combined with "
                         f"attention_type='linear'")


def _index(table: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[b, idx]`` for a [B or 1, T] position table (row 0 for every b when it has one row)."""
    rows = b if table.shape[0] > 1 else torch.zeros_like(b)
    return table[rows, idx]


def call_attention_fn(attention_fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      causal: bool, window: int | None, scale: float | None, q_positions: torch.Tensor | None,
                      kv_positions: torch.Tensor | None, key_valid: torch.Tensor | None,
                      attn_mask: torch.Tensor | None, score_mod: Callable | None, mask_mod: Callable | None,
                      alibi_slopes: torch.Tensor | None, dropout_p: float, deterministic: bool) -> torch.Tensor:
    """What ``ops.attention.attention`` computes, with the attention done by ``attention_fn``.

    Takes ``attention``'s arguments (q [B, H, Tq, K], k / v [B, Hkv, Tk, K / V], absolute positions,
    masks, mods) and returns out [B, H, Tq, V] in q's dtype. ``dropout_p`` is the layer's rate, passed as
    ``dropout_rate`` with ``deterministic`` (True outside training).

    Raises:
        ValueError: the kernel returned something other than a [B, H, Tq, V] tensor.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    a = make_args(q, k, v, scale=scale, causal=causal, window=window, q_positions=q_positions,
                  kv_positions=kv_positions, key_valid=key_valid, attn_mask=attn_mask, score_mod=score_mod,
                  mask_mod=mask_mod, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
    B, H, Tq, K = q.shape
    Tk, V = k.shape[2], v.shape[-1]
    allowed = allowed_mask(a)
    mask = None if allowed is None else allowed.expand(B, H, Tq, Tk)
    qpos, kpos = a.positions()
    dense = a.attn_mask if a.attn_mask is not None and a.attn_mask.dtype != torch.bool else None  # additive
    slopes, user_mod = a.alibi_slopes, a.score_mod
    kernel_mod = None
    if slopes is not None or user_mod is not None or dense is not None:
        def kernel_mod(scores, b_idx, h_idx, q_idx, kv_idx):
            qp, kp = _index(qpos, b_idx, q_idx), _index(kpos, b_idx, kv_idx)
            if slopes is not None:
                scores = scores - slopes.to(scores.dtype)[h_idx] * (qp - kp).abs().to(scores.dtype)
            if user_mod is not None:
                scores = user_mod(scores, b_idx, h_idx, qp, kp)
            if dense is not None:
                rows = b_idx if dense.shape[0] > 1 else torch.zeros_like(b_idx)
                heads = h_idx if dense.shape[1] > 1 else torch.zeros_like(h_idx)
                scores = scores + dense[rows, heads, q_idx, kv_idx].to(scores.dtype)
            return scores
    groups = H // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if a.scale != K**-0.5:
        q = q * (a.scale * K**0.5)
    out = attention_fn(q, k, v, mask=mask, score_mod=kernel_mod, dropout_rate=a.dropout_p,
                       deterministic=bool(deterministic))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, H, Tq, V):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"attention_fn {getattr(attention_fn, '__name__', attention_fn)!r} returned {got}; "
                         f"expected a tensor [B, H, Tq, V] = {[B, H, Tq, V]}")
    if mask is not None:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.to(a.q.dtype)
