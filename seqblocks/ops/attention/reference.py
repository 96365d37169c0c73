"""The ``standard`` backend: attention computed the way it is defined, the spec the others are tested against.

Scores for all query/key pairs are materialised in fp32, masked, soft-maxed and applied to the values
(see ``_common`` for the exact rules). Memory is O(Tq * Tk) per head; the fast backends avoid that.

Shapes: B batch, H query heads, Hkv key/value heads, G = H / Hkv, Tq queries, Tk keys, K key width,
V value width.
"""

from __future__ import annotations

import torch

from seqblocks.ops.attention._common import AttentionArgs, acc_dtype, block_scores, grouped

__all__ = ["attention_standard"]


def attention_standard(a: AttentionArgs, *, training_dropout: bool = True,
                       return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in fp32 (float64 for float64 inputs).

    Returns out [B, H, Tq, V] in q's dtype (and, with ``return_lse``, lse [B, H, Tq]).

    A query row with no allowed key gets output 0 and lse -inf. Dropout (``a.dropout_p``) zeroes
    attention probabilities and rescales the rest by 1 / (1 - p).
    """
    B, H, Tq, _ = a.q.shape
    Hkv, Tk, V = a.k.shape[1], a.k.shape[2], a.v.shape[-1]
    dt = acc_dtype(a.q)
    q = grouped(a.q.to(dt), a.groups)  # [B, Hkv, G, Tq, K]
    k = a.k.to(dt)[:, :, None]  # [B, Hkv, 1, Tk, K]
    s = block_scores(a, q, k, 0, Tk)  # [B, H, Tq, Tk]
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Tq]; -inf for empty rows
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    if a.dropout_p > 0 and training_dropout:
        p = torch.nn.functional.dropout(p, a.dropout_p, training=True)
    p = p.view(B, Hkv, H // Hkv, Tq, Tk)
    out = torch.matmul(p, a.v.to(dt)[:, :, None]).reshape(B, H, Tq, V).to(a.q.dtype)
    return (out, lse) if return_lse else out
