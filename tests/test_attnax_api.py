"""The JAX attention library's API on seqblocks: ``TransformerConfig`` (its field names and defaults),
``attention_fn=`` (a kernel of one's own), per-call ``score_mod`` and the mask-mod converters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from seqblocks import (
    MHA,
    EncoderBlock,
    TransformerConfig,
    TransformerDecoder,
    TransformerEncoder,
    TransformerEncoderDecoder,
    VisionTransformerConfig,
    alibi_score_mod,
    causal_mask,
    mask_mod_to_boolean_mask,
    mask_mod_to_score_mod,
    sliding_window_mask,
    standard_attention_fn,
)

# The reference library's defaults, field by field.
TRANSFORMER_DEFAULTS = {
    "d_model": 512, "num_heads": 8, "num_layers": 6, "d_ff": 2048, "dropout_rate": 0.1, "max_len": 512,
    "use_pre_norm": True, "pos_emb_type": "sinusoidal", "ff_activation": "gelu", "norm_type": "layer",
    "pad_token_id": 0, "attention_type": "standard", "attention_block_size": 512, "linear_attention_chunk_size": 64,
    "rope_base": 10000.0, "rope_max_positions": None, "num_kv_heads": None, "attention_window": None,
    "kv_cache_max_len": None,
}
VIT_DEFAULTS = {
    "image_size": 224, "patch_size": 16, "num_channels": 3, "num_classes": None, "use_cls_token": True, "pool": "cls",
    "d_model": 768, "num_heads": 12, "num_layers": 12, "d_ff": 3072, "dropout_rate": 0.0, "use_pre_norm": True,
    "ff_activation": "gelu", "norm_type": "layer", "attention_type": "standard", "attention_block_size": 512,
    "linear_attention_chunk_size": 64, "num_kv_heads": None, "attention_window": None,
}


def test_config_names_and_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    assert fields.pop("vocab_size") is dataclasses.MISSING
    assert fields == TRANSFORMER_DEFAULTS
    vit = {f.name: f.default for f in dataclasses.fields(VisionTransformerConfig)}
    assert {k: vit[k] for k in VIT_DEFAULTS} == VIT_DEFAULTS
    cfg = TransformerConfig(vocab_size=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 3
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad,match", [({"num_heads": 5}, "multiple of num_heads"), ({"pos_emb_type": "x"}, "pos_emb"),
                                       ({"norm_type": "batch"}, "norm_type"), ({"attention_type": "bogus"}, "offers"),
                                       ({"dropout_rate": 1.0}, "dropout_rate"), ({"num_layers": 0}, "num_layers"),
                                       ({"pad_token_id": 10}, "pad_token_id")])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(vocab_size=10, **bad)


def small_config(**kw) -> TransformerConfig:
    return TransformerConfig(**{**dict(vocab_size=40, d_model=32, num_heads=4, num_layers=2, d_ff=64, dropout_rate=0.0,
                                       max_len=32), **kw})


@pytest.mark.parametrize("pos", ["sinusoidal", "rope", "alibi", "none"])
def test_config_builds_what_the_arguments_build(pos):
    cfg = small_config(pos_emb_type=pos, norm_type="rms", ff_activation="swiglu", num_kv_heads=2)
    torch.manual_seed(0)
    a = TransformerEncoder(cfg).eval()
    b = TransformerEncoder(40, 32, 2, 4, 64, position=pos, max_seq_len=32, padding_idx=0, dropout_rate=0.0,
                           norm_type="rms_norm", ff_activation="swiglu", num_kv_heads=2,
                           attention_type="standard", attention_block_size=512).eval()
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(a(tokens), b(tokens))
    assert a.config is cfg and a.layers[0].attn.num_heads_kv == 2
    dec = TransformerDecoder(cfg, cross_attention=False)
    assert dec(tokens).shape == (2, 9, 40)
    seq2seq = TransformerEncoderDecoder(cfg)
    assert len(seq2seq.encoder.layers) == len(seq2seq.decoder.layers) == 2
    assert seq2seq(tokens, tokens[:, :5]).shape == (2, 5, 40)


def test_config_and_explicit_sizes_clash():
    with pytest.raises(TypeError, match="d_model"):
        TransformerEncoder(small_config(), d_model=64)
    with pytest.raises(TypeError, match="dropout_rate"):
        TransformerEncoder(small_config(), dropout_rate=0.2)


def test_kv_cache_max_len_is_the_default_cache_length():
    dec = TransformerDecoder(small_config(kv_cache_max_len=12), cross_attention=False)
    assert dec.allocate_inference_cache(2).max_seqlen == 12
    assert TransformerDecoder(small_config(), cross_attention=False).allocate_inference_cache(1).max_seqlen == 32


def test_config_models_save_and_load(tmp_path):
    from seqblocks.checkpoint import load_pretrained

    model = TransformerEncoderDecoder(small_config(pos_emb_type="rope")).eval()
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config
    src = torch.randint(0, 40, (2, 6))
    torch.testing.assert_close(loaded(src, src), model(src, src), rtol=0, atol=0)


# ------------------------------------------------------------------ attention_fn

MHA_OPTIONS = [dict(), dict(causal=False), dict(num_heads_kv=2), dict(window_size=3), dict(softmax_scale=0.2),
               dict(score_mod=alibi_score_mod(4)), dict(mask_mod=sliding_window_mask(2), causal=False),
               dict(rotary_emb_dim=8)]


@pytest.mark.parametrize("kw", MHA_OPTIONS, ids=lambda kw: ",".join(kw) or "plain")
def test_attention_fn_computes_what_the_backend_computes(kw):
    torch.manual_seed(0)
    ref = MHA(32, num_heads=4, **kw).double()
    own = MHA(32, num_heads=4, attention_fn=standard_attention_fn, **kw).double()
    own.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    pad = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    torch.testing.assert_close(own(x), ref(x))
    torch.testing.assert_close(own(x, mask=pad), ref(x, mask=pad))
    if ref.causal:  # cached decoding goes through the kernel too
        cache = own.allocate_inference_cache(2, 8)
        steps = [own(x[:, :3], cache)] + [own(x[:, t:t + 1], cache) for t in range(3, 7)]
        torch.testing.assert_close(torch.cat(steps, 1), ref(x))


def test_attention_fn_sees_the_documented_call():
    calls = []

    def kernel(query, key, value, *, mask=None, score_mod=None, dropout_rate=0.0, deterministic=True):
        calls.append((query.shape, key.shape, None if mask is None else mask.shape, score_mod is not None,
                      dropout_rate, deterministic))
        return standard_attention_fn(query, key, value, mask=mask, score_mod=score_mod)

    layer = MHA(32, num_heads=4, num_heads_kv=1, dropout=0.1, attention_fn=kernel)
    layer(torch.randn(2, 5, 32))
    assert calls[-1] == ((2, 4, 5, 8), (2, 4, 5, 8), (2, 4, 5, 5), False, 0.1, False)
    layer.eval()
    layer(torch.randn(2, 5, 32), score_mod=alibi_score_mod(4))
    assert calls[-1][3:] == (True, 0.1, True)


def test_attention_fn_errors():
    with pytest.raises(TypeError, match="callable"):
        MHA(32, num_heads=4, attention_fn="flash")
    with pytest.raises(ValueError, match="linear"):
        MHA(32, num_heads=4, attention_type="linear", attention_fn=standard_attention_fn)
    bad = MHA(32, num_heads=4, attention_fn=lambda q, k, v, **kw: q[:, :1])
    with pytest.raises(ValueError, match=r"expected a tensor \[B, H, Tq, V\]"):
        bad(torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="functions"):
        TransformerEncoder(40, 32, 1, 4, 64, attention_fn=standard_attention_fn).checkpoint_config()


def test_attention_fn_through_blocks_and_models():
    torch.manual_seed(0)
    ref = TransformerEncoderDecoder(40, 40, 32, 4, 64, 1, 1, position="rope").double().eval()
    own = TransformerEncoderDecoder(40, 40, 32, 4, 64, 1, 1, position="rope",
                                    attention_fn=standard_attention_fn).double().eval()
    own.load_state_dict(ref.state_dict())
    src, tgt = torch.randint(0, 40, (2, 6)), torch.randint(0, 40, (2, 4))
    torch.testing.assert_close(own(src, tgt), ref(src, tgt))
    assert own.decoder.layers[0].cross_attn.attention_fn is standard_attention_fn
    block = EncoderBlock(32, 4, 64, attention_fn=standard_attention_fn)
    assert block(torch.randn(1, 3, 32)).shape == (1, 3, 32)


def test_attention_fn_bf16():
    layer = MHA(32, num_heads=4, attention_fn=standard_attention_fn).to(torch.bfloat16)
    y = layer(torch.randn(2, 5, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


# ------------------------------------------------------------------ per-call score_mod

def test_per_call_score_mod_composes_with_the_layers_own():
    torch.manual_seed(0)
    plain = MHA(32, num_heads=4).double()
    built = MHA(32, num_heads=4, score_mod=alibi_score_mod(4)).double()
    built.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    torch.testing.assert_close(plain(x, score_mod=alibi_score_mod(4)), built(x))
    # composed after the layer's own: alibi twice is alibi with doubled slopes
    doubled = alibi_score_mod(2 * alibi_score_mod.__globals__["alibi_slopes"](4))
    torch.testing.assert_close(built(x, score_mod=alibi_score_mod(4)), plain(x, score_mod=doubled))
    # a mask mod given per call is a mask
    bidir = MHA(32, num_heads=4, causal=False).double()
    bidir.load_state_dict(plain.state_dict())
    torch.testing.assert_close(bidir(x, score_mod=causal_mask), plain(x))
    # while decoding, at token indices
    cache = built.allocate_inference_cache(2, 6)
    steps = [built(x[:, :2], cache, score_mod=alibi_score_mod(4))]
    steps += [built(x[:, t:t + 1], cache, score_mod=alibi_score_mod(4)) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), built(x, score_mod=alibi_score_mod(4)))
    with pytest.raises(TypeError, match="score_mod"):
        plain(x, score_mod=3)


def test_per_call_score_mod_through_the_models():
    torch.manual_seed(0)
    enc = TransformerEncoder(40, 32, 2, 4, 64, position="none").eval()
    causal = TransformerEncoder(40, 32, 2, 4, 64, position="none", causal=True).eval()
    causal.load_state_dict(enc.state_dict())
    tokens = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(enc(tokens, score_mod=causal_mask), causal(tokens))
    seq2seq = TransformerEncoderDecoder(40, 40, 32, 4, 64, 1, 1).eval()
    src = torch.randint(0, 40, (2, 5))
    out = seq2seq(src, tokens, src_score_mod=causal_mask)
    memory = seq2seq.encode(src, score_mod=causal_mask)
    torch.testing.assert_close(out, seq2seq.decode(tokens, memory))


# ------------------------------------------------------------------ converters

def test_mask_mod_to_score_mod_and_boolean_mask():
    torch.manual_seed(0)
    mod = mask_mod_to_score_mod(sliding_window_mask(3))
    assert mod.kind == "score"
    bidir = MHA(32, num_heads=4, causal=False).double()
    windowed = MHA(32, num_heads=4, window_size=3).double()
    windowed.load_state_dict(bidir.state_dict())
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    torch.testing.assert_close(bidir(x, score_mod=mod), windowed(x))
    mask = mask_mod_to_boolean_mask(causal_mask, batch=2, num_heads=3, seq_q=4, seq_kv=5)
    assert mask.shape == (2, 3, 4, 5) and mask.dtype == torch.bool
    assert torch.equal(mask[1, 2], torch.arange(4)[:, None] >= torch.arange(5)[None])
    scores = torch.zeros(1, 1, 3, 3)
    idx = torch.arange(3)
    out = mask_mod_to_score_mod(causal_mask)(scores, idx[:1, None, None, None], idx[:1, None, None, None],
                                             idx[None, None, :, None], idx[None, None, None, :])
    assert torch.equal(torch.isinf(out[0, 0]), torch.triu(torch.ones(3, 3, dtype=torch.bool), 1))
    with pytest.raises(TypeError, match="score mod"):
        mask_mod_to_score_mod(alibi_score_mod(2))
    with pytest.raises(TypeError, match="score mod"):
        mask_mod_to_boolean_mask(alibi_score_mod(2), batch=1, num_heads=1, seq_q=1, seq_kv=1)
    with pytest.raises(ValueError, match="seq_q"):
        mask_mod_to_boolean_mask(causal_mask, batch=1, num_heads=1, seq_q=0, seq_kv=1)


def test_per_call_score_mod_with_packed_documents():
    """A per-call score_mod composes with packing's document mods: each document runs as if alone, the
    mod seeing in-document positions (the fused path, the unpacking fallback and attention_fn alike)."""
    from seqblocks.layers.attention import MHA
    from seqblocks.layers.attention.attention_fn import standard_attention_fn

    def bias(score, b, h, q_idx, kv_idx):
        return score - 0.1 * (q_idx - kv_idx).abs()

    torch.manual_seed(0)
    cu, x = torch.tensor([0, 5, 12, 16]), torch.randn(1, 16, 32)
    for causal in (True, False):
        mha = MHA(32, num_heads=4, causal=causal, rotary_emb_dim=8).eval()
        alone = torch.cat([mha(x[:, a:b], score_mod=bias) for a, b in zip(cu[:-1], cu[1:])], 1)
        torch.testing.assert_close(mha(x, cu_seqlens=cu, score_mod=bias), alone)
        torch.testing.assert_close(mha(x, cu_seqlens=cu, mask=torch.ones(1, 16, dtype=torch.bool), score_mod=bias),
                                   alone)
        own = MHA(32, num_heads=4, causal=causal, rotary_emb_dim=8, attention_fn=standard_attention_fn).eval()
        own.load_state_dict(mha.state_dict())
        torch.testing.assert_close(own(x, cu_seqlens=cu, score_mod=bias), alone)
