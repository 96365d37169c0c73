"""The input checks every mixer shares: one rule per input, one message per mistake.

Each check raises ``ValueError`` (wrong shape or value) or ``TypeError`` (wrong kind or dtype) naming
the owner (the mixer or model), the input, what was given and what was expected. Checks that read
tensor values on the host are skipped while compiling or capturing a CUDA graph
(``seqblocks.cache.host_sync_unsafe``); the eager warm-up call before capture runs them.

The rules:

- ``x``: a floating-point tensor [B, T, D] with D the mixer's width.
- ``lengths``: an int32 / int64 tensor [B] (not bool) with every value in **[0, T]**: the valid prefix
  of each right-padded row. 0 is allowed (a row with nothing new in this call, e.g. while other rows
  prefill); outputs past a row's length are 0 and its cache advances by its length.
- ``integration_timesteps``: a floating-point tensor [B, T] of non-negative time intervals.
- ``position_ids``: an integer tensor [T] or [B, T].
- a cache: an instance of the mixer's cache class, allocated for batch size B.

Values are not checked for NaN / Inf (that would read the host); non-finite inputs follow the rule of
``seqblocks.layers.finite``: they poison their row from their position on, never an earlier output or
another row, and are ignored in padding.

Shapes: B batch, T time, D width.
"""

from __future__ import annotations

from typing import Any

import torch

from seqblocks.cache import Cache, host_sync_unsafe

__all__ = ["check_input", "check_lengths", "check_timesteps", "check_position_ids", "check_cache",
           "lengths_mask"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def check_input(owner: str, x: Any, d_model: int) -> None:
    """``x`` must be a floating-point [B, T, d_model] tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{owner}: x must be a floating-point tensor, got {_describe(x)}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{owner}: x must have shape [B, T, {d_model}], got {tuple(x.shape)}")


def check_lengths(owner: str, lengths: Any, B: int, T: int) -> None:
    """``lengths`` (if given) must be an int32 / int64 [B] tensor with values in [0, T]."""
    if lengths is None:
        return
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{owner}: lengths must be an int32 or int64 tensor of shape [{B}], got {_describe(lengths)}")
    if lengths.shape != (B,):
        raise ValueError(f"{owner}: lengths must have shape [B] = [{B}], got {tuple(lengths.shape)}")
    if host_sync_unsafe():
        return
    if bool(((lengths < 0) | (lengths > T)).any()):
        raise ValueError(f"{owner}: lengths must lie in [0, T] = [0, {T}], got {lengths.tolist()}")


def check_timesteps(owner: str, ts: Any, B: int, T: int) -> None:
    """``integration_timesteps`` (if given) must be a floating-point [B, T] tensor of intervals >= 0."""
    if ts is None:
        return
    if not isinstance(ts, torch.Tensor) or not ts.is_floating_point():
        raise TypeError(f"{owner}: integration_timesteps must be a floating-point tensor, got {_describe(ts)}")
    if ts.shape != (B, T):
        raise ValueError(f"{owner}: integration_timesteps must have shape [B, T] = [{B}, {T}], got "
                         f"{tuple(ts.shape)}")
    if not host_sync_unsafe() and bool((ts < 0).any()):
        raise ValueError(f"{owner}: integration_timesteps must be non-negative, got a minimum of {ts.min().item()}")


def check_position_ids(owner: str, position_ids: Any, B: int, T: int) -> None:
    """``position_ids`` (if given) must be an integer [T] or [B, T] tensor."""
    if position_ids is None:
        return
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{owner}: position_ids must be an int32 or int64 tensor, got {_describe(position_ids)}")
    if tuple(position_ids.shape) not in ((T,), (B, T), (1, T)):
        raise ValueError(f"{owner}: position_ids must have shape [T] or [B, T] = [{B}, {T}], got "
                         f"{tuple(position_ids.shape)}")


def check_cache(owner: str, cache: Any, cls: type[Cache], B: int) -> None:
    """``cache`` must be a ``cls`` allocated for batch size ``B``."""
    if not isinstance(cache, cls):
        raise TypeError(f"{owner}: cache must be a {cls.__name__} from allocate_inference_cache, got "
                        f"{type(cache).__name__}")
    if cache.batch_size != B:
        raise ValueError(f"{owner}: the cache was allocated for batch_size={cache.batch_size}, got a batch of {B}")


def lengths_mask(lengths: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
    """[B, T] bool, True at the valid positions ``t < lengths[b]``; None without lengths."""
    if lengths is None:
        return None
    return torch.arange(T, device=device)[None] < lengths.to(device)[:, None]
