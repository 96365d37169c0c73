"""The input checks every mixer shares: one rule per input, one message per mistake.

Each check raises ``ValueError`` (wrong shape or value) or ``TypeError`` (wrong kind or dtype) naming
the owner (the mixer or model), the input, what was given and what was expected. Checks that read
tensor values on the host are skipped while compiling or capturing a CUDA graph
(``seqblocks.cache.host_sync_unsafe``); the eager warm-up call before capture runs them.

The rules:

- ``x``: a floating-point tensor [B, T, D] with D the mixer's width, on the module's device.
- **Empty inputs**: B = 0 or T = 0 is valid for every mixer and gives the correct empty result,
  ``y`` = zeros of ``x``'s shape and dtype, with a given cache left untouched (no state change, no
  advance). Every check still runs first, so a wrong width, dtype or cache is refused even when empty
  (``is_empty``). A model's ``input_ids`` must be non-empty (there are no logits to return or sample).
- **Mixed dtypes**: any floating-point ``x`` is accepted. Outside autocast, a mixer whose parameters
  are in another dtype converts ``x`` to its own dtype on entry and returns ``y`` in ``x``'s dtype
  (``to_module_dtype``): a bf16 input to an fp32 mixer computes in fp32 and returns bf16, exactly as the
  LTI mixers always did. Inside an autocast region the input is left alone and autocast decides the
  precision of each op, as the Precision section of docs/architecture.md describes.
- ``lengths``: an int32 / int64 tensor [B] (not bool) with every value in **[0, T]**: the valid prefix
  of each right-padded row. 0 is allowed (a row with nothing new in this call, e.g. while other rows
  prefill); outputs past a row's length are 0 and its cache advances by its length.
- ``integration_timesteps``: a floating-point tensor [B, T] of non-negative time intervals.
- ``position_ids``: an integer tensor [T] or [B, T].
- a cache: an instance of the mixer's cache class, allocated for batch size B (every state tensor
  has B rows) on the input's device. ``check_allocation``: ``batch_size`` and ``max_seqlen`` positive
  ints and the cache ``dtype`` None or floating point (an integer cache would truncate states).
- constructor values: ``check_positive`` (sizes: ints > 0, never bool), ``check_finite`` (real numbers,
  not NaN / inf), ``check_range`` (a finite number inside given bounds).

Values are not checked for NaN / Inf (that would read the host); non-finite inputs follow the rule of
``seqblocks.layers.finite``: they poison their row from their position on, never an earlier output or
another row, and are ignored in padding.

Shapes: B batch, T time, D width.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from seqblocks.cache import Cache, host_sync_unsafe

__all__ = ["check_call", "check_input", "is_empty", "to_module_dtype", "check_lengths", "check_timesteps",
           "check_position_ids", "check_cache", "check_allocation", "check_positive", "check_finite", "check_range",
           "lengths_mask"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def check_input(owner: str, x: Any, d_model: int, *, device: torch.device | None = None) -> None:
    """``x`` must be a floating-point [B, T, d_model] tensor (on ``device`` when given)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{owner}: x must be a floating-point tensor, got {_describe(x)}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{owner}: x must have shape [B, T, {d_model}], got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{owner}: x is on {x.device} but the module is on {device}; move one of them")


def is_empty(x: torch.Tensor) -> bool:
    """B = 0 or T = 0: the mixer returns ``x.new_zeros(x.shape)`` after its checks (the empty rule)."""
    return x.shape[0] == 0 or x.shape[1] == 0


def to_module_dtype(x: torch.Tensor, module_dtype: torch.dtype) -> torch.Tensor:
    """The mixed-dtype rule (module docstring): ``x`` in the module's dtype, except inside autocast.

    The caller returns its output in the original ``x.dtype``."""
    if x.dtype == module_dtype or not module_dtype.is_floating_point or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(module_dtype)


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


def check_cache(owner: str, cache: Any, cls: type[Cache], B: int, device: torch.device | None = None) -> None:
    """``cache`` must be a ``cls`` allocated for batch size ``B`` (every state tensor with B rows), on
    ``device`` when given."""
    if not isinstance(cache, cls):
        raise TypeError(f"{owner}: cache must be a {cls.__name__} from allocate_inference_cache, got "
                        f"{type(cache).__name__}")
    if not isinstance(cache.seqlen_offset, torch.Tensor) or cache.seqlen_offset.dim() != 1:
        raise TypeError(f"{owner}: cache.seqlen_offset must be a [B] tensor, got {_describe(cache.seqlen_offset)}")
    if cache.batch_size != B:
        raise ValueError(f"{owner}: the cache was allocated for batch_size={cache.batch_size}, got a batch of {B}")
    pooled = getattr(cache, "pooled", ())  # a paged cache's page pools are not per row
    for name, t in cache.tensors():
        if t.dim() > 0 and t.shape[0] != B and name not in pooled:
            raise ValueError(f"{owner}: cache.{name} has {t.shape[0]} rows, expected the batch size {B}")
        if device is not None and t.device != device:
            raise ValueError(f"{owner}: cache.{name} is on {t.device} but the input is on {device}")


def check_allocation(owner: str, batch_size: Any, max_seqlen: Any, dtype: Any = None) -> None:
    """``allocate_inference_cache``'s arguments: positive int sizes, a floating-point (or None) dtype."""
    check_positive(owner, batch_size=batch_size, max_seqlen=max_seqlen)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{owner}: the cache dtype must be a floating-point torch.dtype or None, got {dtype!r} "
                        f"(an integer cache would truncate the states)")


def check_positive(owner: str, **values: Any) -> None:
    """Each value (a size) must be an int > 0; ``bool`` is refused."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{owner}: {name} must be a positive int, got {type(value).__name__} {value!r}")
        if value <= 0:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_finite(owner: str, **values: Any) -> None:
    """Each value must be a finite real number (int or float, not bool, NaN or inf)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{owner}: {name} must be finite, got {value!r}")


def check_range(owner: str, name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, lo_name: str | None = None) -> None:
    """``value`` must be a finite number in the interval from ``lo`` to ``hi`` (open ends as flagged;
    None: unbounded on that side). ``lo_name`` names a lower bound that is another argument."""
    check_finite(owner, **{name: value})
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        if lo is None:
            left = "(-inf"
        else:
            left = ("(" if lo_open else "[") + (f"{lo:g}" if lo_name is None else f"{lo_name}={lo:g}")
        right = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        raise ValueError(f"{owner}: {name} must lie in {left}, {right}, got {value!r}")


def lengths_mask(lengths: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
    """[B, T] bool, True at the valid positions ``t < lengths[b]``; None without lengths."""
    if lengths is None:
        return None
    return torch.arange(T, device=device)[None] < lengths.to(device)[:, None]


def check_call(owner: str, x: Any, d_model: int, weight: torch.Tensor, lengths: Any, cache: Any,
               cache_cls: type[Cache]) -> tuple[torch.Tensor, torch.dtype]:
    """The entry of a recurrent mixer's forward, in one place: ``x`` checked against the width and the
    parameters' device, cast by the mixed-dtype rule (``to_module_dtype``), ``lengths`` and the cache
    checked. Returns (x in the module's dtype, the caller's dtype to return ``y`` in)."""
    check_input(owner, x, d_model, device=weight.device)
    in_dtype, x = x.dtype, to_module_dtype(x, weight.dtype)
    check_lengths(owner, lengths, x.shape[0], x.shape[1])
    if cache is not None:
        check_cache(owner, cache, cache_cls, x.shape[0], x.device)
    return x, in_dtype
