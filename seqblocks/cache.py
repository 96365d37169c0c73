"""Inference caches: the state a mixer carries between calls while decoding.

Every cache is preallocated with static shapes by ``mixer.allocate_inference_cache(batch_size,
max_seqlen, dtype)`` and updated **in place** by the mixer (``copy_`` / indexed writes, never by
re-binding attributes), so a decode step can be captured in a CUDA graph and compiled without
recompilation. ``seqlen_offset`` [B] counts the tokens each sequence has consumed; it is a tensor so
that sequences of different lengths share one batch and no Python integer changes between steps.

Shapes: B batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

__all__ = ["Cache", "host_sync_unsafe"]


def host_sync_unsafe() -> bool:
    """True while reading tensor values on the host is unsafe: while compiling or capturing a CUDA graph.

    Checks that read tensor values on the host (and so synchronise) must be skipped then: they would
    break the capture or the compiled graph. Validation then happens at warm-up, before capture.
    """
    compiling = torch.compiler.is_compiling()
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return compiling or capturing


@dataclasses.dataclass(eq=False)
class Cache:
    """Base of mixer caches. Subclasses add their state tensors as dataclass fields.

    Attributes:
        seqlen_offset (Tensor): [B] int64, tokens consumed so far by each sequence.
        max_seqlen (int): the most tokens the cache may hold; exceeding it raises ``ValueError``
            where a mixer's state grows with length (KV caches).
    """

    seqlen_offset: torch.Tensor
    max_seqlen: int

    @classmethod
    def empty(cls, batch_size: int, max_seqlen: int, device=None, **states: torch.Tensor) -> Cache:
        """A cache at offset 0 holding ``states``."""
        if batch_size <= 0 or max_seqlen <= 0:
            raise ValueError(f"cache sizes must be positive, got batch_size={batch_size}, max_seqlen={max_seqlen}")
        offset = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(seqlen_offset=offset, max_seqlen=max_seqlen, **states)

    @property
    def batch_size(self) -> int:
        return self.seqlen_offset.shape[0]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor field."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                yield f.name, value

    def reset(self) -> None:
        """Zero every tensor in place (back to an empty prefix)."""
        for _, t in self.tensors():
            t.zero_()

    def advance(self, num_tokens: int | torch.Tensor) -> None:
        """Add ``num_tokens`` (an int or a [B] tensor) to ``seqlen_offset`` in place."""
        self.seqlen_offset.add_(num_tokens)

    def check_capacity(self, num_tokens: int, name: str) -> None:
        """Raise ``ValueError`` if adding ``num_tokens`` would pass ``max_seqlen``.

        Reads ``seqlen_offset`` on the host, so it does nothing while capturing or compiling.
        """
        if host_sync_unsafe():
            return
        needed = int(self.seqlen_offset.max()) + num_tokens
        if needed > self.max_seqlen:
            raise ValueError(
                f"{name}: cache holds at most max_seqlen={self.max_seqlen} tokens, but "
                f"{int(self.seqlen_offset.max())} are cached and {num_tokens} more were given; allocate a "
                f"larger cache"
            )
