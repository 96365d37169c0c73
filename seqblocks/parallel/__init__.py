"""Parallelism along the time axis (context parallelism): each rank of a process group holds one
contiguous chunk of every sequence, and the mixers exchange what crosses chunk boundaries
(docs/context_parallel.md)."""

from seqblocks.parallel.attention import allgather_attention, context_parallel_attention, ring_attention
from seqblocks.parallel.context import (
    ATTENTION_METHODS,
    ContextParallel,
    context_parallel,
    current_context_parallel,
    gather_time,
    local_chunk,
    using_context_parallel,
)

__all__ = ["ATTENTION_METHODS", "ContextParallel", "context_parallel", "current_context_parallel",
           "using_context_parallel", "gather_time", "local_chunk", "ring_attention", "allgather_attention",
           "context_parallel_attention"]

# Context-parallel scans and the short conv's halo (seqblocks.parallel.scan / conv; docs/context_parallel.md).
from seqblocks.parallel.conv import causal_conv1d_cp, conv_halo  # noqa: E402
from seqblocks.parallel.scan import (  # noqa: E402
    delta_rule_cp,
    gated_delta_rule_cp,
    gla_cp,
    linear_scan_cp,
    selective_scan_cp,
    simple_gla_cp,
    ssd_cp,
)

__all__ += ["causal_conv1d_cp", "conv_halo", "delta_rule_cp", "gated_delta_rule_cp", "gla_cp", "linear_scan_cp",
            "selective_scan_cp", "simple_gla_cp", "ssd_cp"]
