"""Continuous batching of any seqblocks language model (attention, recurrent or hybrid): ``Engine``.

The engine owns one set of decode caches for ``max_batch_size`` slots (``model.allocate_inference_cache``
at that batch size), so attention layers hold their KV caches and recurrent layers their states side
by side, one row per slot. Requests wait in a FIFO queue, take a free slot when one opens, and leave it
when they finish, between steps. One ``step``:

1. admits waiting requests into free slots (the slot's rows of every cache tensor are zeroed: the
   empty prefix, by the cache contract);
2. runs one decode step for every slot that is decoding: the batch feeds each such slot its newest
   token (free and prefilling slots get a filler token, and afterwards the prefilling slots' rows are
   restored from a snapshot and the free ones zeroed, so only decoding rows change), then samples each
   decoding request's next token with its own parameters;
3. spends up to ``prefill_chunk_size`` prompt tokens on the prefilling requests, oldest first: a chunk
   runs through ``model.forward`` on a batch-1 view of the request's slot (views share storage, so the
   layers' in-place cache writes land in the slot). A request whose prompt is done samples its first
   token and decodes from the next step on.

Every cache tensor is batch-first (the mixer contract), which is all the slot views, the snapshot and
the reset need, so any registered mixer serves. A request gets exactly the tokens ``generate`` gives
it alone: greedy, or sampled with its own ``seed`` (a per-request generator draws the same noise in
the same order), up to floating-point differences between batch sizes. A decode step runs only the
first ``bucket`` slots, the smallest of 1, 2, 4, ... ``max_batch_size`` that covers every decoding slot
(requests take the lowest free slot), through a view of those rows; ``cuda_graph=True`` replays it
from one CUDA graph per bucket (``seqblocks.generation.CUDAGraphDecoder`` over the rows' view,
captured on first use; capture restores every cache tensor it ran on). With ``page_size`` the
attention layers keep their keys and values in a shared pool of pages
(``seqblocks.layers.attention.paged``) addressed by one block table, so a request holds pages for its
own prompt and ``max_tokens`` only; recurrent layers keep their per-slot state rows ("recurrent-state
slots"), and a hybrid model mixes both in one batch. Sliding-window layers (and chunked attention) get
a pool and block table of their own in which each request holds a ring of pages sized for its window
plus one prefill chunk (``ring_pages``), so positions that left the window are overwritten instead of
held until the request ends; a model whose attention is all windowed serves requests of any length
from a pool sized by its windows.

Shapes: S slots, T prompt length, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from seqblocks.cache import InferenceCaches
from seqblocks.generation import CUDAGraphDecoder, check_sampling_options, process_logits, sample
from seqblocks.layers.attention.paged import ring_row

__all__ = ["Engine", "Request", "SamplingParams"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples.

    Attributes:
        max_tokens (int): the most tokens to generate. Default: 16.
        temperature (float): 0 is greedy. Default: 1.0.
        top_k (int | None), top_p (float | None), min_p (float | None): filters, as in ``generate``.
        repetition_penalty (float): CTRL's penalty on tokens already in the request. Default: 1.0.
        stop_tokens (tuple[int, ...]): the request finishes after generating one (kept). Default: ().
        seed (int | None): seed of the request's own generator. Default: None (torch's global RNG).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams: max_tokens={self.max_tokens!r} must be a positive int")
        check_sampling_options(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                               repetition_penalty=self.repetition_penalty)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_tokens):
            raise TypeError(f"SamplingParams: stop_tokens must be ints, got {self.stop_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"SamplingParams: seed must be an int or None, got {self.seed!r}")
        object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))


@dataclasses.dataclass(eq=False)
class Request:
    """One request's state. ``tokens`` grows as the engine generates; ``finish_reason`` is set once it ends
    ("stop": a stop token, "length": ``max_tokens`` or the engine's ``max_seqlen``, "cancelled").

    Timing (``time.perf_counter`` seconds): ``arrival``, ``first_token_time``, ``finish_time``."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[Request, int], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None
    fed: int = 0  # prompt tokens prefilled so far
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [1, V] bool, with a repetition penalty

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(eq=False)
class _PagePool:
    """One pool of pages: its allocator, the block table of the layers it serves, each slot's pages.

    ``ring`` (sliding-window pools): a request holds at most this many pages, reused in a ring
    (``seqblocks.layers.attention.paged.ring_row``); None: a request holds a page for every position."""

    allocator: Any
    table: torch.Tensor
    ring: int | None = None
    pages: dict[int, list[int]] = dataclasses.field(default_factory=dict)


def _per_row(cache) -> list[tuple[str, torch.Tensor]]:
    """A cache's batch-first tensors (a paged cache's page pools are shared by the rows, not per row)."""
    pooled = getattr(cache, "pooled", ())
    return [(name, t) for name, t in cache.tensors() if t.dim() > 0 and name not in pooled]


def _rows_view(caches: InferenceCaches, start: int, stop: int) -> InferenceCaches:
    """A view of rows ``start:stop`` of every cache (the tensors share storage with ``caches``; page
    pools are shared whole)."""
    def view(cache):
        return dataclasses.replace(cache, **{name: t[start:stop] for name, t in _per_row(cache)})
    return InferenceCaches({i: view(c) for i, c in caches.items()}, caches.seqlen_offset[start:stop],
                           caches.max_seqlen)


def _slot_view(caches: InferenceCaches, slot: int) -> InferenceCaches:
    """A batch-1 view of every cache at row ``slot``."""
    return _rows_view(caches, slot, slot + 1)


class Engine:
    """Continuous batching over ``max_batch_size`` cache slots (module docstring).

    Args:
        model: a seqblocks language model (``forward`` / ``step`` / ``allocate_inference_cache`` /
            ``vocab_size``), in eval mode.
        max_batch_size (int): slots S, the most requests decoded together. Default: 8.
        max_seqlen (int): the most tokens (prompt + generated) a request may hold. Default: 2048.
        prefill_chunk_size (int): prompt tokens prefilled per step, over all prefilling requests.
            Default: 512.
        cuda_graph (bool): replay the decode step from CUDA graphs, one per bucket (CUDA only).
            Default: False.
        page_size (int | None): page the attention layers' caches (``PagedKVCache`` / ``PagedMLACache``)
            in pages of this many positions; recurrent layers (and attention without a paged cache)
            keep one state row per slot. A request is admitted once pages for its prompt plus
            ``max_tokens`` are free, and gives them back when it finishes. Sliding-window layers page
            into a pool of their own, where a request holds a ring of at most
            ``ring_pages(window, page_size, prefill_chunk_size)`` pages (the largest window of the
            model's windowed layers). Default: None (contiguous caches of ``max_seqlen`` per slot).
        num_pages (int | None): the page pool of the layers that keep every position (global
            attention, MLA; page 0 is scratch). Default: enough for every slot at ``max_seqlen``.
        num_window_pages (int | None): the page pool of the sliding-window layers' rings. Default:
            enough for a full ring in every slot.
        prefix_caching (bool): with ``page_size``, keep the full pages of finished prompts and map them
            into later requests whose prompts start with the same tokens, which then prefill only the
            rest. Exact only when every layer's cache is paged (a recurrent state at a page boundary is
            not kept), so a model with other layers raises. Unused cached pages are evicted, least
            recently used first, when the pool runs short. Sliding-window layers then page into the
            shared pool like global ones (a ring's pages are overwritten, so they cannot be shared).
            Default: False.

    Thread safety: ``add_request`` and ``cancel`` may be called from other threads while one thread
    runs ``step``.
    """

    def __init__(self, model: Any, *, max_batch_size: int = 8, max_seqlen: int = 2048, prefill_chunk_size: int = 512,
                 cuda_graph: bool = False, page_size: int | None = None, num_pages: int | None = None,
                 num_window_pages: int | None = None, prefix_caching: bool = False) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_seqlen", max_seqlen),
                            ("prefill_chunk_size", prefill_chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine: {name}={value!r} must be a positive int")
        for name in ("step", "allocate_inference_cache", "vocab_size"):
            if not hasattr(model, name):
                raise TypeError(f"Engine: model must be a seqblocks language model; {type(model).__name__} has no "
                                f"{name!r}")
        self.model = model
        self.max_batch_size, self.max_seqlen, self.prefill_chunk_size = max_batch_size, max_seqlen, prefill_chunk_size
        self.device = next(model.parameters()).device
        self.cuda_graph = bool(cuda_graph)
        self.decoders: dict[int, Any] = {}  # bucket -> CUDAGraphDecoder over the first rows
        # decode batch sizes: a step runs the smallest bucket that covers every decoding slot
        self.buckets = sorted({min(2 ** i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
        self.page_size, self.allocator, self.block_table = page_size, None, None
        self.window_allocator, self.window_table = None, None
        self._pools: list[_PagePool] = []
        self._pages: dict[int, list[int]] = {}  # the global pool's pages of each slot
        self.prefix_caching = bool(prefix_caching)
        self._prefix: dict[tuple[int, ...], int] = {}  # the tokens up to a page's end -> that page
        self._page_key: dict[int, tuple[int, ...]] = {}
        self._refs: dict[int, int] = {}  # cached pages -> requests using them
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unused (LRU first)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("Engine: cuda_graph=True needs a model on a CUDA device")
        if page_size is not None:
            self.caches = self._paged_caches(page_size, num_pages, num_window_pages)
        else:
            if num_pages is not None or num_window_pages is not None:
                raise ValueError("Engine: num_pages / num_window_pages size page pools; they need page_size")
            self.caches = model.allocate_inference_cache(max_batch_size, max_seqlen)
        per_row = {id(self.caches.seqlen_offset): self.caches.seqlen_offset}
        for cache in self.caches.values():
            per_row.update((id(t), t) for _, t in _per_row(cache))  # the shared block table once
        self._tensors = list(per_row.values())
        if self.prefix_caching:
            if page_size is None:
                raise ValueError("Engine: prefix_caching=True needs paged caches (page_size)")
            unpaged = [i for i, c in self.caches.items() if not getattr(c, "pooled", ())]
            if unpaged:
                raise ValueError(f"Engine: prefix_caching=True is exact only when every layer's cache is paged; "
                                 f"layers {unpaged} keep per-slot states ({type(self.caches[unpaged[0]]).__name__})")
        self.slots: list[Request | None] = [None] * max_batch_size
        self.waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._newest = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)  # token to feed next
        self.stats = {"requests": 0, "finished": 0, "generated_tokens": 0, "prompt_tokens": 0, "steps": 0,
                      "prefix_hit_tokens": 0}
        for t in self._tensors:
            t.zero_()

    def _paged_caches(self, page_size: int, num_pages: int | None, num_window_pages: int | None) -> InferenceCaches:
        """The model's caches with paged attention layers: global layers on one pool and block table,
        sliding-window layers (unless prefix caching) on rings in a second pool."""
        from seqblocks.layers.attention.paged import PageAllocator, new_block_table, ring_pages

        S, L, model = self.max_batch_size, self.max_seqlen, self.model
        mixers = list(model.mixers())
        paged = [callable(getattr(m, "allocate_paged_cache", None)) for m in mixers]
        windows = [getattr(m, "window_size", None) if p and not self.prefix_caching else None
                   for m, p in zip(mixers, paged)]
        max_pages = new_block_table(1, L, page_size).shape[1]
        if any(p and w is None for p, w in zip(paged, windows)):
            self.block_table = new_block_table(S, L, page_size, device=self.device)
            if num_pages is None:
                num_pages = S * max_pages + 1
            self.allocator = PageAllocator(num_pages)
            self._pages = {}
            self._pools.append(_PagePool(self.allocator, self.block_table, pages=self._pages))
        elif num_pages is not None:
            raise ValueError(f"Engine: num_pages={num_pages} sizes the pool of the layers that keep every position; "
                             f"this model has none (its paged attention is all sliding-window): size the rings' "
                             f"pool with num_window_pages")
        ring = None
        if any(w is not None for w in windows):
            ring = min(ring_pages(max(w for w in windows if w is not None), page_size, self.prefill_chunk_size),
                       max_pages)
            self.window_table = new_block_table(S, L, page_size, device=self.device)
            if num_window_pages is None:
                num_window_pages = S * ring + 1
            self.window_allocator = PageAllocator(num_window_pages)
            self._pools.append(_PagePool(self.window_allocator, self.window_table, ring=ring))
        elif num_window_pages is not None:
            raise ValueError(f"Engine: num_window_pages={num_window_pages} sizes the sliding-window layers' pool; "
                             f"this model has no paged sliding-window layer"
                             + (" (prefix caching pages them with the others)" if self.prefix_caching else ""))
        dtype = next(model.parameters()).dtype
        caches = {}
        for i, (mixer, is_paged, window) in enumerate(zip(mixers, paged, windows)):
            if not is_paged:
                caches[i] = mixer.allocate_inference_cache(S, L, dtype=dtype)
            elif window is None:
                caches[i] = mixer.allocate_paged_cache(self.block_table, num_pages, page_size, L, dtype=dtype)
            else:
                caches[i] = mixer.allocate_paged_cache(self.window_table, num_window_pages, page_size, L, dtype=dtype)
                if ring < max_pages:  # a real ring: no call may write more than one prefill chunk
                    caches[i].max_write = self.prefill_chunk_size
        return InferenceCaches(caches, torch.zeros(S, dtype=torch.long, device=self.device), L)

    def _cached_prefix(self, request: Request) -> list[int]:
        """Cached pages holding the longest run of whole pages the prompt starts with (the prompt's last
        token is always fed again, for its logits)."""
        N, pages = self.page_size, []
        for j in range((len(request.prompt) - 1) // N):
            page = self._prefix.get(tuple(request.prompt[: (j + 1) * N]))
            if page is None:
                break
            pages.append(page)
        return pages

    def _register_prefix(self, request: Request) -> None:
        """After its prompt is prefilled, offer the request's whole prompt pages to later requests."""
        if any(int(c.nonfinite_last[request.slot]) for c in self.caches.values()):
            return  # a non-finite prompt token: its poison count is not kept with the pages
        N = self.page_size
        for j, page in enumerate(self._pages[request.slot][: len(request.prompt) // N]):
            key = tuple(request.prompt[: (j + 1) * N])
            if page in self._refs:
                continue  # already cached (mapped in from an earlier request)
            if key in self._prefix:
                break  # another request cached this prefix first; keep this page private
            self._prefix[key], self._page_key[page], self._refs[page] = page, key, 1

    def _pages_needed(self, request: Request, pool: _PagePool | None = None) -> int:
        """Pages ``request`` holds in ``pool`` (default: the global pool): one per position of its prompt
        plus ``max_tokens``, at most a ring's in a sliding-window pool."""
        tokens = min(len(request.prompt) + request.params.max_tokens, self.max_seqlen)
        n = -(-tokens // self.page_size)
        return n if pool is None or pool.ring is None else min(n, pool.ring)

    # -- requests -------------------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, on_token: Callable[[Request, int], None] | None = None) -> Request:
        """Queue a request; ``on_token(request, token)`` is called (from the stepping thread) for each
        generated token, and once more with token -1 when the request finishes.

        Raises:
            ValueError / TypeError: an empty prompt, ids outside the vocabulary, or a prompt that
                leaves no room for a token within ``max_seqlen``.
        """
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"Engine.add_request: params must be SamplingParams, got {type(params).__name__}")
        prompt = [int(t) for t in prompt]
        V = self.model.vocab_size
        if not prompt:
            raise ValueError("Engine.add_request: the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= V:
            raise ValueError(f"Engine.add_request: prompt ids must lie in [0, {V})")
        if len(prompt) >= self.max_seqlen:
            raise ValueError(f"Engine.add_request: a prompt of {len(prompt)} tokens leaves no room within "
                             f"max_seqlen={self.max_seqlen}")
        bad = [t for t in params.stop_tokens if not 0 <= t < V]
        if bad:
            raise ValueError(f"Engine.add_request: stop_tokens {bad} lie outside [0, {V})")
        request = Request(request_id if request_id is not None else f"req-{next(self._ids)}", prompt, params,
                          on_token=on_token)
        for pool in self._pools:
            need, have = self._pages_needed(request, pool), pool.allocator.num_pages - 1
            if need > have:
                kind = "sliding-window pool (num_window_pages)" if pool.ring is not None else "pool"
                raise ValueError(f"Engine.add_request: the request needs {need} pages of {self.page_size} positions, "
                                 f"the {kind} has {have}")
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if params.repetition_penalty != 1.0:
            request.seen = torch.zeros(1, V, dtype=torch.bool, device=self.device)
            request.seen[0, torch.tensor(prompt, device=self.device)] = True
        with self._lock:
            self.waiting.append(request)
            self.stats["requests"] += 1
        return request

    def cancel(self, request_id: str) -> bool:
        """Finish a waiting or running request now ("cancelled"); its slot frees at once. Returns whether
        it was found."""
        with self._lock:
            for request in list(self.waiting):
                if request.request_id == request_id:
                    self.waiting.remove(request)
                    self._finish(request, "cancelled")
                    return True
            for request in self.slots:
                if request is not None and request.request_id == request_id:
                    self._finish(request, "cancelled")
                    return True
        return False

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self.slots)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    # -- stepping -------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Admit, decode one token for every decoding request, prefill a chunk (module docstring)."""
        with self._lock:
            self._admit()
            running = [r for r in self.slots if r is not None]
        decoding = [r for r in running if r.fed == len(r.prompt) and not r.finished]
        if decoding:
            self._decode(decoding, [r for r in running if r.fed < len(r.prompt)])
        budget = self.prefill_chunk_size
        for request in sorted((r for r in running if r.fed < len(r.prompt) and not r.finished),
                              key=lambda r: r.arrival):
            if budget <= 0:
                break
            chunk = request.prompt[request.fed:request.fed + budget]
            budget -= len(chunk)
            ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
            logits = self.model(ids, inference_params=_slot_view(self.caches, request.slot),
                                num_last_tokens=1).logits[:, -1]
            request.fed += len(chunk)
            self.stats["prompt_tokens"] += len(chunk)
            if request.fed == len(request.prompt):
                if self.prefix_caching:
                    with self._lock:
                        self._register_prefix(request)
                self._emit(request, logits)
        self.stats["steps"] += 1

    def capture_graphs(self) -> int:
        """Capture every bucket's decode-step CUDA graph now rather than on first use, so no request
        waits for a capture mid-serving (a server calls this once before taking requests). Safe at any
        time: capture restores the cache tensors it touched. Returns the number of graphs held.

        Raises:
            ValueError: the engine was built without ``cuda_graph=True``.
        """
        if not self.cuda_graph:
            raise ValueError("capture_graphs needs an engine built with cuda_graph=True")
        with torch.no_grad():
            for bucket in self.buckets:
                self._decoder(bucket)
        return len(self.decoders)

    def _decoder(self, bucket: int):
        """The bucket's CUDA-graph decoder, captured on first use over the view of its rows (capture
        restores every cache tensor it touched)."""
        decoder = self.decoders.get(bucket)
        if decoder is None:
            decoder = self.decoders[bucket] = CUDAGraphDecoder(self.model, _rows_view(self.caches, 0, bucket))
        return decoder

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Step until there is no work (or ``until()`` is true)."""
        while self.has_work() and not (until is not None and until()):
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Queue ``prompts`` (one ``SamplingParams`` for all, or one each), run them, return their tokens."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"Engine.generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        requests = [self.add_request(p, s) for p, s in zip(prompts, params)]
        self.run(until=lambda: all(r.finished for r in requests))
        return [r.tokens for r in requests]

    # -- internals ------------------------------------------------------------------------------------

    def _admit(self) -> None:
        for slot in range(self.max_batch_size):
            if not self.waiting:
                return
            if self.slots[slot] is None:
                request = self.waiting[0]
                shared = self._cached_prefix(request) if self.prefix_caching else []
                fresh = self._pages_needed(request) - len(shared) if self.allocator is not None else 0
                if self.allocator is not None and self.allocator.num_free + len(self._idle) - sum(
                        p in self._idle for p in shared) < fresh:
                    return  # first come, first served: wait until enough pages are back
                rings = [p for p in self._pools if p.ring is not None]
                if any(p.allocator.num_free < self._pages_needed(request, p) for p in rings):
                    return
                self.waiting.popleft()
                request.slot = slot
                self.slots[slot] = request
                for t in self._tensors:
                    t[slot].zero_()
                if self.allocator is not None:
                    for page in shared:
                        self._refs[page] += 1
                        self._idle.pop(page, None)
                    while self.allocator.num_free < fresh:  # evict unused cached pages, oldest first
                        page, _ = self._idle.popitem(last=False)
                        del self._prefix[self._page_key.pop(page)], self._refs[page]
                        self.allocator.free([page])
                    pages = shared + self.allocator.allocate(fresh)
                    self._pages[slot] = pages
                    self.block_table[slot, : len(pages)] = torch.tensor(pages, device=self.device)
                for pool in rings:
                    pages = pool.pages[slot] = pool.allocator.allocate(self._pages_needed(request, pool))
                    pool.table[slot] = ring_row(pages, pool.table.shape[1], device=self.device)
                if shared:
                    start = len(shared) * self.page_size
                    request.fed = start
                    self.caches.seqlen_offset[slot] = start
                    for cache in self.caches.values():
                        cache.seqlen_offset[slot] = start
                    self.stats["prefix_hit_tokens"] += start

    def _decode(self, decoding: list[Request], prefilling: list[Request]) -> None:
        rows = [r.slot for r in decoding]
        bucket = next(b for b in self.buckets if b > max(rows))  # slots 0 .. bucket - 1 take the step
        prefilling = [r for r in prefilling if r.slot < bucket]
        keep = torch.tensor([r.slot for r in prefilling], dtype=torch.long, device=self.device)
        saved = [t.index_select(0, keep) for t in self._tensors] if prefilling else None
        if prefilling:
            for pool in self._pools:
                pool.table.index_fill_(0, keep, 0)  # their step writes go to the scratch page
        tokens = self._newest[:bucket, None].clone()
        if self.cuda_graph:
            logits = self._decoder(bucket)(tokens)
        else:
            logits = self.model.step(tokens, _rows_view(self.caches, 0, bucket)).logits[:, -1]
        busy = set(rows) | {r.slot for r in prefilling}
        free = torch.tensor([s for s in range(bucket) if s not in busy], dtype=torch.long, device=self.device)
        for i, t in enumerate(self._tensors):
            if saved is not None:
                t.index_copy_(0, keep, saved[i])
            if free.numel():
                t.index_fill_(0, free, 0)
        for request in decoding:
            self._emit(request, logits[request.slot:request.slot + 1])

    def _emit(self, request: Request, logits: torch.Tensor) -> None:
        """Sample ``request``'s next token from its logits [1, V] and record it."""
        if request.finished:  # cancelled from another thread during this step
            return
        p = request.params
        processed = process_logits(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                                   repetition_penalty=p.repetition_penalty, seen=request.seen)
        token = int(sample(processed, temperature=p.temperature, generator=request.generator)[0])
        if request.seen is not None:
            request.seen[0, token] = True
        request.tokens.append(token)
        self.stats["generated_tokens"] += 1
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        self._newest[request.slot] = token
        if request.on_token is not None:
            request.on_token(request, token)
        if token in p.stop_tokens:
            self._finish(request, "stop")
        elif len(request.tokens) >= p.max_tokens or len(request.prompt) + len(request.tokens) >= self.max_seqlen:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        with self._lock:
            now = self._release(request, reason)
        if now and request.on_token is not None:
            request.on_token(request, -1)

    def _release(self, request: Request, reason: str) -> bool:
        """End ``request`` (its slot and pages go back); False if it had ended already."""
        if request.finished:
            return False
        request.finish_reason = reason
        request.finish_time = time.perf_counter()
        if request.slot is not None and self.slots[request.slot] is request:
            self.slots[request.slot] = None
            for pool in self._pools:
                private = []
                for page in pool.pages.pop(request.slot, []):
                    if pool.ring is None and page in self._refs:  # a cached prefix page: kept for later requests
                        self._refs[page] -= 1
                        if self._refs[page] == 0:
                            self._idle[page] = None
                    else:
                        private.append(page)
                pool.allocator.free(private)
                pool.table[request.slot] = 0
        self.stats["finished"] += 1
        return True
