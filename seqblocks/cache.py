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
from typing import Any

import torch

__all__ = ["Cache", "InferenceCaches", "cache_offset", "host_sync_unsafe"]


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


class InferenceCaches(dict):
    """A model's caches: ``{layer_idx: Cache}`` plus the model-level token count.

    Attributes:
        seqlen_offset (Tensor): [B] int64, tokens each sequence has consumed (advanced in place).
        max_seqlen (int): the capacity the caches were allocated for.
    """

    def __init__(self, caches: dict[int, Any], seqlen_offset: torch.Tensor, max_seqlen: int) -> None:
        super().__init__(caches)
        self.seqlen_offset = seqlen_offset
        self.max_seqlen = max_seqlen

    @property
    def batch_size(self) -> int:
        return self.seqlen_offset.shape[0]

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every state tensor (the offset and each layer cache's tensor fields)."""
        yield self.seqlen_offset
        for cache in self.values():
            if not isinstance(cache, Cache):
                raise TypeError(f"InferenceCaches: {type(cache).__name__} is not a seqblocks Cache")
            for _, t in cache.tensors():
                yield t

    def reset(self) -> None:
        """Back to an empty prefix, in place."""
        self.seqlen_offset.zero_()
        for cache in self.values():
            cache.reset()


def cache_offset(caches: Any) -> torch.Tensor:
    """The [B] token count of a caches dict (``InferenceCaches`` or a plain ``{layer: Cache}``)."""
    offset = getattr(caches, "seqlen_offset", None)
    if offset is not None:
        return offset
    for cache in caches.values():
        offset = getattr(cache, "seqlen_offset", None)
        if offset is not None:
            return offset
    raise TypeError("caches hold no seqlen_offset; allocate them with model.allocate_inference_cache")
