"""Checks of the mixer contract, shared by the test suite and usable by anyone writing a mixer.

Each check runs a mixer several ways and raises ``AssertionError`` with the mismatch when they
disagree. Run them in eval mode (dropout off) and, for tight tolerances, in float64.

Shapes: B batch, T time, D width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["assert_close", "check_prefill_then_steps", "check_chunked_prefill", "check_causality",
           "check_lengths"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 msg: str = "") -> None:
    """``torch.testing.assert_close`` in fp32 / complex64 (or float64 when both are) with explicit
    tolerances and an optional message prefix."""
    if actual.dtype != expected.dtype or actual.dtype not in (torch.float64, torch.complex128):
        complex_ = actual.is_complex() or expected.is_complex()
        dtype = torch.complex64 if complex_ else torch.float32
        actual, expected = actual.to(dtype), expected.to(dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)


def _run(mixer: nn.Module, x: torch.Tensor, cache: Any = None, **kwargs: Any) -> torch.Tensor:
    from seqblocks.layers.adapters import call_any_mixer

    return call_any_mixer(mixer, x, cache, kwargs)


def check_prefill_then_steps(mixer: nn.Module, x: torch.Tensor, *, prefill: int, atol: float,
                             rtol: float = 0.0, **kwargs: Any) -> None:
    """Full forward == prefill of ``x[:, :prefill]`` then one ``step`` per remaining token.

    ``kwargs`` holding [B, T, ...] tensors (e.g. ``integration_timesteps``) are sliced alongside x.
    """
    B, T, _ = x.shape
    full = _run(mixer, x, **kwargs)
    cache = mixer.allocate_inference_cache(B, T, dtype=x.dtype)
    outs = []
    if prefill > 0:
        outs.append(_run(mixer, x[:, :prefill], cache, **_slice(kwargs, 0, prefill, T)))
    for t in range(prefill, T):
        outs.append(_run(mixer, x[:, t : t + 1], cache, **_slice(kwargs, t, t + 1, T)))
    assert_close(torch.cat(outs, dim=1), full, atol=atol, rtol=rtol,
                 msg=f"{type(mixer).__name__}: prefill({prefill}) + steps != full forward")
    expected = torch.full((B,), T, dtype=torch.long, device=x.device)
    if not torch.equal(cache.seqlen_offset.cpu(), expected.cpu()):
        raise AssertionError(f"{type(mixer).__name__}: seqlen_offset {cache.seqlen_offset.tolist()} != {T}")


def check_chunked_prefill(mixer: nn.Module, x: torch.Tensor, *, split: int, atol: float, rtol: float = 0.0,
                          **kwargs: Any) -> None:
    """Full forward == prefill of ``x[:, :split]`` then one cached call on ``x[:, split:]``."""
    B, T, _ = x.shape
    full = _run(mixer, x, **kwargs)
    cache = mixer.allocate_inference_cache(B, T, dtype=x.dtype)
    a = _run(mixer, x[:, :split], cache, **_slice(kwargs, 0, split, T))
    b = _run(mixer, x[:, split:], cache, **_slice(kwargs, split, T, T))
    assert_close(torch.cat((a, b), dim=1), full, atol=atol, rtol=rtol,
                 msg=f"{type(mixer).__name__}: prefill + continuation at {split} != full forward")


def check_causality(mixer: nn.Module, x: torch.Tensor, *, t: int, atol: float = 0.0, **kwargs: Any) -> None:
    """Changing inputs after position ``t`` leaves outputs at positions <= t unchanged."""
    y = _run(mixer, x, **kwargs)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
    y2 = _run(mixer, x2, **kwargs)
    assert_close(y2[:, : t + 1], y[:, : t + 1], atol=atol,
                 msg=f"{type(mixer).__name__}: outputs up to {t} changed with later inputs")
    if x.shape[1] > t + 1 and torch.equal(y2[:, t + 1 :], y[:, t + 1 :]):
        raise AssertionError(f"{type(mixer).__name__}: later outputs ignore their inputs")


def check_lengths(mixer: nn.Module, x: torch.Tensor, lengths: torch.Tensor, *, atol: float,
                  rtol: float = 0.0) -> None:
    """A padded batch with ``lengths`` == each sequence run alone, on its valid positions, and the
    cache left by a prefill with ``lengths`` continues each sequence correctly."""
    B, T, _ = x.shape
    y = _run(mixer, x, lengths=lengths)
    for b in range(B):
        n = int(lengths[b])
        alone = _run(mixer, x[b : b + 1, :n])
        assert_close(y[b : b + 1, :n], alone, atol=atol, rtol=rtol,
                     msg=f"{type(mixer).__name__}: sequence {b} (length {n}) differs from its run alone")
    # The cache after a padded prefill holds each sequence's own state: one more token per sequence
    # must give what the sequence alone gives at position n.
    nxt = torch.randn_like(x[:, :1])
    cache = mixer.allocate_inference_cache(B, T + 1, dtype=x.dtype)
    _run(mixer, x, cache, lengths=lengths)
    stepped = _run(mixer, nxt, cache)
    for b in range(B):
        n = int(lengths[b])
        alone = _run(mixer, torch.cat((x[b : b + 1, :n], nxt[b : b + 1]), dim=1))[:, -1:]
        assert_close(stepped[b : b + 1], alone, atol=atol, rtol=rtol,
                     msg=f"{type(mixer).__name__}: step after a padded prefill differs for sequence {b}")


def _slice(kwargs: dict[str, Any], start: int, stop: int, T: int) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == T:
            out[k] = v[:, start:stop]
        else:
            out[k] = v
    return out
