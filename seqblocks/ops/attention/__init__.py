"""Scaled dot-product attention with one contract and several backends, and kernelized linear attention.

``attention(q, k, v, ...)`` computes softmax attention with causal / sliding-window / key-padding masks,
ALiBi, FlexAttention-style ``score_mod`` / ``mask_mod`` (called with ABSOLUTE positions) and dropout.
Backends (``attention_type`` names):

- ``standard``: materialised fp32 scores; the spec (``reference.py``).
- ``memory_efficient``: blockwise online softmax in PyTorch, O(Tq * block) memory forward and backward.
- ``flash``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN kernels on GPU).
- ``flex``: ``torch.nn.attention.flex_attention`` (compiled on GPU, eager on CPU).
- ``auto``: on CUDA, ``flex`` when a ``score_mod``, ``mask_mod`` or window is given (block-sparse, no
  dense mask; with dropout, which flex lacks: ``memory_efficient`` for a score_mod, else ``flash``), and
  ``flash`` otherwise; a masked call of at most ``SHORT_QUERY`` queries (a decode step, a speculative
  block) without a score_mod takes ``flash`` with a dense mask too: its mask is one row per query, block
  sparsity saves nothing, and it stays capturable in a CUDA graph (flex's eager fallback is not); on
  CPU, ``standard`` with a ``score_mod`` and ``flash`` otherwise. Every backend computes the same
  function (tested), so the rule changes speed, never results.

``paged_attention`` (``paged.py``) is decode attention over a paged KV cache, reading keys and values
through the block table where they lie (a split-K Triton kernel on CUDA, ``paged_triton.py``; the
gather-and-softmax reference elsewhere); the attention layers take it for decode-shaped calls on paged
caches.

``linear_attention`` is a different function (a kernel feature map instead of the softmax); it has its
own backends, ``torch`` (chunked) and ``reference`` (the token loop).

Shapes: B batch, H query heads, Hkv key/value heads (H a multiple of Hkv), Tq queries, Tk keys, T time,
K key width, V value width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.attention._common import AttentionArgs, make_args
from seqblocks.ops.attention.flex import attention_flex, flex_available
from seqblocks.ops.attention.linear import (
    FEATURE_MAPS,
    feature_map,
    linear_attention_chunked,
    linear_attention_recurrent,
)
from seqblocks.ops.attention.memory_efficient import attention_memory_efficient
from seqblocks.ops.attention.paged import paged_attention, paged_attention_reference
from seqblocks.ops.attention.reference import attention_standard
from seqblocks.ops.attention.sdpa import attention_flash

__all__ = ["ATTENTION_BACKENDS", "attention", "resolve_attention_backend", "linear_attention",
           "linear_attention_recurrent", "linear_attention_chunked", "feature_map", "FEATURE_MAPS",
           "attention_standard", "flex_available", "AttentionArgs", "paged_attention", "paged_attention_reference"]

ATTENTION_BACKENDS = ("auto", "standard", "memory_efficient", "flash", "flex")
SHORT_QUERY = 16


def resolve_attention_backend(backend: str, *, device: torch.device, score_mod: bool, dropout: bool,
                              sparse_mask: bool = False, num_queries: int | None = None) -> str:
    """The backend ``attention`` runs for ``backend`` (see the module docstring for the ``auto`` rule).

    Raises:
        ValueError: unknown backend name (the message lists the valid ones).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS} "
                         f"(or 'linear' for kernelized linear attention in the layers)")
    if backend != "auto":
        return backend
    short = num_queries is not None and num_queries <= SHORT_QUERY
    if device.type == "cuda" and flex_available() and (score_mod or (sparse_mask and not short)):
        if not dropout:
            return "flex"
        return "memory_efficient" if score_mod else "flash"
    return "standard" if score_mod else "flash"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
    mask_mod: Callable[..., torch.Tensor] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    block_size: int = 128,
) -> torch.Tensor:
    """Softmax attention: out [B, H, Tq, V] in q's dtype.

    Args:
        q (Tensor): [B, H, Tq, K] queries.
        k (Tensor): [B, Hkv, Tk, K] keys; H must be a multiple of Hkv (GQA / MQA, served without copies).
        v (Tensor): [B, Hkv, Tk, V] values.
        causal (bool): a query attends to keys at positions <= its own. Default: False.
        window (int | None): sliding window: a query at position p sees keys in (p - window, p]
            (implies causal). Default: None.
        scale (float | None): score scale. Default: None (K ** -0.5).
        q_positions (Tensor | None): [Tq] or [B, Tq] absolute query positions. Default: None (the
            queries are the last Tq of the keys: Tk - Tq + arange(Tq)).
        kv_positions (Tensor | None): [Tk] or [B, Tk] absolute key positions. Default: None (arange(Tk)).
        key_valid (Tensor | None): [B, Tk] bool, False for padding keys. Default: None.
        attn_mask (Tensor | None): [B or 1, H or 1, Tq, Tk] (or [B, Tq, Tk]): bool (True = attend) or
            float (added to the scores after ``score_mod``). Default: None.
        score_mod (Callable | None): ``score_mod(score, b, h, q_pos, kv_pos) -> score`` with absolute
            positions (FlexAttention's signature). Default: None.
        mask_mod (Callable | None): ``mask_mod(b, h, q_pos, kv_pos) -> bool`` (True = attend). Default: None.
        alibi_slopes (Tensor | None): [H] ALiBi slopes: score -= slope_h * |q_pos - kv_pos|. Default: None.
        dropout_p (float): dropout on the attention probabilities (pass 0 in eval). Default: 0.0.
        backend (str): "auto", "standard", "memory_efficient", "flash" or "flex". Default: "auto".
        block_size (int): key block of ``memory_efficient``. Default: 128.

    A query with no allowed key outputs 0. Inside an autocast region, q, k and v are first cast to the
    region's dtype, as autocast does for SDPA: a layer may then mix projections (bf16 there) with
    cached or rotated parts (the cache's dtype).

    Raises:
        ValueError: bad shapes or options; a backend that cannot serve the request (``flash`` with a
            ``score_mod``; ``flex`` with dropout, or training on CPU).
        TypeError: non-float inputs or mismatched dtypes (outside autocast).
    """
    device_type = q.device.type if isinstance(q, torch.Tensor) else None
    if device_type is not None and torch.is_autocast_enabled(device_type) and all(
            isinstance(t, torch.Tensor) and t.is_floating_point() for t in (q, k, v)):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    a = make_args(q, k, v, scale=scale, causal=causal, window=window, q_positions=q_positions,
                  kv_positions=kv_positions, key_valid=key_valid, attn_mask=attn_mask, score_mod=score_mod,
                  mask_mod=mask_mod, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
    name = resolve_attention_backend(backend, device=q.device, score_mod=score_mod is not None,
                                     dropout=a.dropout_p > 0, sparse_mask=mask_mod is not None or window is not None,
                                     num_queries=q.shape[-2])
    if name == "flash":
        return attention_flash(a)
    if name == "flex":
        return attention_flex(a)
    if name == "memory_efficient":
        return attention_memory_efficient(a, block_size=block_size)
    return attention_standard(a)


@outside_autocast
def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    chunk_size: int = 64,
    feature: str = "elu",
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Kernelized linear attention (see ``linear.py``).

    Args:
        q (Tensor): [B, H, T, K]. k (Tensor): [B, Hkv, T, K]. v (Tensor): [B, Hkv, T, V].
        causal (bool): causal (recurrent) form; otherwise every query sees every key. Default: True.
        chunk_size (int): tokens per chunk of the parallel form. Default: 64.
        feature (str): feature map, "elu" (elu + 1), "relu" or "identity". Default: "elu".
        normalize (bool): divide by phi(q) . z (Katharopoulos); False gives the unnormalised form.
            Default: True.
        eps (float): added to the normaliser. Default: 1e-6.
        initial_state (tuple | None): (S [B, Hkv, K, V], z [B, Hkv, K]) to continue from. Default: None.
        key_valid (Tensor | None): [B, T] bool; False keys never enter the state. Default: None.
        backend (str): "auto" / "torch" (chunked form) or "reference" (token loop). Default: "auto".

    Returns:
        (out [B, H, T, V] in q's dtype, (S, z) fp32 final state).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"linear_attention: expected q [B, H, T, K], k [B, Hkv, T, K], v [B, Hkv, T, V] with "
                         f"Hkv dividing H; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if feature not in FEATURE_MAPS:
        raise ValueError(f"linear_attention: unknown feature {feature!r}; expected one of {FEATURE_MAPS}")
    if key_valid is not None and (key_valid.dtype != torch.bool or key_valid.shape != q.shape[:1] + q.shape[2:3]):
        raise ValueError(f"linear_attention: key_valid must be bool [B, T], got {key_valid.dtype} "
                         f"{tuple(key_valid.shape)}")
    kwargs = dict(causal=causal, feature=feature, normalize=normalize, eps=eps, initial_state=initial_state,
                  key_valid=key_valid)
    if backend == "reference":
        return linear_attention_recurrent(q, k, v, **kwargs)
    resolve_backend(backend, q, k, v, op="linear_attention", has_kernel=False)
    return linear_attention_chunked(q, k, v, chunk_size=chunk_size, **kwargs)
