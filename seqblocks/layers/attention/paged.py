"""Paged attention caches: keys / values (or MLA latents) in a pool of fixed-size pages and a block table.

A sequence's position p lives in page ``block_table[b, p // page_size]`` at offset ``p % page_size``; the
pages of a sequence need not be contiguous, and the pool holds only the pages handed out, so memory
follows the tokens actually cached instead of ``batch_size * max_seqlen``. One block table (a [B,
max_pages] int64 tensor) is shared by every attention layer of a model: a page id names the same
positions in each layer's pool. Page 0 is a scratch page that is never handed out: unassigned entries
point there, so a row without pages writes harmlessly into it, and reads are bounded by each row's own
length, so nothing read from it is ever attended to.

- ``PagedKVCache``: a ``KVCache`` for MHA / GQA / MQA / sliding-window / chunked attention; ``k_pages``
  [P, Hkv, page, K], ``v_pages`` [P, Hkv, page, V], ``valid_pages`` [P, page].
- ``PagedMLACache``: an ``MLACache`` for MLA; ``c_kv_pages`` [P, page, R], ``k_pe_pages`` [P, page, Pr].
- ``PageAllocator``: hands out and takes back page ids (host-side bookkeeping of a serving engine).
- ``ring_pages`` / ``ring_row``: a sliding-window layer's ring (below).

**Rings (sliding-window release).** A sliding-window layer never reads a position again once it is
``window`` or more behind the newest query, so its cache can reuse pages: a row owns R pages and
logical page j lives in ``pages[j % R]`` (``ring_row`` fills a block-table row that way, over the
row's whole span). Position p then lands in slot ``p % (R * N)`` of the row's R * N positions (a
rolling buffer), overwriting p - R * N, and that is exact as long as no call still reads a position
it overwrites: a call of T tokens at positions o .. o + T - 1 reads o - window + 1 .. o + T - 1,
window + T - 1 consecutive positions, all intact when R * N >= window + T - 1
(``ring_pages``: R = ``ceil((window + T - 1) / N)``; a decode step needs ``ceil(window / N)``). Older
positions read through the table then hold newer tokens, but the window mask never lets a query see
them, and positions past a row's length are masked as before, so attention (gather path and paged
kernel alike) computes exactly what it computes with every page kept. ``PagedKVCache.max_write``
records T, and a longer write raises.

Both caches keep the per-row fields of their parent (``seqlen_offset``, ``nonfinite_last``) and answer
the same ``write`` / ``read``: a read gathers the row's pages into the contiguous [B, ..., S, ...] view
the attention op takes (SDPA / FlexAttention over the gathered pages). Their pool tensors are not
batch-first; ``pooled`` names them (``check_cache`` and the engine skip them).

Shapes: B batch, P pages in the pool, N page_size, S positions read, Hkv heads, K / V widths.
"""

from __future__ import annotations

import dataclasses

import torch

from seqblocks.layers.attention.cache import KVCache, MLACache

__all__ = ["PageAllocator", "PagedKVCache", "PagedMLACache", "new_block_table", "ring_pages", "ring_row"]


def new_block_table(batch_size: int, max_seqlen: int, page_size: int, device=None) -> torch.Tensor:
    """A [B, ceil(max_seqlen / page_size)] block table, every entry on the scratch page 0."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size={page_size!r} must be a positive int")
    return torch.zeros(batch_size, -(-max_seqlen // page_size), dtype=torch.long, device=device)


def ring_pages(window: int, page_size: int, max_write: int) -> int:
    """Pages of a sliding-window ring (module docstring) for calls of at most ``max_write`` tokens:
    ``ceil((window + max_write - 1) / page_size)``, the fewest whose positions hold the window + max_write
    - 1 consecutive positions such a call reads.

    Raises:
        ValueError: an argument that is not a positive int.
    """
    for name, value in (("window", window), ("page_size", page_size), ("max_write", max_write)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ring_pages: {name}={value!r} must be a positive int")
    return -(-(window + max_write - 1) // page_size)


def ring_row(pages: list[int], max_pages: int, device=None) -> torch.Tensor:
    """A block-table row [max_pages] that maps logical page j to ``pages[j % len(pages)]`` (a ring)."""
    if not pages:
        raise ValueError("ring_row: a ring needs at least one page")
    ids = torch.tensor(pages, dtype=torch.long, device=device)
    return ids[torch.arange(max_pages, device=device) % len(pages)]


class PageAllocator:
    """Free-list of the page ids 1 .. num_pages - 1 (page 0 is the scratch page)."""

    def __init__(self, num_pages: int) -> None:
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 2:
            raise ValueError(f"num_pages={num_pages!r} must be an int >= 2 (page 0 is the scratch page)")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise ValueError(f"PageAllocator: {n} pages asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def _gather(pages: torch.Tensor, table: torch.Tensor, S: int, axis: int) -> torch.Tensor:
    """Positions 0..S-1 of each row: pages [P, ..., N, ...] (page positions on ``axis``) through
    ``table`` [B, max_pages] -> [B, ..., S, ...] with the positions on ``axis``."""
    N = pages.shape[axis]
    n = -(-S // N)
    picked = pages[table[:, :n]]  # [B, n, ...pages dims]
    picked = picked.movedim(1, axis)  # [B, ..., n, N, ...]
    shape = list(picked.shape)
    shape[axis:axis + 2] = [n * N]
    return picked.reshape(shape).narrow(axis, 0, S)


def _scatter(pages: torch.Tensor, table: torch.Tensor, index: torch.Tensor, values: torch.Tensor, axis: int) -> None:
    """Store ``values`` [B, T, ...] at positions ``index`` [B, T] of each row (position -> page, offset)."""
    N = pages.shape[axis]
    page = table.gather(1, index // N)  # [B, T]
    offset = index % N
    if axis == 1:  # [P, N, ...]
        pages[page, offset] = values.to(pages.dtype)
    else:  # [P, H, N, ...]
        pages[page, :, offset] = values.to(pages.dtype)


def _own_valid(cache, S: int, T: int) -> torch.Tensor:
    """[B, S] validity of positions 0..S-1 of a paged cache after a call of T tokens was written: written
    valid, and before the row's own end (positions past it read the scratch page or stale pages)."""
    valid = _gather(cache.valid_pages, cache.block_table, S, axis=1)
    return valid & (torch.arange(S, device=valid.device)[None] < (cache.seqlen_offset + T)[:, None])


@dataclasses.dataclass(eq=False)
class PagedKVCache(KVCache):
    """A ``KVCache`` whose positions live in pages (module docstring). ``k`` / ``v`` / ``key_valid`` of the
    parent stay None; ``read`` gathers them.

    Attributes:
        k_pages (Tensor): [P, Hkv, N, K]. v_pages (Tensor): [P, Hkv, N, V]. valid_pages (Tensor): [P, N] bool.
        block_table (Tensor): [B, max_pages] int64 page ids (shared by the model's attention layers).
        max_write (int | None): the most tokens one call may write; set for a sliding-window layer on a
            ring (module docstring), whose longer writes would overwrite positions the call reads.
            None: no limit.
    """

    pooled = ("k_pages", "v_pages", "valid_pages")

    k_pages: torch.Tensor = None
    v_pages: torch.Tensor = None
    valid_pages: torch.Tensor = None
    block_table: torch.Tensor = None
    max_write: int | None = None

    @classmethod
    def allocate_paged(cls, block_table: torch.Tensor, num_pages: int, page_size: int, max_seqlen: int,
                       num_kv_heads: int, head_dim: int, v_dim: int, *, device=None, dtype=None) -> PagedKVCache:
        B = block_table.shape[0]
        cache = cls.empty(B, max_seqlen, device=device)
        cache.k_pages = torch.zeros(num_pages, num_kv_heads, page_size, head_dim, device=device, dtype=dtype)
        cache.v_pages = torch.zeros(num_pages, num_kv_heads, page_size, v_dim, device=device, dtype=dtype)
        cache.valid_pages = torch.zeros(num_pages, page_size, dtype=torch.bool, device=device)
        cache.nonfinite_last = torch.zeros(B, dtype=torch.long, device=device)
        cache.block_table = block_table
        return cache

    @property
    def capacity(self) -> int:
        return min(self.max_seqlen, self.block_table.shape[1] * self.k_pages.shape[2])

    def write(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Store keys [B, Hkv, T, K], values [B, Hkv, T, V] and validity [B, T] at positions ``index``.

        Raises:
            ValueError: more than ``max_write`` tokens on a ring.
        """
        if self.max_write is not None and k.shape[2] > self.max_write:
            raise ValueError(f"PagedKVCache: a call of {k.shape[2]} tokens on a sliding-window ring sized for "
                             f"calls of at most {self.max_write} (it would overwrite keys the call reads)")
        index = index.expand(k.shape[0], -1)
        _scatter(self.k_pages, self.block_table, index, k.transpose(1, 2), axis=2)
        _scatter(self.v_pages, self.block_table, index, v.transpose(1, 2), axis=2)
        _scatter(self.valid_pages, self.block_table, index, valid, axis=1)

    def read(self, S: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys [B, Hkv, S, K], values and validity [B, S] of positions 0..S-1, after a call of T tokens was
        written (positions at or past a row's own length are invalid)."""
        return (_gather(self.k_pages, self.block_table, S, axis=2), _gather(self.v_pages, self.block_table, S, axis=2),
                _own_valid(self, S, T))


@dataclasses.dataclass(eq=False)
class PagedMLACache(MLACache):
    """An ``MLACache`` whose latents live in pages (module docstring).

    Attributes:
        c_kv_pages (Tensor): [P, N, R]. k_pe_pages (Tensor): [P, N, Pr]. valid_pages (Tensor): [P, N] bool.
        block_table (Tensor): [B, max_pages] int64.
    """

    pooled = ("c_kv_pages", "k_pe_pages", "valid_pages")

    c_kv_pages: torch.Tensor = None
    k_pe_pages: torch.Tensor = None
    valid_pages: torch.Tensor = None
    block_table: torch.Tensor = None

    @classmethod
    def allocate_paged(cls, block_table: torch.Tensor, num_pages: int, page_size: int, max_seqlen: int,
                       kv_lora_rank: int, rope_dim: int, *, device=None, dtype=None) -> PagedMLACache:
        B = block_table.shape[0]
        cache = cls.empty(B, max_seqlen, device=device)
        cache.c_kv_pages = torch.zeros(num_pages, page_size, kv_lora_rank, device=device, dtype=dtype)
        cache.k_pe_pages = torch.zeros(num_pages, page_size, rope_dim, device=device, dtype=dtype)
        cache.valid_pages = torch.zeros(num_pages, page_size, dtype=torch.bool, device=device)
        cache.nonfinite_last = torch.zeros(B, dtype=torch.long, device=device)
        cache.block_table = block_table
        return cache

    @property
    def capacity(self) -> int:
        return min(self.max_seqlen, self.block_table.shape[1] * self.c_kv_pages.shape[1])

    def write(self, index: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, valid: torch.Tensor) -> None:
        index = index.expand(c_kv.shape[0], -1)
        _scatter(self.c_kv_pages, self.block_table, index, c_kv, axis=1)
        _scatter(self.k_pe_pages, self.block_table, index, k_pe, axis=1)
        _scatter(self.valid_pages, self.block_table, index, valid, axis=1)

    def read(self, S: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents [B, S, R], rotated keys [B, S, Pr] and validity [B, S] of positions 0..S-1."""
        return (_gather(self.c_kv_pages, self.block_table, S, axis=1),
                _gather(self.k_pe_pages, self.block_table, S, axis=1), _own_valid(self, S, T))
