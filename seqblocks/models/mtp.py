"""Multi-token prediction (MTP): DeepSeek-V3's sequential MTP modules and their loss.

Depth k (1..K) predicts the token k + 1 places ahead of each position. Its module combines the
previous depth's hidden state h_{k-1} (depth 0: the main model's final hidden) with the embedding of
the token k places ahead, the one depth k - 1 predicted::

    x_k = proj(cat(RMSNorm(h_{k-1}[i]), RMSNorm(embed(token[i + k]))))      # 2D -> D
    h_k = block_k(x_k)                                                      # one residual block
    logits_k = head(norm_k(h_k))                                            # shared head

The embedding and the LM head are the main model's (shared); each depth owns its two input norms,
the projection, the block (same kind as the model's last layer) and an output norm. Because depth k
conditions on depth k - 1, the chain keeps the causal order of the predictions, which is why we chose
the sequential form over K independent heads (see docs/architecture.md, "Multi-token prediction").

Shapes: B batch, T time, D width, V vocabulary, K depths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.blocks import Block
from seqblocks.layers.norm import RMSNorm

__all__ = ["MTPModule", "mtp_loss", "check_mtp_fields", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def check_mtp_fields(owner: str, n_predict: object, weight: object) -> None:
    """``mtp_n_predict`` must be an int >= 0 and ``mtp_lambda`` a finite float >= 0 (ValueError / TypeError)."""
    if isinstance(n_predict, bool) or not isinstance(n_predict, int):
        raise TypeError(f"{owner}.mtp_n_predict must be an int, got {type(n_predict).__name__} {n_predict!r}")
    if n_predict < 0:
        raise ValueError(f"{owner}.mtp_n_predict={n_predict!r} is invalid: expected an int >= 0 (0 disables MTP)")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise TypeError(f"{owner}.mtp_lambda must be a float, got {type(weight).__name__} {weight!r}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{owner}.mtp_lambda={weight!r} is invalid: expected a finite float >= 0")


class MTPModule(nn.Module):
    """One MTP depth: two RMSNorms, a 2D -> D projection and one residual block.

    Args:
        d_model (int): model width D.
        block (nn.Module): a ``Block`` (called ``block(x, None) -> (hidden, residual)``) or a
            ``ConfigurableBlock`` (called ``block(x) -> (out, cache)``), built by the model.
        eps (float): epsilon of the three RMSNorms. Default: 1e-5.
        device, dtype: parameter placement. Default: None.
    """

    def __init__(self, d_model: int, block: nn.Module, *, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.hidden_norm = RMSNorm(d_model, eps=eps, **factory)
        self.embed_norm = RMSNorm(d_model, eps=eps, **factory)
        self.proj = nn.Linear(2 * d_model, d_model, bias=False, **factory)
        self.block = block
        self.out_norm = RMSNorm(d_model, eps=eps, **factory)

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """h_k [B, T, D] from h_{k-1} [B, T, D] and the embeddings [B, T, D] of the tokens k ahead."""
        x = self.proj(torch.cat([self.hidden_norm(hidden), self.embed_norm(token_embeds)], dim=-1))
        if isinstance(self.block, Block):
            out, residual = self.block(x, None)
            return out if residual is None else (residual + out).to(x.dtype)
        return self.block(x, fresh_cache=False)[0]


def mtp_loss(mtp_logits: Sequence[torch.Tensor], targets: torch.Tensor, weight: float = 1.0,
             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``weight`` times the mean over depths of each depth's mean cross-entropy, in fp32.

    Args:
        mtp_logits (Sequence[Tensor]): depth k's logits [B, T - k, V] (``CausalLMOutput.mtp_logits``).
        targets (Tensor): [B, T] next-token targets of the main head (``targets[:, i]`` is the token
            after position i); depth k at position i is scored against ``targets[:, i + k]``.
        weight (float): the MTP loss weight (``mtp_lambda``). Default: 1.0.
        ignore_index (int): target value that is not scored. Default: -100.

    Returns:
        Tensor: scalar fp32 loss (0 when no depth has a scored position).

    Raises:
        ValueError: no depths, or a depth whose logits do not match ``targets``' batch and length.
    """
    if len(mtp_logits) == 0:
        raise ValueError("mtp_loss needs at least one depth of logits, got none (is mtp_n_predict 0?)")
    if targets.dim() != 2:
        raise ValueError(f"mtp_loss: targets must be [B, T], got {tuple(targets.shape)}")
    B, T = targets.shape
    losses = []
    for k, logits in enumerate(mtp_logits, start=1):
        if logits.dim() != 3 or logits.shape[0] != B or logits.shape[1] != max(T - k, 0):
            raise ValueError(f"mtp_loss: depth {k} logits must be [{B}, {max(T - k, 0)}, V] for targets "
                             f"{tuple(targets.shape)}, got {tuple(logits.shape)}")
        target = targets[:, k:]
        scored = int((target != ignore_index).sum())
        if scored == 0:
            continue
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=ignore_index,
                               reduction="sum")
        losses.append(loss / scored)
    if not losses:
        return targets.new_zeros((), dtype=torch.float32)
    return weight * torch.stack(losses).mean()
