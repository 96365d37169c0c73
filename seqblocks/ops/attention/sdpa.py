"""The ``flash`` backend: PyTorch's ``scaled_dot_product_attention`` (flash / cuDNN / memory-efficient
CUDA kernels on GPU, a fused CPU kernel elsewhere).

A plain causal request with aligned positions goes to SDPA as ``is_causal=True`` with no mask tensor,
so the flash kernel runs; GQA uses SDPA's ``enable_gqa`` (no key/value copies). Anything else (a window,
offsets, key padding, a ``mask_mod``, ALiBi, a user mask) is materialised as one [B or 1, H or 1, Tq, Tk]
mask, which SDPA serves with its masked kernels. A general ``score_mod`` cannot be expressed as a mask
and raises ``ValueError``; ``flex`` serves it.

On CUDA, calls with a mask tensor or with Tq != Tk (decode steps, continuations, cross-attention) keep
SDPA off its cuDNN kernel: cuDNN builds an execution plan for every new shape, and a decode step's key
length changes every token. Measured on an H100 (torch 2.11, ``benchmarks/sdpa_decode_shapes.py``): a
masked [1, 4, 1, 64] query against 100..163 keys took 65 ms per call through cuDNN and 0.1-0.2 ms through
the flash / memory-efficient kernels.

Shapes: B batch, H query heads, Hkv key/value heads, Tq queries, Tk keys, K key width, V value width.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqblocks.ops.attention._common import AttentionArgs, additive_bias, allowed_mask

__all__ = ["attention_flash"]

_SHAPE_STABLE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _kernels(a: AttentionArgs, masked: bool):
    """The SDPA kernels allowed for this call (see the module docstring for why cuDNN is left out)."""
    if a.q.is_cuda and (masked or a.q.shape[2] != a.k.shape[2]):
        return sdpa_kernel(_SHAPE_STABLE_BACKENDS)
    return contextlib.nullcontext()


def attention_flash(a: AttentionArgs, *, training_dropout: bool = True) -> torch.Tensor:
    """Softmax attention through SDPA; out [B, H, Tq, V] in q's dtype, equal to ``attention_standard``."""
    if a.score_mod is not None:
        raise ValueError("attention backend 'flash' (SDPA) cannot apply a score_mod; use 'flex', 'standard' "
                         "or 'memory_efficient' (or 'auto', which routes score_mods to them)")
    Tq, Tk = a.q.shape[2], a.k.shape[2]
    dropout_p = a.dropout_p if training_dropout else 0.0
    gqa = a.q.shape[1] != a.k.shape[1]
    plain_causal = (a.causal and a.window is None and a.key_valid is None and a.mask_mod is None
                    and a.attn_mask is None and a.alibi_slopes is None and a.default_positions and Tq == Tk)
    if plain_causal or not (a.has_mask or a.alibi_slopes is not None or a.attn_mask is not None):
        with _kernels(a, masked=False):
            return F.scaled_dot_product_attention(a.q, a.k, a.v, dropout_p=dropout_p, is_causal=plain_causal,
                                                  scale=a.scale, enable_gqa=gqa)
    allowed = allowed_mask(a)
    empty = None
    if allowed is not None:
        # A query with no allowed key is defined as 0. SDPA would give NaN there (forward and backward),
        # so such rows attend everywhere inside the kernel and are zeroed after it.
        empty = ~allowed.any(dim=-1, keepdim=True)
        allowed = allowed | empty
    bias = additive_bias(a)
    if bias is None:
        mask = allowed
    else:
        # SDPA wants a float mask in the query dtype; disallowed pairs become -inf in it.
        mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
        mask = mask.to(a.q.dtype)
    with _kernels(a, masked=True):
        out = F.scaled_dot_product_attention(a.q, a.k, a.v, attn_mask=mask, dropout_p=dropout_p, scale=a.scale,
                                             enable_gqa=gqa)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out
