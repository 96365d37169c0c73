"""Recomputing cheap intermediates in the backward instead of keeping them: ``RecomputedSaves``.

Autograd keeps every tensor a backward formula needs until the backward runs. For some of them a
recipe is far cheaper to keep than the tensor: Mamba's conv output (one depthwise conv of a tensor
that stays saved anyway) and its step sizes before softplus (one thin GEMM of a small tensor). Inside
``with RecomputedSaves() as saves:``, after ``saves.recompute(t, fn)``, any tensor autograd saves that
is ``t`` or a view of it (``t`` owning its whole storage) is stored as ``fn`` plus the view's
geometry; when the backward asks for it, ``fn()`` runs (under the autocast state and
backend preference ``t`` was made in, without grad) and the view is taken again.
This is ``torch.utils.checkpoint`` for single tensors, with no second forward of everything else.

The recipe must recompute ``t`` exactly (deterministic kernels on the same inputs), so gradients are
bit-identical with and without it (tested). Inside ``torch.compile`` the region does nothing (the
compiler decides what to save).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from seqblocks.ops._backend import prefer_backend, preferred_backend

__all__ = ["RecomputedSaves"]


@dataclasses.dataclass(frozen=True)
class _Recipe:
    fn: Callable[[], torch.Tensor]
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    state: tuple  # ((device type, dtype) for each device type with autocast on, the backend preference)
    layout: tuple  # (size, stride, dtype) of the registered tensor, which the recompute must reproduce


def _autocast_state() -> tuple:
    return tuple((d, torch.get_autocast_dtype(d)) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d))


def _dispatch_state() -> tuple:
    # the autocast state and the backend preference (``prefer_backend``) that decide how ops run
    return _autocast_state(), preferred_backend()


class RecomputedSaves:
    """A region in which tensors registered with ``recompute`` are saved for backward as recipes
    (``enabled=False``: an ordinary region, ``recompute`` returns its tensor and does nothing else)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._recipes: dict[int, tuple[torch.Tensor, Callable[[], torch.Tensor], tuple]] = {}
        self._hooks = None

    def recompute(self, t: torch.Tensor, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Save ``t`` (and its views) as ``fn`` from here on; returns ``t``. ``t`` must own its storage
        from offset 0 (a fresh op output), and ``fn()`` must return a tensor equal to it."""
        dense = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if self._hooks is not None and t.requires_grad and dense:
            # the autocast state of the op that made t (a later op that saves it may run with autocast off)
            self._recipes[t.untyped_storage().data_ptr()] = (t, fn, _dispatch_state())
        return t

    def _pack(self, t: torch.Tensor):
        entry = self._recipes.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if entry is None or entry[0].dtype != t.dtype or entry[0].device != t.device:
            return t
        base = entry[0]
        return _Recipe(entry[1], tuple(t.size()), tuple(t.stride()), t.storage_offset(), entry[2],
                       (tuple(base.size()), tuple(base.stride()), base.dtype))

    @staticmethod
    def _unpack(saved):
        if not isinstance(saved, _Recipe):
            return saved
        autocast, backend = saved.state
        with torch.no_grad(), _autocast_region(autocast), prefer_backend(backend):
            full = saved.fn()
        if (tuple(full.size()), tuple(full.stride()), full.dtype) != saved.layout:
            raise RuntimeError(f"RecomputedSaves: a recipe gave {tuple(full.size())} / {tuple(full.stride())} / "
                               f"{full.dtype}, the forward's tensor was {saved.layout}; the recipe must "
                               f"recompute it exactly")
        return full.as_strided(saved.size, saved.stride, saved.offset)

    def __enter__(self) -> RecomputedSaves:
        if self.enabled and not torch.compiler.is_compiling() and torch.is_grad_enabled():
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
        self._recipes.clear()


class _autocast_region:
    """Re-enter the forward's autocast state (device types and dtypes) for a recompute."""

    def __init__(self, state: tuple) -> None:
        self._contexts = [torch.autocast(d, dtype=dtype) for d, dtype in state]
        if not state:  # the forward ran without autocast: make sure the backward's state does not leak in
            self._contexts = [torch.autocast(d, enabled=False) for d in ("cuda", "cpu")
                              if torch.is_autocast_enabled(d)]

    def __enter__(self):
        for c in self._contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self._contexts):
            c.__exit__(*exc)
