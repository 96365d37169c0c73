"""Paged attention caches: for every registered mixer with a paged cache (read from the registry),
prefill + steps and chunked prefill through pages in a shuffled order equal the contiguous cache and
the full forward; the engine serves a hybrid model from a page pool smaller than slots x max_seqlen,
each request getting exactly its tokens alone."""

from __future__ import annotations

import pytest
import torch
from test_lm import STAND_INS, no_grad, stand_in_mixers, tiny_lm  # noqa: F401 (fixtures)

from seqblocks import generate
from seqblocks.layers.attention.paged import PageAllocator, PagedKVCache, new_block_table
from seqblocks.layers.build import build_mixer, mixer_config
from seqblocks.registry import MIXERS
from seqblocks.serving import Engine, SamplingParams
from seqblocks.testing import assert_close

D = 16
SMALL = {"sliding_window": {"window_size": 3}, "chunked_gqa": {"attention_chunk_size": 4},
         "mla": {"kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4}}


def paged_mixers() -> list[str]:
    return [n for n in MIXERS.primary_names() if callable(getattr(MIXERS.get(n), "allocate_paged_cache", None))]


def make(name):
    torch.manual_seed(0)
    config = mixer_config(name, D, d_state=4, kwargs=SMALL.get(name))
    return build_mixer(name, config, layer_idx=0, dtype=torch.float64).eval()


def shuffled_table(B, T, page_size, num_pages, seed=0):
    """A block table whose rows own pages in a random, interleaved order."""
    table = new_block_table(B, T, page_size)
    order = torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(seed)) + 1
    n = table.shape[1]
    table[:] = order[: B * n].view(n, B).T
    return table


def test_the_registry_has_paged_attention_variants():
    assert {"mha", "gqa", "mqa", "sliding_window", "chunked_gqa", "mla"} <= set(paged_mixers())
    assert "sparse_gqa" not in paged_mixers()  # its indexer keys stay per slot


@pytest.mark.parametrize("name", paged_mixers())
@pytest.mark.parametrize("page_size", [1, 3])
def test_paged_equals_contiguous_prefill_steps_and_chunks(name, page_size):
    mixer = make(name)
    B, T = 2, 10
    x = torch.randn(B, T, D, dtype=torch.float64)
    full = mixer(x)
    num_pages = B * -(-T // page_size) + 3
    for split in ([4] + [1] * 6, [3, 5, 2]):  # prefill then steps; chunked prefill
        cache = mixer.allocate_paged_cache(shuffled_table(B, T, page_size, num_pages), num_pages, page_size, T)
        outs, t = [], 0
        for n in split:
            outs.append(mixer(x[:, t:t + n], cache))
            t += n
        assert_close(torch.cat(outs, 1), full, atol=1e-10)
        assert cache.seqlen_offset.tolist() == [T, T]


def test_paged_cache_checks_and_allocator():
    mixer = make("gqa")
    table = new_block_table(2, 8, 4)
    cache = mixer.allocate_paged_cache(table, 5, 4, 8)
    assert isinstance(cache, PagedKVCache) and cache.k_pages.shape[0] == 5 and cache.capacity == 8
    with pytest.raises(ValueError, match="batch"):
        mixer(torch.randn(3, 1, D, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match="page_size=0"):
        new_block_table(2, 8, 0)
    alloc = PageAllocator(4)
    pages = alloc.allocate(3)
    assert sorted(pages) == [1, 2, 3] and alloc.num_free == 0
    with pytest.raises(ValueError, match="1 pages asked for, 0 free"):
        alloc.allocate(1)
    alloc.free(pages[:2])
    assert alloc.num_free == 2
    with pytest.raises(ValueError, match="num_pages=1"):
        PageAllocator(1)


@pytest.mark.parametrize("types", [["mamba", "gqa"], ["sbtest_decay", "mla", "sliding_window"]])
def test_engine_with_paged_caches_gives_each_request_its_tokens_alone(types):
    kwargs = {"mla": SMALL["mla"], "sliding_window": SMALL["sliding_window"], "gqa": {"num_heads": 2}}
    model = tiny_lm(types, mixer_kwargs={t: kwargs[t] for t in types if t in kwargs})
    # 3 slots but pages for about 2 requests at a time: admission waits for pages
    engine = Engine(model, max_batch_size=3, max_seqlen=16, prefill_chunk_size=3, page_size=2, num_pages=13)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 37, (n,), generator=g).tolist() for n in (5, 3, 7, 2, 6)]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (6, 4, 5, 3, 6)]
    got = engine.generate(prompts, params)
    for p, s, tokens in zip(prompts, params, got):
        out = generate(model, torch.tensor([p]), s.max_tokens, temperature=0)
        assert tokens == out.tokens[0].tolist()
    assert engine.allocator.num_free == 12 and (engine.block_table == 0).all()  # every page back
    small = Engine(model, max_batch_size=2, max_seqlen=16, page_size=2, num_pages=5)
    with pytest.raises(ValueError, match="needs 8 pages of 2 positions, the pool has 4"):
        small.add_request(list(range(10)), SamplingParams(max_tokens=5))


def test_prefix_caching_reuses_whole_prompt_pages_and_stays_exact():
    model = tiny_lm(["gqa", "mla"], mixer_kwargs={"gqa": {"num_heads": 2}, "mla": SMALL["mla"]})
    engine = Engine(model, max_batch_size=2, max_seqlen=24, prefill_chunk_size=4, page_size=3, num_pages=12,
                    prefix_caching=True)
    system = [5, 9, 2, 7, 7, 1, 3]  # a shared "system prompt": two whole pages of 3
    prompts = [system + [4, 8], system + [6], system[:5] + [11, 12], system + [4, 8], [1, 2, 3, 4]]
    params = SamplingParams(max_tokens=4, temperature=0)
    first = engine.generate(prompts[:1], params)
    got = first + engine.generate(prompts[1:], params)
    for p, tokens in zip(prompts, got):
        assert tokens == generate(model, torch.tensor([p]), 4, temperature=0).tokens[0].tolist()
    # the later requests skipped 6 + 3 + 6 prefix tokens (system[:5] shares one whole page only)
    assert engine.stats["prefix_hit_tokens"] == 15
    assert engine.allocator.num_free + len(engine._idle) == 11  # every page free or cached-and-unused
    # a pool too small for everything evicts the unused cached pages
    many = [[20 + i, 21 + i, 22 + i, 23 + i, 24 + i, 25 + i, 1] for i in range(6)]
    for p, tokens in zip(many, engine.generate(many, params)):
        assert tokens == generate(model, torch.tensor([p]), 4, temperature=0).tokens[0].tolist()


def test_prefix_caching_needs_every_layer_paged():
    model = tiny_lm(["mamba", "gqa"], mixer_kwargs={"gqa": {"num_heads": 2}})
    with pytest.raises(ValueError, match="every layer's cache is paged"):
        Engine(model, page_size=4, prefix_caching=True)
    with pytest.raises(ValueError, match="page_size"):
        Engine(model, prefix_caching=True)


def test_all_windowed_model_serves_requests_longer_than_its_pool():
    """Sliding-window and chunked attention only: each request holds a ring of window + chunk positions,
    so requests whose prompt + max_tokens would need 11-12 pages run from a pool of 8, two at a time."""
    kwargs = {"sliding_window": {"window_size": 3, "num_heads": 2}, "chunked_gqa": {"attention_chunk_size": 4}}
    model = tiny_lm(["sliding_window", "chunked_gqa"], mixer_kwargs=kwargs)
    engine = Engine(model, max_batch_size=3, max_seqlen=32, prefill_chunk_size=3, page_size=2, num_window_pages=9)
    ring = 3  # ring_pages(window=4 (the larger), page_size=2, max_write=3)
    assert engine.allocator is None and engine._pools[0].ring == ring
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 37, (n,), generator=g).tolist() for n in (9, 6, 8, 7)]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (14, 16, 13, 15)]
    assert all(-(-(len(p) + s.max_tokens) // 2) > 8 for p, s in zip(prompts, params))  # none fits unreleased
    got = engine.generate(prompts, params)
    for p, s, tokens in zip(prompts, params, got):
        assert tokens == generate(model, torch.tensor([p]), s.max_tokens, temperature=0).tokens[0].tolist()
    assert engine.window_allocator.num_free == 8 and (engine.window_table == 0).all()
    # a request no longer than a ring holds only its own pages
    short = engine.add_request([1, 2], SamplingParams(max_tokens=2, temperature=0))
    engine.step()
    assert len(engine._pools[0].pages[short.slot]) == 2
    engine.run()


def test_hybrid_of_global_and_window_layers_stays_exact():
    """Global GQA keeps every page (its own pool), the window layer a ring (its pool), Mamba its slot rows."""
    kwargs = {"gqa": {"num_heads": 2}, "sliding_window": {"window_size": 3, "num_heads": 2}}
    model = tiny_lm(["gqa", "sliding_window", "mamba"], mixer_kwargs=kwargs)
    engine = Engine(model, max_batch_size=3, max_seqlen=24, prefill_chunk_size=4, page_size=2, num_pages=25,
                    num_window_pages=10)
    window = engine.caches[1]
    assert window.block_table is engine.window_table and engine.caches[0].block_table is engine.block_table
    assert window.k_pages.shape[0] == 10 and window.max_write == 4
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 37, (n,), generator=g).tolist() for n in (5, 3, 7, 2, 6)]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (9, 12, 7, 14, 10)]
    got = engine.generate(prompts, params)
    for p, s, tokens in zip(prompts, params, got):
        assert tokens == generate(model, torch.tensor([p]), s.max_tokens, temperature=0).tokens[0].tolist()
    assert engine.allocator.num_free == 24 and engine.window_allocator.num_free == 9
    # prefix caching pages the window layer with the global ones (a ring cannot be shared)
    cached = Engine(tiny_lm(["gqa", "sliding_window"], mixer_kwargs=kwargs), page_size=2, prefix_caching=True)
    assert cached.window_table is None and cached.caches[1].block_table is cached.block_table


def test_window_pool_options_are_checked():
    windowed = tiny_lm(["sliding_window"], mixer_kwargs={"sliding_window": {"window_size": 3}})
    with pytest.raises(ValueError, match="num_pages=9 sizes the pool of the layers that keep every position"):
        Engine(windowed, page_size=2, num_pages=9)
    with pytest.raises(ValueError, match="no paged sliding-window layer"):
        Engine(tiny_lm(["gqa"], mixer_kwargs={"gqa": {"num_heads": 2}}), page_size=2, num_window_pages=9)
    with pytest.raises(ValueError, match="need page_size"):
        Engine(windowed, num_window_pages=9)
    small = Engine(windowed, max_seqlen=32, prefill_chunk_size=4, page_size=2, num_window_pages=3)
    with pytest.raises(ValueError, match=r"needs 3 pages of 2 positions, the sliding-window pool \(num_window_pages\) "
                                         r"has 2"):
        small.add_request(list(range(10)), SamplingParams(max_tokens=5))
