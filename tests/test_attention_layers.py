"""Attention mixers under the mixer contract: cached decoding == full pass for every variant, position
type, mod and backend; causality; GQA == MHA; registry / BlockConfig construction; dropout; errors."""

from __future__ import annotations

import pytest
import torch

from seqblocks import BlockConfig, ConfigurableBlock
from seqblocks.layers.attention import MHA, MLA, MQA, CrossAttention, LinearAttention, SlidingWindowAttention
from seqblocks.layers.attention.score_mods import (
    alibi_score_mod,
    compose,
    document_mask,
    prefix_lm_mask,
    sliding_window_mask,
    soft_cap,
)
from seqblocks.layers.position import ALiBi, RotaryEmbedding
from seqblocks.registry import MIXERS
from seqblocks.testing import (
    assert_close,
    check_causality,
    check_chunked_prefill,
    check_lengths,
    check_prefill_then_steps,
)

D, H, T = 16, 4, 13
DOC = torch.tensor([0] * 5 + [1] * 4 + [2] * 4)


def _variants():
    return {
        "mha": lambda **kw: MHA(D, H, **kw),
        "gqa": lambda **kw: MHA(D, H, 2, **kw),
        "mqa": lambda **kw: MQA(D, H, **kw),
        "rope": lambda **kw: MHA(D, H, 2, rotary_emb_dim=2, **kw),
        "rope_interleaved": lambda **kw: MHA(D, H, rotary_emb_dim=4, rotary_emb_interleaved=True, **kw),
        "alibi": lambda **kw: MHA(D, H, position=ALiBi(H), **kw),
        "block_rope": lambda **kw: MHA(D, H, position=RotaryEmbedding(D // H), **kw),
        "window": lambda **kw: SlidingWindowAttention(D, H, window_size=3, **kw),
        "window_rope_alibi": lambda **kw: SlidingWindowAttention(D, H, 2, window_size=4, position=ALiBi(H), **kw),
        "softcap": lambda **kw: MHA(D, H, score_mod=soft_cap(1.5), **kw),
        "alibi_mod": lambda **kw: MHA(D, H, score_mod=compose(alibi_score_mod(H), soft_cap(3.0)), **kw),
        "document": lambda **kw: MHA(D, H, mask_mod=document_mask(DOC), **kw),
        "prefix_lm": lambda **kw: MHA(D, H, mask_mod=prefix_lm_mask(4), **kw),
        "window_mod": lambda **kw: MHA(D, H, mask_mod=sliding_window_mask(3), **kw),
        "mla": lambda **kw: MLA(D, H, **kw),
        "mla_lora": lambda **kw: MLA(D, H, kv_lora_rank=6, q_lora_rank=5, qk_rope_head_dim=2, v_head_dim=3, **kw),
        "mla_alibi": lambda **kw: MLA(D, H, position=ALiBi(H), **kw),
        "linear": lambda **kw: MHA(D, H, 2, rotary_emb_dim=2, attention_type="linear",
                                   linear_attention_chunk_size=4, **kw),
        "linear_direct": lambda **kw: LinearAttention(D, H, 2, chunk_size=5, feature_map="relu", **kw),
    }


VARIANTS = _variants()


def _make(name, backend="standard"):
    kw = {} if name.startswith("linear") else {"attention_type": backend}
    return VARIANTS[name](**kw).double().eval()


def _x(B=2, T=T):
    return torch.randn(B, T, D, dtype=torch.float64)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_steps_and_continuation(name):
    m, x = _make(name), _x()
    with torch.no_grad():
        check_prefill_then_steps(m, x, prefill=5, atol=1e-10)
        check_chunked_prefill(m, x, split=7, atol=1e-10)
        check_prefill_then_steps(m, x, prefill=0, atol=1e-10)


BACKEND_CASES = [(b, n) for b in ("memory_efficient", "flash")
                 for n in ("gqa", "alibi", "window_rope_alibi", "document", "mla")]
BACKEND_CASES += [("memory_efficient", "softcap")] + [("flex", n) for n in ("window_rope_alibi", "softcap", "mla")]


@pytest.mark.parametrize(("backend", "name"), BACKEND_CASES)
def test_backends_decode_like_full_standard(name, backend):
    ref, x = _make(name), _x(T=9)
    m = _make(name, backend)
    m.load_state_dict(ref.state_dict())
    with torch.no_grad():
        full = ref(x)
        assert_close(m(x), full, atol=1e-10)
        cache = m.allocate_inference_cache(2, 9, dtype=x.dtype)
        outs = [m(x[:, :3], cache=cache), m(x[:, 3:6], cache=cache)]
        outs += [m(x[:, t : t + 1], cache=cache) for t in range(6, 9)]
    assert_close(torch.cat(outs, dim=1), full, atol=1e-10)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality(name):
    m, x = _make(name), _x()
    with torch.no_grad():
        for t in (0, 6, T - 2):
            check_causality(m, x, t=t)


@pytest.mark.parametrize("name", ["mha", "gqa", "window", "alibi", "mla", "linear", "linear_direct"])
def test_lengths(name):
    m, x = _make(name), _x(B=3)
    with torch.no_grad():
        check_lengths(m, x, torch.tensor([T, 4, 9]), atol=1e-10)


def test_key_padding_mask_equals_running_alone_and_is_cached():
    m, x = _make("gqa"), _x()
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, 3] = False  # a padding token in the middle of sequence 1
    with torch.no_grad():
        y = m(x, mask=valid)
        keep = valid[1].nonzero().squeeze(1)
        alone = m(x[1:, keep])
        assert_close(y[1:, keep], alone, atol=1e-10)
        cache = m.allocate_inference_cache(2, T)
        a = m(x[:, :8], cache=cache, mask=valid[:, :8])
        b = torch.cat([m(x[:, t : t + 1], cache=cache) for t in range(8, T)], dim=1)
    assert_close(torch.cat((a, b), dim=1), y, atol=1e-10)


def test_full_masks_bool_and_float():
    m, x = _make("mha"), _x()
    tri = torch.ones(T, T, dtype=torch.bool).tril()
    bidir = MHA(D, H, causal=False, attention_type="standard").double().eval()
    bidir.load_state_dict(m.state_dict())
    additive = torch.zeros(T, T, dtype=torch.float64).masked_fill(~tri, float("-inf"))
    with torch.no_grad():
        assert_close(bidir(x, mask=tri[None].expand(2, T, T)), m(x), atol=1e-10)
        assert_close(bidir(x, mask=additive), m(x), atol=1e-10)


def test_gqa_with_all_heads_equals_mha():
    mha = MHA(D, H).double().eval()
    gqa = MIXERS.get("gqa")(D, H, H).double().eval()
    gqa.load_state_dict(mha.state_dict())
    x = _x()
    with torch.no_grad():
        assert_close(gqa(x), mha(x), atol=1e-12)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = MHA(D, H, 2, attention_type="standard").double().eval()
    mha = MHA(D, H, attention_type="standard").double().eval()
    K = D // H
    wq, wk, wv = gqa.in_proj.weight.split((H * K, 2 * K, 2 * K))
    bq, bk, bv = gqa.in_proj.bias.split((H * K, 2 * K, 2 * K))
    rep = lambda w: w.view(2, K, -1).repeat_interleave(2, dim=0).reshape(H * K, *w.shape[1:])
    with torch.no_grad():
        mha.in_proj.weight.copy_(torch.cat((wq, rep(wk), rep(wv))))
        mha.in_proj.bias.copy_(torch.cat((bq, rep(bk[:, None])[:, 0], rep(bv[:, None])[:, 0])))
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        x = _x()
        assert_close(gqa(x), mha(x), atol=1e-12)


def test_sliding_window_sees_only_window():
    m, x = _make("window"), _x()
    with torch.no_grad():
        y = m(x)
        x2 = x.clone()
        x2[:, :5] = torch.randn_like(x2[:, :5])  # tokens 0..4 are out of the window of tokens >= 8
        assert_close(m(x2)[:, 8:], y[:, 8:], atol=1e-12)
        cache = m.allocate_inference_cache(2, 50)
    assert cache.k.shape[2] == 3  # rolling cache holds the window only


def test_mla_cache_holds_latents():
    m = _make("mla_lora")
    cache = m.allocate_inference_cache(2, 20)
    assert cache.c_kv.shape == (2, 20, 6) and cache.k_pe.shape == (2, 20, 2)


def test_cross_attention_cache_and_positions():
    ca = CrossAttention(D, H, 2, kdim=10, rotary_emb_dim=2, attention_type="standard").double().eval()
    x, mem = _x(), torch.randn(2, 7, 10, dtype=torch.float64)
    mvalid = torch.ones(2, 7, dtype=torch.bool)
    mvalid[0, 5:] = False
    with torch.no_grad():
        full = ca(x, mem, mask=mvalid)
        cache = ca.allocate_inference_cache(2, 9)
        outs = [ca(x[:, :4], mem, cache=cache, mask=mvalid)]
        outs += [ca(x[:, t : t + 1], None, cache=cache) for t in range(4, T)]
        assert_close(torch.cat(outs, dim=1), full, atol=1e-10)
        assert_close(full[:1], ca(x[:1], mem[:1, :5]), atol=1e-10)  # padding == a shorter memory
        for backend in ("memory_efficient", "flash", "flex"):
            other = CrossAttention(D, H, 2, kdim=10, rotary_emb_dim=2, attention_type=backend).double().eval()
            other.load_state_dict(ca.state_dict())
            assert_close(other(x, mem, mask=mvalid), full, atol=1e-10)
        shifted = ca(x, mem, position_ids=torch.arange(3, 3 + T), memory_position_ids=torch.arange(3, 10))
    # RoPE depends on relative positions only: shifting both sides leaves the scores unchanged.
    assert_close(shifted, ca(x, mem), atol=1e-10)


@pytest.mark.parametrize("backend", ["standard", "memory_efficient", "flash"])
def test_dropout_active_only_in_training(backend):
    m = MHA(D, H, dropout=0.5, attention_type=backend).double()
    x = _x()
    m.eval()
    with torch.no_grad():
        e1, e2 = m(x), m(x)
        m.train()
        t1 = m(x)
    assert torch.equal(e1, e2)
    assert not torch.allclose(t1, e1)


@pytest.mark.parametrize("name", ["attn", "mha", "gqa", "mqa", "mla", "sliding_window"])
@pytest.mark.parametrize("position", ["rope", "alibi", "sinusoidal"])
def test_registry_and_block_config(name, position):
    cfg = BlockConfig(attention=name, position=position, d_model=D, n_heads=H, n_kv_heads=2, d_ff=32,
                      window_size=3 if name == "sliding_window" else None, attention_type="standard")
    blk = ConfigurableBlock(cfg).double().eval()
    x = _x()
    with torch.no_grad():
        y, _ = blk(x)
        cache = blk.allocate_inference_cache(2, T)
        a, cache = blk(x[:, :5], cache=cache)
        steps = [blk(x[:, t : t + 1], cache=cache)[0] for t in range(5, T)]
    assert_close(torch.cat([a] + steps, dim=1), y, atol=1e-10)
    if name == "mqa":
        assert blk.attention.num_heads_kv == 1


def test_mixer_types_style_construction():
    m = MIXERS.get("attn")(D, num_heads=H, layer_idx=3)
    assert m.causal and m.layer_idx == 3
    with pytest.raises(ValueError, match="num_heads"):
        MIXERS.get("attn")(D, layer_idx=0)


def test_errors():
    with pytest.raises(ValueError, match="divisor"):
        MHA(D, H, 3)
    with pytest.raises(ValueError, match="attention_type"):
        MHA(D, H, attention_type="ring")
    with pytest.raises(ValueError, match="linear"):
        MHA(D, H, attention_type="linear", score_mod=soft_cap(1.0))
    with pytest.raises(ValueError, match="window_size"):
        SlidingWindowAttention(D, H)
    with pytest.raises(TypeError, match="mask mod"):
        MHA(D, H, score_mod=sliding_window_mask(3))
    m = _make("mha")
    cache = m.allocate_inference_cache(1, 4)
    with torch.no_grad():
        m(_x(1, 3), cache=cache)
        with pytest.raises(ValueError, match="max_seqlen=4"):
            m(_x(1, 2), cache=cache)
    with pytest.raises(ValueError, match="non-causal"):
        MHA(D, H, causal=False).allocate_inference_cache(1, 4)
    with pytest.raises(ValueError, match=r"MHA: x must have shape \[B, T, 16\]"):
        m(torch.randn(2, 3, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="key-padding"):
        m(_x(), mask=torch.ones(2, T + 1, dtype=torch.bool))


def test_lrnnx_block_facade():
    """Seed 000's usage: Block(dim, mixer_cls=lambda d: MHA(embed_dim=d, num_heads=...)); cached == full."""
    from seqblocks import Block
    from seqblocks.layers.ffn import GatedMLP

    blk = Block(D, mixer_cls=lambda d: MHA(embed_dim=d, num_heads=H), mlp_cls=lambda d: GatedMLP(in_features=d),
                norm_cls=torch.nn.LayerNorm).double().eval()
    x = _x()
    with torch.no_grad():
        h, r = blk(x)
        cache = blk.allocate_inference_cache(2, T)
        outs = [blk(x[:, :5], inference_params=cache)]
        outs += [blk(x[:, t : t + 1], inference_params=cache) for t in range(5, T)]
    assert_close(torch.cat([o[0] for o in outs], dim=1), h, atol=1e-10)
    assert_close(torch.cat([o[1] for o in outs], dim=1), r, atol=1e-10)
