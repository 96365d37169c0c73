"""Non-finite inputs under causality: the one rule every mixer follows, and the helpers that apply it.

The rule (the recurrence's own semantics, applied to the mixers whose parallel form would break it):

- A NaN or ±Inf in token t of row b **poisons** row b from t on: the outputs at positions >= t are
  NaN (non-causal mixers: the whole row), and a cache continued from it stays poisoned.
- It never changes an output before t, and never another row.
- A non-finite value at a padded position (beyond ``lengths``, or a key that a key-padding mask
  excludes) is ignored: it never reaches a valid output, and padded outputs are 0.

A sequential recurrence has this property by itself. A parallel form does not: an FFT convolution
spreads one NaN over the whole row, and a softmax-weighted sum computes ``0 * NaN = NaN`` for every
masked (future or padded) key. Those mixers replace non-finite values by 0 before the parallel op
(``zero_nonfinite``) and then set the poisoned outputs to NaN (``poison``), with no host sync, so
capture and compile keep working. The cost is one reduction and one elementwise pass over the op's
inputs.

Shapes: B batch, T time.
"""

from __future__ import annotations

import torch

__all__ = ["nonfinite_tokens", "zero_nonfinite", "poisoned_from", "poison"]


def nonfinite_tokens(*xs: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True where token t of row b holds a NaN / ±Inf in any of ``xs`` (each [B, T, ...])."""
    flag = None
    for x in xs:
        if x.dim() == 2 or x.is_complex():
            bad = ~torch.isfinite(x).reshape(x.shape[0], x.shape[1], -1).all(-1)
        else:  # one reduction over the features: min and max propagate NaN, and an infinity is one of them
            lo, hi = torch.aminmax(x if x.dim() == 3 else x.flatten(2), dim=-1)
            bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
        flag = bad if flag is None else flag | bad
    return flag


def zero_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every NaN / ±Inf replaced by 0 (one elementwise pass; zero gradient there)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def poisoned_from(bad: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
    """[B, T] bool: the outputs a non-finite token poisons: positions >= the row's first bad token
    (causal), or the whole row when it has one (non-causal)."""
    if causal:
        return bad.to(torch.int32).cumsum(1) > 0
    return bad.any(1, keepdim=True).expand_as(bad)


def poison(y: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
    """``y`` [B, T, ...] with NaN at the positions where ``poisoned`` [B, T] is True."""
    mask = poisoned.view(*poisoned.shape, *([1] * (y.dim() - 2)))
    return y.masked_fill(mask, float("nan"))
