"""Parallelism along the time axis (context parallelism): each rank of a process group holds one
contiguous chunk of every sequence, and the mixers exchange what crosses chunk boundaries."""

from seqblocks.parallel.context import (
    ContextParallel,
    context_parallel,
    current_context_parallel,
    gather_time,
    local_chunk,
)

__all__ = ["ContextParallel", "context_parallel", "current_context_parallel", "gather_time", "local_chunk"]
