"""Attention options of issue 17: QK-norm, chunked local attention, top-k sparse attention, soft-capping,
the sliding_window_gqa alias, the gated_relu2 FFN and the presets built from them.

Each layer is checked against an explicit computation written here (a dense softmax attention over a
boolean mask built in the test), under the cache (prefill + steps == full), with gradients and in bf16.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqblocks import BlockConfig, ConfigurableBlock, LRNNLMHeadModel, generate
from seqblocks.layers.attention import GQA, ChunkedGQA, RollingKVCache, SparseGQA, SparseKVCache
from seqblocks.layers.build import build_mixer, mixer_config
from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig
from seqblocks.presets import build_model, load_config
from seqblocks.registry import FFNS, MIXERS
from seqblocks.testing import assert_close, check_chunked_prefill, check_prefill_then_steps

D = 16
F64 = torch.float64


def _qkv(mixer, x):
    """q [B, H, T, K], k / v [B, Hkv, T, K] exactly as written out in the papers: projection, per-head
    QK-norm (x / rms(x) * w), then RoPE at positions 0..T-1."""
    B, T, _ = x.shape
    H, Hkv, K = mixer.num_heads, mixer.num_heads_kv, mixer.head_dim
    q, k, v = (x @ mixer.in_proj.weight.T + mixer.in_proj.bias).split((H * K, Hkv * K, Hkv * K), -1)
    q, k, v = q.view(B, T, H, K), k.view(B, T, Hkv, K), v.view(B, T, Hkv, K)
    if mixer.q_norm is not None:
        eps = mixer.q_norm.eps
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + eps) * mixer.q_norm.weight
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps) * mixer.k_norm.weight
    if mixer.rotary is not None:
        pos = torch.arange(T)
        q, k = mixer.rotary.rotate(q, pos), mixer.rotary.rotate(k, pos)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _dense(mixer, x, allowed, softcap=None):
    """softmax(cap(q k^T / sqrt(K)) masked to ``allowed`` [B or 1, T, T]) v, then the output projection."""
    q, k, v = _qkv(mixer, x)
    rep = mixer.num_heads // mixer.num_heads_kv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(mixer.head_dim)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(s, -1) @ v  # [B, H, T, K]
    B, _, T, _ = out.shape
    return mixer.out_proj(out.transpose(1, 2).reshape(B, T, -1))


def _causal(T):
    i = torch.arange(T)
    return (i[:, None] >= i[None, :])[None]


def _chunked(T, C):
    i = torch.arange(T)
    return ((i[:, None] >= i[None, :]) & (i[:, None] // C == i[None, :] // C))[None]


@torch.no_grad()
def _explicit_top_k(mixer, x, visible):
    """The sparse layer's selection, computed one query at a time: the indexer score of every visible key,
    sorted, the first k kept."""
    B, T, _ = x.shape
    J, E = mixer.indexer_heads, mixer.indexer_dim
    iq = (x @ mixer.indexer_q.weight.T).view(B, T, J, E)
    ik = x @ mixer.indexer_k.weight.T
    iw = (x @ mixer.indexer_w.weight.T) / math.sqrt(J * E)
    chosen = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            keys = [s for s in range(T) if visible[b if visible.shape[0] > 1 else 0, t, s]]
            score = {s: sum(float(iw[b, t, j]) * max(float(iq[b, t, j] @ ik[b, s]), 0.0) for j in range(J))
                     for s in keys}
            for s in sorted(keys, key=lambda s: (-score[s], -s))[: mixer.sparse_select_k]:  # ties: later key
                chosen[b, t, s] = True
    return chosen


def _randomise_norms(mixer):
    with torch.no_grad():
        for norm in (mixer.q_norm, mixer.k_norm):
            norm.weight.uniform_(0.5, 1.5)


# ---- QK-norm and soft-capping -------------------------------------------------------------------------


def test_qk_norm_matches_the_formula_and_comes_before_rope():
    torch.manual_seed(0)
    mixer = GQA(D, num_heads=4, num_heads_kv=2, qk_norm=True, rotary_emb_dim=4, dtype=F64)
    _randomise_norms(mixer)
    assert mixer.q_norm.weight.shape == (4,) and mixer.k_norm.weight.shape == (4,)  # one weight per head_dim
    x = torch.randn(2, 9, D, dtype=F64)
    assert_close(mixer(x), _dense(mixer, x, _causal(9)), atol=1e-10)
    check_prefill_then_steps(mixer, x, prefill=4, atol=1e-10)


def test_qk_norm_from_block_config_uses_norm_eps():
    block = ConfigurableBlock(BlockConfig(attention="gqa", d_model=D, n_heads=4, n_kv_heads=2, qk_norm=True,
                                          norm_eps=1e-6, position="rope", d_ff=32))
    assert block.attention.q_norm.eps == 1e-6 and block.attention.k_norm is not None
    assert GQA(D, num_heads=4).q_norm is None  # off by default


def test_attention_softcap_matches_the_formula():
    torch.manual_seed(1)
    mixer = GQA(D, num_heads=2, softcap=2.0, dtype=F64)
    with torch.no_grad():
        mixer.in_proj.weight.mul_(6.0)  # scores well past the cap, so tanh bends them
    x = torch.randn(2, 8, D, dtype=F64)
    expected = _dense(mixer, x, _causal(8), softcap=2.0)
    assert_close(mixer(x), expected, atol=1e-10)
    assert (mixer(x) - _dense(mixer, x, _causal(8))).abs().max() > 1e-3  # the cap changed something
    check_prefill_then_steps(mixer, x, prefill=3, atol=1e-10)


def test_final_logit_softcap_matches_the_formula():
    torch.manual_seed(2)
    kwargs = dict(d_model=D, d_state=4, n_layer=1, vocab_size=11, mixer_types=["attn"], dtype=F64)
    plain = LRNNLMHeadModel(**kwargs).eval()
    capped = LRNNLMHeadModel(**kwargs, final_logit_softcapping=0.05).eval()
    capped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 11, (2, 6))
    base = plain(ids).logits
    assert_close(capped(ids).logits, 0.05 * torch.tanh(base / 0.05), atol=1e-12)
    assert capped(ids).logits.abs().max() < 0.05
    assert capped.config.final_logit_softcapping == 0.05
    config = LanguageModelConfig.from_pattern(["gqa"], vocab_size=11, d_model=D, final_logit_softcapping=3.0)
    assert LanguageModelConfig.from_json(config.to_json()) == config


# ---- chunked attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 3, 4])
def test_chunked_matches_an_explicit_chunk_mask(C):
    torch.manual_seed(3)
    mixer = ChunkedGQA(D, num_heads=4, num_heads_kv=2, attention_chunk_size=C, rotary_emb_dim=4, qk_norm=True,
                       dtype=F64)
    _randomise_norms(mixer)
    x = torch.randn(2, 11, D, dtype=F64)
    assert_close(mixer(x), _dense(mixer, x, _chunked(11, C)), atol=1e-10)


def test_chunked_under_the_cache_keeps_only_a_chunk():
    torch.manual_seed(4)
    mixer = ChunkedGQA(D, num_heads=2, attention_chunk_size=3, rotary_emb_dim=8, softcap=4.0, dtype=F64)
    x = torch.randn(2, 13, D, dtype=F64)
    cache = mixer.allocate_inference_cache(2, 13)
    assert isinstance(cache, RollingKVCache) and cache.k.shape[2] == 3  # O(chunk) memory
    for prefill in (1, 3, 5):
        check_prefill_then_steps(mixer, x, prefill=prefill, atol=1e-10)
    for split in (2, 3, 7):
        check_chunked_prefill(mixer, x, split=split, atol=1e-10)


def test_chunked_with_packed_documents():
    torch.manual_seed(5)
    mixer = ChunkedGQA(D, num_heads=2, attention_chunk_size=4, dtype=F64)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2], [0] * 5 + [1] * 5])
    same_doc = doc[:, :, None] == doc[:, None, :]  # [B, T, T]
    x = torch.randn(2, 10, D, dtype=F64)
    assert_close(mixer(x, mask=same_doc), _dense(mixer, x, _chunked(10, 4) & same_doc), atol=1e-10)


def test_chunked_from_block_config_and_the_config_path():
    config = mixer_config("chunked_gqa", D, kwargs={"attention_chunk_size": 5, "num_heads": 2})
    mixer = build_mixer("chunked_gqa", config)
    assert isinstance(mixer, ChunkedGQA) and mixer.attention_chunk_size == 5
    block = ConfigurableBlock(BlockConfig(attention="chunked_gqa", attention_chunk_size=3, d_model=D, n_heads=2,
                                          position="rope", d_ff=32))
    assert block.attention.attention_chunk_size == 3


# ---- sparse attention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_sparse_matches_the_explicit_top_k_mask(k):
    torch.manual_seed(6)
    mixer = SparseGQA(D, num_heads=4, num_heads_kv=2, sparse_select_k=k, indexer_heads=3, indexer_dim=6,
                      rotary_emb_dim=4, qk_norm=True, dtype=F64)
    _randomise_norms(mixer)
    x = torch.randn(2, 9, D, dtype=F64)
    chosen = _explicit_top_k(mixer, x, _causal(9))
    assert chosen.sum(-1).tolist() == [[min(t + 1, k) for t in range(9)]] * 2
    assert_close(mixer(x), _dense(mixer, x, chosen), atol=1e-10)


def test_sparse_ties_go_to_the_latest_keys_so_an_idle_indexer_is_a_sliding_window():
    torch.manual_seed(14)
    sparse = SparseGQA(D, num_heads=2, sparse_select_k=3, dtype=F64)
    with torch.no_grad():
        sparse.indexer_w.weight.zero_()  # every score is exactly 0: all ties
    window = MIXERS.get("sliding_window")(D, num_heads=2, window_size=3, dtype=F64)
    window.load_state_dict(sparse.state_dict(), strict=False)
    x = torch.randn(2, 10, D, dtype=F64)
    assert_close(sparse(x), window(x), atol=1e-10)
    check_prefill_then_steps(sparse, x, prefill=2, atol=1e-10)


def test_sparse_with_k_at_least_t_is_dense_causal_attention():
    torch.manual_seed(7)
    sparse = SparseGQA(D, num_heads=2, sparse_select_k=8, dtype=F64)
    dense = GQA(D, num_heads=2, dtype=F64)
    dense.load_state_dict(sparse.state_dict(), strict=False)
    x = torch.randn(2, 8, D, dtype=F64)
    assert_close(sparse(x), dense(x), atol=1e-10)


def test_sparse_under_the_cache_caches_the_indexer_keys():
    torch.manual_seed(8)
    mixer = SparseGQA(D, num_heads=2, sparse_select_k=3, indexer_heads=2, rotary_emb_dim=8, softcap=3.0, dtype=F64)
    x = torch.randn(2, 12, D, dtype=F64)
    cache = mixer.allocate_inference_cache(2, 12)
    assert isinstance(cache, SparseKVCache) and cache.index_k.shape == (2, 12, mixer.indexer_dim)
    mixer(x[:, :5], cache)
    assert_close(cache.index_k[:, :5], x[:, :5] @ mixer.indexer_k.weight.T, atol=1e-12)
    for prefill in (1, 4):
        check_prefill_then_steps(mixer, x, prefill=prefill, atol=1e-10)
    check_chunked_prefill(mixer, x, split=6, atol=1e-10)


def test_sparse_with_packed_documents_selects_within_the_document():
    torch.manual_seed(9)
    mixer = SparseGQA(D, num_heads=2, sparse_select_k=2, dtype=F64)
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    same_doc = doc[:, :, None] == doc[:, None, :]
    x = torch.randn(1, 9, D, dtype=F64)
    visible = _causal(9) & same_doc
    chosen = _explicit_top_k(mixer, x, visible)
    assert not (chosen & ~same_doc).any()
    assert_close(mixer(x, mask=same_doc), _dense(mixer, x, chosen), atol=1e-10)


def test_sparse_from_block_config():
    block = ConfigurableBlock(BlockConfig(attention="sparse_gqa", sparse_select_k=4, d_model=D, n_heads=2,
                                          position="rope", d_ff=32, mixer_kwargs={"indexer_heads": 2}))
    assert block.attention.sparse_select_k == 4 and block.attention.indexer_heads == 2
    y, _ = block(torch.randn(2, 6, D))
    assert y.shape == (2, 6, D)


def _branch(mixer, q, k, v, allowed):
    """softmax(q k^T / sqrt(K) masked to ``allowed`` [B, Tq, Tk]) v per head [B, H, Tq, K]; a query that
    sees no key gets 0."""
    rep = mixer.num_heads // mixer.num_heads_kv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2) / math.sqrt(mixer.head_dim)).masked_fill(~allowed[:, None], float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1)) @ v


@torch.no_grad()
def _three_branches(mixer, x):
    """The three-branch layer written out: top-k selection + mean-pooled compressed blocks of the
    pre-RoPE keys (seen once complete) + a sliding window, summed, then the output projection."""
    B, T, _ = x.shape
    H, Hkv, K = mixer.num_heads, mixer.num_heads_kv, mixer.head_dim
    r, w = mixer.sparse_compress_ratio, mixer.window_size
    q, k, v = _qkv(mixer, x)
    assert mixer.rotary is not None
    mixer.rotary_emb, saved = None, mixer.rotary_emb  # the same projections without RoPE: the pre-RoPE keys
    _, raw_k, _ = _qkv(mixer, x)
    mixer.rotary_emb = saved
    out = _branch(mixer, q, k, v, _explicit_top_k(mixer, x, _causal(T)))
    i = torch.arange(T)
    out = out + _branch(mixer, q, k, v, ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < w))[None])
    n = T // r
    pooled_k = torch.stack([raw_k[:, :, j * r:(j + 1) * r].mean(2) for j in range(n)], 2)  # [B, Hkv, n, K]
    pooled_v = torch.stack([v[:, :, j * r:(j + 1) * r].mean(2) for j in range(n)], 2)
    ck = mixer.compress_k(pooled_k.transpose(1, 2).reshape(B, n, Hkv * K)).view(B, n, Hkv, K).transpose(1, 2)
    cv = mixer.compress_v(pooled_v.transpose(1, 2).reshape(B, n, Hkv * K)).view(B, n, Hkv, K).transpose(1, 2)
    ready = torch.tensor([[(j + 1) * r - 1 <= t for j in range(n)] for t in range(T)])[None]
    out = out + _branch(mixer, q, ck, cv, ready)
    return mixer.out_proj(out.transpose(1, 2).reshape(B, T, H * K))


def _three_branch_layer(**kwargs):
    mixer = SparseGQA(D, num_heads=4, num_heads_kv=2, sparse_select_k=2, sparse_compress_ratio=3, window_size=4,
                      indexer_heads=2, rotary_emb_dim=4, qk_norm=True, dtype=F64, **kwargs)
    _randomise_norms(mixer)
    return mixer


def test_sparse_three_branches_match_the_written_out_layer():
    torch.manual_seed(15)
    mixer = _three_branch_layer()
    x = torch.randn(2, 11, D, dtype=F64)
    assert_close(mixer(x), _three_branches(mixer, x), atol=1e-10)
    plain = SparseGQA(D, num_heads=4, num_heads_kv=2, sparse_select_k=2, indexer_heads=2, rotary_emb_dim=4,
                      qk_norm=True, dtype=F64)
    plain.load_state_dict(mixer.state_dict(), strict=False)
    assert (mixer(x) - plain(x)).abs().max() > 1e-3  # the branches add something


def test_sparse_three_branches_under_the_cache_and_causal():
    torch.manual_seed(16)
    mixer = _three_branch_layer()
    x = torch.randn(2, 13, D, dtype=F64)
    cache = mixer.allocate_inference_cache(2, 13)
    assert cache.raw_k is not None and cache.raw_k.shape == cache.k.shape
    for prefill in (1, 5):
        check_prefill_then_steps(mixer, x, prefill=prefill, atol=1e-10)
    check_chunked_prefill(mixer, x, split=7, atol=1e-10)
    changed = x.clone()
    changed[:, 8:] = torch.randn(2, 5, D, dtype=F64)
    assert_close(mixer(changed)[:, :8], mixer(x)[:, :8], atol=1e-12)  # no block or key leaks a future token
    assert SparseGQA(D, num_heads=2, sparse_select_k=2).allocate_inference_cache(1, 4).raw_k is None


def test_sparse_compressed_blocks_never_straddle_packed_documents():
    torch.manual_seed(17)
    mixer = SparseGQA(D, num_heads=2, sparse_select_k=1, sparse_compress_ratio=3, dtype=F64)
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])  # block [3, 6) holds tokens of both documents
    x = torch.randn(1, 10, D, dtype=F64)
    same = doc[:, :, None] == doc[:, None, :]
    y = mixer(x, mask=same)
    changed = x.clone()
    changed[:, :4] = torch.randn(1, 4, D, dtype=F64)  # the first document only
    assert_close(mixer(changed, mask=same)[:, 4:], y[:, 4:], atol=1e-12)


def test_sparse_three_branches_from_block_config_and_gradients():
    block = ConfigurableBlock(BlockConfig(attention="sparse_gqa", sparse_select_k=2, sparse_compress_ratio=2,
                                          window_size=3, d_model=D, n_heads=2, position="rope", d_ff=32))
    mixer = block.attention
    assert (mixer.sparse_compress_ratio, mixer.window_size) == (2, 3)
    x = torch.randn(2, 7, D, requires_grad=True)
    y, _ = block(x)
    y.square().sum().backward()
    for name in ("compress_k", "compress_v"):
        assert getattr(mixer, name).weight.grad.abs().sum() > 0, name


# ---- gradients, bf16 ------------------------------------------------------------------------------------


def _layers():
    torch.manual_seed(10)
    return {
        "chunked": ChunkedGQA(D, num_heads=2, attention_chunk_size=3, qk_norm=True, rotary_emb_dim=8, softcap=5.0),
        "sparse": SparseGQA(D, num_heads=2, sparse_select_k=2, qk_norm=True, rotary_emb_dim=8),
        "qk_norm": GQA(D, num_heads=4, num_heads_kv=2, qk_norm=True, rotary_emb_dim=4),
    }


@pytest.mark.parametrize("name", ["chunked", "sparse", "qk_norm"])
def test_gradients_reach_every_trained_parameter(name):
    mixer = _layers()[name]
    x = torch.randn(2, 7, D, requires_grad=True)
    mixer(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        if pname.startswith("indexer_"):
            # top-k selection is piecewise constant: the LM loss gives the indexer no gradient (documented)
            assert p.grad is None or p.grad.abs().sum() == 0, pname
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["chunked", "sparse", "qk_norm"])
def test_bf16_works_and_stays_close_to_fp32(name):
    mixer = _layers()[name]
    x = torch.randn(2, 9, D)
    ref = mixer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the indexer keeps fp32 scores: the same keys are chosen
        assert_close(mixer(x).float(), ref, atol=5e-2, rtol=5e-2)
    low = mixer.to(torch.bfloat16)
    y = low(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    cache = low.allocate_inference_cache(2, 9)
    steps = [low(x[:, :4].to(torch.bfloat16), cache)] + [low.step(x[:, t : t + 1].to(torch.bfloat16), cache)
                                                          for t in range(4, 9)]
    assert_close(torch.cat(steps, 1).float(), ref, atol=5e-2, rtol=5e-2)


def test_sparse_bf16_decoding_picks_the_keys_the_full_pass_picks():
    torch.manual_seed(16)
    mixer = SparseGQA(64, num_heads=4, num_heads_kv=2, sparse_select_k=16, dtype=torch.bfloat16).eval()
    x = torch.randn(2, 96, 64, dtype=torch.bfloat16)
    cache = mixer.allocate_inference_cache(2, 96)
    assert cache.k.dtype == torch.bfloat16 and cache.index_k.dtype == torch.float32  # fp32 indexer keys
    with torch.no_grad():
        full = mixer(x)
        steps = [mixer(x[:, :40], cache)] + [mixer.step(x[:, t : t + 1], cache) for t in range(40, 96)]
    assert_close(torch.cat(steps, 1).float(), full.float(), atol=3e-2, rtol=3e-2)


# ---- aliases, FFN, errors -------------------------------------------------------------------------------


def test_sliding_window_gqa_is_our_sliding_window():
    assert MIXERS.get("sliding_window_gqa") is MIXERS.get("sliding_window")
    outs = []
    for name in ("sliding_window", "sliding_window_gqa"):
        torch.manual_seed(11)
        config = mixer_config(name, D, kwargs={"window_size": 3, "num_heads": 2, "num_heads_kv": 1})
        outs.append(build_mixer(name, config, dtype=F64))
    x = torch.randn(2, 8, D, dtype=F64)
    assert torch.equal(outs[0](x), outs[1](x))
    block = ConfigurableBlock(BlockConfig(attention="sliding_window_gqa", window_size=4, d_model=D, n_heads=2,
                                          d_ff=32))
    assert block.attention.window_size == 4


def test_gated_relu2_matches_the_formula():
    torch.manual_seed(12)
    ffn = FFNS.get("gated_relu2")(BlockConfig(d_model=D, d_ff=24), dtype=F64)
    x = torch.randn(3, 5, D, dtype=F64)
    W, b = ffn.gate_up.weight, ffn.gate_up.bias
    gate = x @ W[:24].T + b[:24]
    up = x @ W[24:].T + b[24:]
    expected = (F.relu(gate) ** 2 * up) @ ffn.down.weight.T + ffn.down.bias
    assert_close(ffn(x), expected, atol=1e-12)
    block = ConfigurableBlock(BlockConfig(ffn="gated_relu2", d_model=D, n_heads=2, d_ff=24))
    y, _ = block(torch.randn(2, 4, D))
    assert y.shape == (2, 4, D)


@pytest.mark.parametrize("C", [0, -3, 2.5, True, None])
def test_bad_chunk_size_is_refused(C):
    with pytest.raises(ValueError, match="attention_chunk_size"):
        ChunkedGQA(D, num_heads=2, attention_chunk_size=C)


@pytest.mark.parametrize("k", [0, -1, 1.5, None])
def test_bad_select_k_is_refused(k):
    with pytest.raises(ValueError, match="sparse_select_k"):
        SparseGQA(D, num_heads=2, sparse_select_k=k)


def test_other_bad_values_are_refused():
    with pytest.raises(ValueError, match="window_size=4 and attention_chunk_size=3"):
        ChunkedGQA(D, num_heads=2, attention_chunk_size=3, window_size=4)
    with pytest.raises(ValueError, match="linear"):
        ChunkedGQA(D, num_heads=2, attention_chunk_size=3, attention_type="linear")
    with pytest.raises(ValueError, match="window_size=0"):
        SparseGQA(D, num_heads=2, sparse_select_k=2, window_size=0)
    with pytest.raises(ValueError, match="sparse_compress_ratio=True"):
        SparseGQA(D, num_heads=2, sparse_select_k=2, sparse_compress_ratio=True)
    with pytest.raises(ValueError, match="sparse_compress_ratio"):
        BlockConfig(attention="sparse_gqa", sparse_select_k=2, sparse_compress_ratio=-1)
    with pytest.raises(ValueError, match="indexer_heads=0"):
        SparseGQA(D, num_heads=2, sparse_select_k=2, indexer_heads=0)
    with pytest.raises(ValueError, match="softcap=-1"):
        GQA(D, num_heads=2, softcap=-1.0)
    with pytest.raises(ValueError, match="qk_norm_eps"):
        GQA(D, num_heads=2, qk_norm=True, qk_norm_eps=0.0)
    with pytest.raises(TypeError, match="qk_norm"):
        GQA(D, num_heads=2, qk_norm="yes")
    with pytest.raises(ValueError, match=r"cannot apply \['qk_norm'\]"):
        GQA(D, num_heads=2, qk_norm=True, attention_type="linear")
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        LRNNLMHeadModel(D, 4, 1, 11, ["attn"], final_logit_softcapping=0.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        LanguageModelConfig.from_pattern(["gqa"], d_model=D, final_logit_softcapping=-2.0)
    for attention in ("mla", "linear_attention"):
        with pytest.raises(ValueError, match="qk_norm"):
            ConfigurableBlock(BlockConfig(attention=attention, qk_norm=True, d_model=D, n_heads=2, d_ff=32))
    mixer = SparseGQA(D, num_heads=2, sparse_select_k=2)
    with pytest.raises(ValueError, match="one head"):
        mixer(torch.randn(1, 4, D), mask=torch.ones(1, 2, 4, 4, dtype=torch.bool))


# ---- models: from_pattern with iRoPE, presets -----------------------------------------------------------


def _decode_matches_full(model, vocab):
    ids = torch.randint(0, vocab, (2, 10))
    full = model(ids).logits
    caches = model.allocate_inference_cache(2, 10)
    steps = [model(ids[:, :4], inference_params=caches).logits]
    steps += [model.step(ids[:, t : t + 1], caches).logits for t in range(4, 10)]
    assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_from_pattern_irope_and_the_new_fields():
    config = LanguageModelConfig.from_pattern(
        ["chunked_gqa", "chunked_gqa", "sparse_gqa", "gqa"], vocab_size=32, d_model=32, irope=True, qk_norm=True,
        attention_chunk_size=3, sparse_select_k=2, attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
        ffn="gated_relu2", n_kv_heads=1)
    assert [b.position for b in config.blocks] == ["rope", "rope", "none", "none"]  # NoPE on the global layers
    assert LanguageModelConfig.from_json(config.to_json()) == config
    model = LanguageModel(config).eval()
    assert model.layers[0].attention.attention_chunk_size == 3 and model.layers[0].attention.q_norm is not None
    assert model.layers[3].attention.rotary is None and model.layers[0].attention.rotary is not None
    _decode_matches_full(model, 32)
    with pytest.raises(TypeError, match="irope"):
        LanguageModelConfig.from_pattern(["gqa"], irope=1)


@pytest.mark.parametrize("name", ["tiny-gemma3-like", "tiny-llama4-like"])
def test_tiny_presets_build_train_and_decode(name):
    torch.manual_seed(13)
    model = build_model(load_config(name)["model"], vocab_size=40)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 40, (4, 48))
    losses = []
    for _ in range(4):
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    model.eval()
    _decode_matches_full(model, 40)
    out = generate(model, ids[:2, :5], max_new_tokens=6, temperature=0)
    assert out.tokens.shape == (2, 6)


def test_gemma3_and_llama4_presets_have_their_layouts():
    gemma = load_config("gemma3-like")["model"]
    assert gemma["mixer_types"][:6] == ["sliding_window"] * 5 + ["attn"] and gemma["final_logit_softcapping"] == 30.0
    assert all(kw["qk_norm"] and kw["softcap"] == 50.0 for kw in gemma["mixer_kwargs"].values())
    llama = load_config("llama4-like")["model"]
    assert llama["mixer_types"][:4] == ["chunked_gqa"] * 3 + ["gqa"]
    assert "rotary_emb_dim" not in llama["mixer_kwargs"]["gqa"]  # iRoPE: the global layers are NoPE
    assert llama["mixer_kwargs"]["chunked_gqa"]["attention_chunk_size"] == 8192


# ---- GPU: the backends "auto" picks there (flex for the chunk mask mod, SDPA for the top-k mask) -------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["chunked", "sparse"])
def test_gpu_backends_match_standard_and_decode(name):
    torch.manual_seed(15)
    width, T = 256, 384
    kw = dict(num_heads=4, num_heads_kv=2, qk_norm=True, rotary_emb_dim=64, softcap=30.0, device="cuda",
              dtype=torch.bfloat16)
    if name == "chunked":
        fast, ref = (ChunkedGQA(width, attention_chunk_size=64, attention_type=t, **kw) for t in ("auto", "standard"))
    else:
        fast, ref = (SparseGQA(width, sparse_select_k=48, attention_type=t, **kw) for t in ("auto", "standard"))
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, T, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = fast(x)
    assert_close(y, ref(x), atol=3e-2, rtol=3e-2)
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and fast.in_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        fast.eval()
        full = fast(x)
        cache = fast.allocate_inference_cache(2, T)
        steps = [fast(x[:, :100], cache)] + [fast.step(x[:, t : t + 1], cache) for t in range(100, 140)]
    assert_close(torch.cat(steps, 1), full[:, :140], atol=3e-2, rtol=3e-2)
