"""EncoderBlock / DecoderBlock (seed 003 / 004) and the transformer models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqblocks import (
    DecoderBlock,
    EncoderBlock,
    TransformerDecoder,
    TransformerEncoder,
    TransformerEncoderDecoder,
    soft_cap,
)
from seqblocks.testing import assert_close

D, H, FF = 16, 4, 32


def test_seed_004_tutorial_block():
    """Pre-LN, two LayerNorms, Dense -> ReLU -> Dense: x + attn(ln1(x)); x + ff2(relu(ff1(ln2(x))))."""
    blk = EncoderBlock(D, H, FF, pre_norm=True, norm_type="layer_norm", ff_activation="relu").double().eval()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    attn = blk.attn
    with torch.no_grad():
        h = F.layer_norm(x, (D,), blk.ln1.weight, blk.ln1.bias, 1e-5)
        q, k, v = attn.in_proj(h).split(D, dim=-1)
        sh = lambda t: t.view(2, 7, H, D // H).transpose(1, 2)
        a = torch.softmax(sh(q) @ sh(k).transpose(-1, -2) / (D // H) ** 0.5, dim=-1) @ sh(v)
        x1 = x + attn.out_proj(a.transpose(1, 2).reshape(2, 7, D))
        h2 = F.layer_norm(x1, (D,), blk.ln2.weight, blk.ln2.bias, 1e-5)
        expected = x1 + blk.ff2(F.relu(blk.ff1(h2)))
        assert_close(blk(x), expected, atol=1e-12)


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(use_rope=True, num_kv_heads=2), dict(attention_window=3),
                                dict(score_mod=soft_cap(2.0), norm_type="rms_norm", ff_activation="swiglu"),
                                dict(attention_type="memory_efficient", attention_block_size=4),
                                dict(attention_type="linear", linear_attention_chunk_size=3)])
def test_decoder_block_cached_equals_full(pre_norm, kw):
    blk = DecoderBlock(D, H, FF, pre_norm=pre_norm, **kw).double().eval()
    x, mem = torch.randn(2, 9, D, dtype=torch.float64), torch.randn(2, 5, D, dtype=torch.float64)
    mmask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        full = blk(x, mem, memory_mask=mmask)
        cache = blk.allocate_inference_cache(2, 9, memory_seqlen=5)
        outs = [blk(x[:, :4], mem, memory_mask=mmask, cache=cache)]
        outs += [blk(x[:, t : t + 1], None, cache=cache) for t in range(4, 9)]
    assert_close(torch.cat(outs, dim=1), full, atol=1e-10)


def test_encoder_block_is_bidirectional_and_attention_window_causal():
    x = torch.randn(1, 6, D, dtype=torch.float64)
    enc = EncoderBlock(D, H, FF).double().eval()
    with torch.no_grad():
        y = enc(x)
        x2 = x.clone()
        x2[:, -1] = torch.randn(1, D, dtype=torch.float64)
        assert not torch.allclose(enc(x2)[:, 0], y[:, 0])  # the first token sees the last
        win = EncoderBlock(D, H, FF, attention_window=2).double().eval()
        assert_close(win(x2)[:, :5], win(x)[:, :5], atol=1e-12)


def test_dropout_rate_in_training_only():
    blk = EncoderBlock(D, H, FF, dropout_rate=0.3).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    blk.eval()
    with torch.no_grad():
        assert torch.equal(blk(x), blk(x))
        blk.train()
        assert not torch.allclose(blk(x), blk(x))


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope", "alibi", "none"])
def test_encoder_decoder_decode_with_caches_equals_uncached(position):
    model = TransformerEncoderDecoder(11, 13, d_model=D, num_heads=H, d_ff=FF, num_encoder_layers=2,
                                      num_decoder_layers=2, position=position, max_seq_len=32,
                                      num_kv_heads=2).double().eval()
    src = torch.randint(0, 11, (2, 6))
    tgt = torch.randint(0, 13, (2, 8))
    src_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        full = model(src, tgt, src_mask=src_mask)
        memory = model.encode(src, src_mask)
        cache = model.allocate_inference_cache(2, 8, memory_seqlen=6)
        outs = [model.decode(tgt[:, :3], memory, src_mask, cache=cache)]
        outs += [model.decode(tgt[:, t : t + 1], None, src_mask, cache=cache) for t in range(3, 8)]
        assert_close(torch.cat(outs, dim=1), full, atol=1e-10)
        gen = model.generate(src, bos_token_id=1, max_new_tokens=4, src_mask=src_mask)
        assert gen.shape == (2, 5)
        # Greedy tokens agree with uncached argmax of the teacher-forced logits.
        again = model(src, gen[:, :-1], src_mask=src_mask).argmax(-1)
        assert torch.equal(again, gen[:, 1:])


def test_decoder_only_and_encoder_models():
    lm = TransformerDecoder(17, d_model=D, num_layers=2, num_heads=H, d_ff=FF, cross_attention=False,
                            position="rope").double().eval()
    toks = torch.randint(0, 17, (2, 9))
    with torch.no_grad():
        full = lm(toks)
        cache = lm.allocate_inference_cache(2, 9)
        outs = [lm(toks[:, :5], cache=cache)] + [lm(toks[:, t : t + 1], cache=cache) for t in range(5, 9)]
        assert_close(torch.cat(outs, dim=1), full, atol=1e-10)
        toks2 = toks.clone()
        toks2[:, 6:] = (toks2[:, 6:] + 1) % 17
        assert_close(lm(toks2)[:, :6], full[:, :6], atol=1e-12)
    enc = TransformerEncoder(17, d_model=D, num_layers=2, num_heads=H, d_ff=FF).double().eval()
    assert enc(toks).shape == (2, 9, D)
    emb = TransformerEncoder(None, d_model=D, num_layers=1, num_heads=H, d_ff=FF, position="none")
    assert emb(torch.randn(2, 4, D)).shape == (2, 4, D)


def test_errors():
    with pytest.raises(ValueError, match="ff_activation"):
        EncoderBlock(D, H, FF, ff_activation="swish9")
    with pytest.raises(ValueError, match="unknown norm"):
        EncoderBlock(D, H, FF, norm_type="batch_norm")
    blk = EncoderBlock(D, H, FF, use_rope=True, rope_max_positions=4)
    with pytest.raises(ValueError, match="rope_max_positions"):
        blk(torch.randn(1, 5, D))
    with pytest.raises(ValueError, match="memory_seqlen"):
        TransformerDecoder(5, d_model=D, num_layers=1, num_heads=H, d_ff=FF).allocate_inference_cache(1, 4)
    with pytest.raises(ValueError, match="position"):
        TransformerEncoder(5, d_model=D, num_layers=1, num_heads=H, d_ff=FF, position="xpos")
