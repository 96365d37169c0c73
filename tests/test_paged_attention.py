"""Paged decode attention (``seqblocks.ops.attention.paged``) on the CPU: the reference equals attention
over the contiguous keys (gathered position by position, run through the ``standard`` backend) for GQA /
MQA, windows, softcap, padding, ragged lengths and a few queries per row, forward and backward; the
attention layers' decode path through a paged cache (which takes the op) equals contiguous decoding for
every variant in fp32 and bf16; a sliding-window layer on a ring of pages equals the full forward. The
Triton kernel's cases are in ``test_paged_attention_triton.py``.

Shapes: B batch, H query heads, Hkv key/value heads, Tq queries, K head width, N page_size, P pages.
"""

from __future__ import annotations

import pytest
import torch

import seqblocks.layers.attention.mha as mha_module
from seqblocks import MHA
from seqblocks.layers.attention.paged import new_block_table, ring_pages, ring_row
from seqblocks.layers.attention.score_mods import soft_cap
from seqblocks.ops.attention import attention
from seqblocks.ops.attention.paged import paged_attention, paged_attention_reference
from seqblocks.testing import assert_close


def paged_inputs(B, H, Hkv, Tq, K, N, lens, *, dtype=torch.float64, padding=0.0, seed=0):
    """Queries, pools with pages in a random order, a block table, row lengths and validity."""
    g = torch.Generator().manual_seed(seed)
    max_pages = -(-max(lens) // N) + 1
    P = B * max_pages + 3
    q = torch.randn(B, H, Tq, K, generator=g, dtype=torch.float64).to(dtype)
    k_pages = torch.randn(P, Hkv, N, K, generator=g, dtype=torch.float64).to(dtype)
    v_pages = torch.randn(P, Hkv, N, K + 3, generator=g, dtype=torch.float64).to(dtype)  # V != K
    table = (torch.randperm(P - 1, generator=g)[: B * max_pages] + 1).view(B, max_pages)
    valid = torch.rand(P, N, generator=g) >= padding
    return q, k_pages, v_pages, table, torch.tensor(lens), valid


def contiguous_attention(q, k_pages, v_pages, table, lens, valid, *, window=None, softcap=None, scale=None):
    """The same attention through the ``standard`` backend on keys copied out position by position."""
    B, _, Tq, _ = q.shape
    N = k_pages.shape[2]
    S = table.shape[1] * N
    k = torch.stack([torch.stack([k_pages[table[b, p // N], :, p % N] for p in range(S)], 1) for b in range(B)])
    v = torch.stack([torch.stack([v_pages[table[b, p // N], :, p % N] for p in range(S)], 1) for b in range(B)])
    ok = torch.stack([torch.stack([valid[table[b, p // N], p % N] for p in range(S)]) for b in range(B)])
    ok = ok & (torch.arange(S)[None] < lens[:, None])
    q_pos = lens[:, None] - Tq + torch.arange(Tq)
    return attention(q, k, v, causal=True, window=window, scale=scale, q_positions=q_pos, key_valid=ok,
                     score_mod=None if softcap is None else soft_cap(softcap), backend="standard")


@pytest.mark.parametrize(("H", "Hkv"), [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (4, None), (None, 2.0), (5, 3.0)])
def test_reference_equals_attention_on_contiguous_keys(H, Hkv, Tq, window, softcap):
    lens = [1, 7, 12, 3] if Tq == 1 else [3, 7, 12, 5]
    args = paged_inputs(4, H, Hkv, Tq, 8, 4, lens, padding=0.2)
    want = contiguous_attention(*args, window=window, softcap=softcap, scale=0.3)
    q, kp, vp, table, seq_lens, valid = args
    got = paged_attention(q, kp, vp, table, seq_lens, valid_pages=valid, window=window, softcap=softcap, scale=0.3)
    assert got.shape == (4, H, Tq, 11) and got.dtype == torch.float64
    assert_close(got, want, atol=1e-12)
    # max_seqlen only bounds the positions read
    bounded = paged_attention(q, kp, vp, table, seq_lens, valid_pages=valid, window=window, softcap=softcap,
                              scale=0.3, max_seqlen=12)
    assert_close(bounded, want, atol=1e-12)


def test_empty_rows_give_zero_and_bf16_accumulates_in_fp32():
    q, kp, vp, table, lens, valid = paged_inputs(3, 4, 2, 1, 16, 8, [5, 9, 1])
    valid[table[2, 0], 0] = False  # row 2's only key is padding: its query sees nothing
    out = paged_attention(q, kp, vp, table, lens, valid_pages=valid)
    assert (out[2] == 0).all() and out[:2].abs().sum() > 0
    wide = paged_attention_reference(q, kp, vp, table, lens, valid_pages=valid)
    half = paged_attention(q.bfloat16(), kp.bfloat16(), vp.bfloat16(), table, lens, valid_pages=valid)
    assert half.dtype == torch.bfloat16
    assert_close(half, wide, atol=3e-2)
    # pools in another dtype than q are read in q's dtype (as the gather path casts them)
    mixed = paged_attention(q.float(), kp.bfloat16(), vp.bfloat16(), table, lens, valid_pages=valid)
    assert mixed.dtype == torch.float32
    assert_close(mixed, paged_attention(q.float(), kp.bfloat16().float(), vp.bfloat16().float(), table, lens,
                                        valid_pages=valid), atol=1e-6)


def test_gradients_equal_attention_on_contiguous_keys():
    q, kp, vp, table, lens, valid = paged_inputs(2, 4, 2, 2, 8, 4, [6, 11], padding=0.1)
    leaves = [t.clone().requires_grad_() for t in (q, kp, vp)]
    out = paged_attention(*leaves, table, lens, valid_pages=valid, window=5, softcap=4.0)
    cot = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, cot)
    wide = [t.clone().requires_grad_() for t in (q, kp, vp)]
    want = contiguous_attention(*wide, table, lens, valid, window=5, softcap=4.0)
    grads_want = torch.autograd.grad(want, wide, cot)
    for name, g, gw in zip(("q", "k_pages", "v_pages"), grads, grads_want):
        assert_close(g, gw, atol=1e-12, msg=f"d{name}")


def test_errors_name_the_bad_argument():
    q, kp, vp, table, lens, valid = paged_inputs(2, 4, 2, 1, 8, 4, [3, 5])
    with pytest.raises(ValueError, match="not a multiple of 3"):
        paged_attention(q, kp[:, :1].expand(-1, 3, -1, -1), vp[:, :1].expand(-1, 3, -1, -1), table, lens)
    with pytest.raises(ValueError, match="head width 8 differs"):
        paged_attention(q, kp[..., :4], vp, table, lens)
    with pytest.raises(TypeError, match="block_table must be a 2-D integer"):
        paged_attention(q, kp, vp, table.float(), lens)
    with pytest.raises(ValueError, match="batch size 2"):
        paged_attention(q, kp, vp, table, lens[:1])
    with pytest.raises(ValueError, match="valid_pages must be a bool"):
        paged_attention(q, kp, vp, table, lens, valid_pages=valid.float())
    with pytest.raises(ValueError, match="window=0"):
        paged_attention(q, kp, vp, table, lens, window=0)
    with pytest.raises(ValueError, match="softcap=-1"):
        paged_attention(q, kp, vp, table, lens, softcap=-1.0)
    with pytest.raises(ValueError, match=r"max_seqlen=99 must be an int in \[1, 12\]"):
        paged_attention(q, kp, vp, table, lens, max_seqlen=99)
    with pytest.raises(ValueError, match="num_splits=0"):
        paged_attention(q, kp, vp, table, lens, num_splits=0)
    with pytest.raises(TypeError, match="q must be floating point"):
        paged_attention(q.long(), kp, vp, table, lens)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        paged_attention(q, kp, vp, table, lens, backend="fast")
    with pytest.raises(ValueError, match="forward-only"):
        paged_attention(q.requires_grad_(), kp, vp, table, lens, backend="triton")


# ----------------------------------------------------------------------------- the attention layers

D = 32
VARIANTS = {
    "mha": dict(num_heads=4),
    "gqa": dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=4),
    "mqa": dict(num_heads=4, num_heads_kv=1),
    "sliding_window": dict(num_heads=4, num_heads_kv=2, window_size=4),
    "softcap": dict(num_heads=4, num_heads_kv=2, softcap=1.5, qk_norm=True),
}


def shuffled_table(B, T, N, num_pages, seed=0):
    table = new_block_table(B, T, N)
    order = torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(seed)) + 1
    table[:] = order[: table.numel()].view(table.shape[1], B).T
    return table


@pytest.fixture
def paged_calls(monkeypatch):
    """The layers take ``paged_attention`` for paged caches as where its kernel runs (on the CPU: its
    reference); counts their calls by their number of queries."""
    calls = []

    def spy(q, *args, **kwargs):
        calls.append(q.shape[2])
        return paged_attention(q, *args, **kwargs)

    monkeypatch.setattr(mha_module, "paged_attention", spy)
    # page pools only: a contiguous cache (rows of S >= 8 slots here; pages hold 3 or 4) keeps SDPA, so the
    # tests compare the two designs (its in-place reading is tested on the kernel, test_paged_attention_triton)
    monkeypatch.setattr(mha_module, "paged_kernel_runs", lambda q, k_pages, v_pages: k_pages.shape[2] <= 4)
    return calls


def test_on_the_cpu_the_layers_gather(monkeypatch):
    """Where the kernel does not run, the gather and SDPA's fused kernel beat the op's reference."""
    mixer = MHA(D, num_heads=4).eval()
    cache = mixer.allocate_paged_cache(shuffled_table(2, 8, 4, 6), 6, 4, 8)
    calls = []
    monkeypatch.setattr(mha_module, "paged_attention", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        mixer(torch.randn(2, 3, D), cache)
        mixer(torch.randn(2, 1, D), cache)
    assert calls == []


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [3, 4])
def test_layer_paged_decode_equals_contiguous_decode(name, dtype, page_size, paged_calls):
    """Ragged prefill (lengths), one-token steps and a three-token step through pages in a random order
    give the contiguous cache's outputs; decode-shaped calls read the pages in place."""
    torch.manual_seed(0)
    mixer = MHA(D, **VARIANTS[name], dtype=dtype).eval()
    B, T = 3, 14
    x = torch.randn(B, T, D).to(dtype)
    lengths = torch.tensor([5, 2, 7])
    num_pages = B * -(-T // page_size) + 2
    contiguous = mixer.allocate_inference_cache(B, T)
    paged = mixer.allocate_paged_cache(shuffled_table(B, T, page_size, num_pages), num_pages, page_size, T)
    outs = {}
    with torch.no_grad():
        for key, cache in (("contiguous", contiguous), ("paged", paged)):
            ys = [mixer(x[:, :7], cache, lengths=lengths)]
            t = 7
            for n in (1, 1, 1, 3, 1):
                ys.append(mixer(x[:, t:t + n], cache))
                t += n
            outs[key] = torch.cat(ys, 1)
    assert paged.seqlen_offset.tolist() == (lengths + 7).tolist()
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_close(outs["paged"], outs["contiguous"], atol=atol, msg=name)
    assert paged_calls == [7, 1, 1, 1, 3, 1]  # every call (at most PAGED_MAX_QUERIES queries) read in place


def test_layer_keeps_the_gather_path_for_what_the_op_lacks(paged_calls):
    mixer = MHA(D, num_heads=4, attention_type="standard").eval()
    cache = mixer.allocate_paged_cache(shuffled_table(2, 8, 4, 6), 6, 4, 8)
    with torch.no_grad():
        mixer(torch.randn(2, 3, D), cache)
        mixer(torch.randn(2, 1, D), cache)
    assert paged_calls == []  # an explicit backend is honoured


def run_on_ring(mixer, x, W, N, max_write, R):
    """x through a paged cache whose two rows own rings of R pages, in calls of 1 .. max_write tokens."""
    B, T, _ = x.shape
    table = new_block_table(B, T, N)
    table[0] = ring_row(list(range(1, R + 1)), table.shape[1])
    table[1] = ring_row(list(range(2 * R, R, -1)), table.shape[1])
    cache = mixer.allocate_paged_cache(table, 2 * R + 1, N, T)
    ys, t, i = [], 0, 0
    with torch.no_grad():
        while t < T:  # full calls at shifting offsets: max_write, 1, max_write, 2, ...
            n = min(T - t, max_write if i % 2 else 1 + (i // 2) % max_write)
            ys.append(mixer(x[:, t:t + n], cache))
            t, i = t + n, i + 1
    return torch.cat(ys, 1), cache


@pytest.mark.parametrize(("W", "N", "max_write"), [(5, 2, 1), (5, 2, 3), (6, 4, 1), (4, 3, 4)])
def test_sliding_window_layer_on_a_ring_equals_the_full_forward(W, N, max_write):
    """A ring of ring_pages(window, N, max_write) pages per row, reused as the row grows, gives exactly the
    outputs of keeping every page (the full forward), for chunks of up to max_write tokens; one page
    fewer does not (the bound is tight)."""
    torch.manual_seed(0)
    T = 29
    mixer = MHA(D, num_heads=4, num_heads_kv=2, window_size=W, dtype=torch.float64).eval()
    x = torch.randn(2, T, D, dtype=torch.float64)
    R = ring_pages(W, N, max_write)
    assert R == -(-(W + max_write - 1) // N) and R * N < T  # the ring wraps
    with torch.no_grad():
        full = mixer(x)
    out, cache = run_on_ring(mixer, x, W, N, max_write, R)
    assert_close(out, full, atol=1e-10)
    short, _ = run_on_ring(mixer, x, W, N, max_write, R - 1)
    assert (short - full).abs().max() > 1e-3
    cache.reset()
    cache.max_write = max_write
    with pytest.raises(ValueError, match=f"at most {max_write}"):
        mixer(x[:, : max_write + 1], cache)
    with pytest.raises(ValueError, match="max_write=0"):
        ring_pages(W, N, 0)
    with pytest.raises(ValueError, match="at least one page"):
        ring_row([], 4)
