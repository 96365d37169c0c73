"""The context-parallel group a forward pass runs under, and the time-axis collectives every
context-parallel path is built from.

Layout: a sequence of ``T`` tokens is split into ``world_size`` contiguous chunks of ``T_local = T /
world_size`` tokens; rank ``r`` holds tokens ``[r * T_local, (r + 1) * T_local)`` of every row of the
batch (the same rows on every rank). A model's forward under ``with context_parallel(group):`` takes the
local chunk ``[B, T_local, ...]`` and returns the local chunk of the full-sequence outputs; gradients
are those of the full-sequence computation.

The collectives here are differentiable (their backward sends the cotangents back where the values
came from), so a path written with them needs no hand-written backward.

``using_context_parallel(cp)`` re-enters a group captured earlier (an activation-checkpointed block
recomputed in the backward pass runs outside the ``with`` of its forward, possibly on another thread)
or, with None, runs a block as one process would (``run_mixer``'s full-sequence fallback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = ["ContextParallel", "ATTENTION_METHODS", "context_parallel", "current_context_parallel",
           "using_context_parallel", "gather_time", "local_chunk"]

#: How attention exchanges keys and values under context parallelism (``seqblocks.parallel.attention``):
#: "ring" passes one rank's block at a time (memory O(T_local)), "allgather" gathers the whole sequence's
#: keys and values on every rank (O(T); the short-context path, served by the fused attention backends).
ATTENTION_METHODS = ("ring", "allgather")

_STATE = threading.local()


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """One context-parallel group: ``rank`` holds the ``rank``-th of ``world_size`` time chunks;
    ``attention`` is how attention layers exchange keys and values (``ATTENTION_METHODS``)."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    attention: str = "ring"

    def offset(self, local_len: int) -> int:
        """Position of this rank's first token in the full sequence."""
        return self.rank * local_len


def current_context_parallel() -> ContextParallel | None:
    """The group the running forward is split over, or None outside ``context_parallel``."""
    return getattr(_STATE, "cp", None)


@contextlib.contextmanager
def context_parallel(group: dist.ProcessGroup | None = None, *, attention: str = "ring") -> Iterator[ContextParallel]:
    """Run the forward passes inside the block split along time over ``group`` (default: the world).

    A group of one process is allowed and changes nothing (every path reduces to the plain one).

    Args:
        group (ProcessGroup | None): the processes that share each sequence. Default: None (the world).
        attention (str): "ring" or "allgather" (``ATTENTION_METHODS``). Default: "ring".

    Raises:
        ValueError: no process group is initialised; an unknown ``attention``.
        TypeError: ``group`` is not a ProcessGroup.
    """
    if attention not in ATTENTION_METHODS:
        raise ValueError(f"context_parallel: attention={attention!r} must be one of {ATTENTION_METHODS}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context_parallel needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group); none is initialised")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"context_parallel: group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(group).__name__}")
    cp = ContextParallel(group=group, rank=dist.get_rank(group), world_size=dist.get_world_size(group),
                         attention=attention)
    with using_context_parallel(cp):
        yield cp


@contextlib.contextmanager
def using_context_parallel(cp: ContextParallel | None) -> Iterator[ContextParallel | None]:
    """Run the block under ``cp`` exactly (a group captured with ``current_context_parallel()``), or, with
    None, as a single process would: ``current_context_parallel()`` is None inside."""
    if cp is not None and not isinstance(cp, ContextParallel):
        raise TypeError(f"using_context_parallel: cp must be a ContextParallel or None, got {type(cp).__name__}")
    previous = current_context_parallel()
    _STATE.cp = cp
    try:
        yield cp
    finally:
        _STATE.cp = previous


class _GatherTime(torch.autograd.Function):
    """All-gather along ``dim``; the backward returns each rank the summed cotangent of its own chunk."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format)
                 for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        # Every rank used the whole gathered tensor, so a chunk's cotangent is the sum over ranks of
        # that chunk's slice; an all-reduce then a slice keeps this to collectives gloo has.
        dist.all_reduce(grad, group=ctx.group)
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(world, dim=ctx.dim)[rank].contiguous(), None, None


def gather_time(x: torch.Tensor, dim: int = 1, cp: ContextParallel | None = None) -> torch.Tensor:
    """The full sequence from every rank's chunk ``x``, concatenated along ``dim`` in rank order.

    Differentiable. Every rank's chunk must have the same shape.
    """
    cp = cp if cp is not None else current_context_parallel()
    if cp is None or cp.world_size == 1:
        return x
    return _GatherTime.apply(x, dim, cp.group)


def local_chunk(x: torch.Tensor, dim: int = 1, cp: ContextParallel | None = None) -> torch.Tensor:
    """This rank's chunk of a full-sequence tensor ``x`` (the inverse of ``gather_time``)."""
    cp = cp if cp is not None else current_context_parallel()
    if cp is None or cp.world_size == 1:
        return x
    if x.shape[dim] % cp.world_size:
        raise ValueError(f"local_chunk: length {x.shape[dim]} along dim {dim} is not divisible by the "
                         f"context-parallel world size {cp.world_size}")
    return x.chunk(cp.world_size, dim=dim)[cp.rank]
