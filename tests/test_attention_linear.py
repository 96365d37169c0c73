"""LinearAttention as its own mixer: registry construction, MHA's attention_type="linear" alias (same
outputs, same state dict), BlockConfig construction, the options it refuses, and the declared inputs
of every attention mixer."""

from __future__ import annotations

import inspect

import pytest
import torch

from seqblocks import BlockConfig, ConfigurableBlock
from seqblocks.layers.attention import (
    GQA,
    MHA,
    MLA,
    MQA,
    CrossAttention,
    LinearAttention,
    LinearAttentionCache,
    SlidingWindowAttention,
)
from seqblocks.layers.attention.score_mods import causal_mask, soft_cap
from seqblocks.layers.mixer import MIXER_INPUTS
from seqblocks.layers.position import ALiBi
from seqblocks.registry import MIXERS
from seqblocks.testing import assert_close, check_prefill_then_steps

D, H, T = 16, 4, 11


def _x(B=2, T=T):
    return torch.randn(B, T, D, dtype=torch.float64)


def test_registry_builds_linear_attention():
    cls = MIXERS.get("linear_attention")
    assert cls is LinearAttention
    m = cls(D, num_heads=H, num_heads_kv=2, chunk_size=4).double().eval()
    assert isinstance(m, LinearAttention) and m.causal
    assert isinstance(m.allocate_inference_cache(2, T), LinearAttentionCache)
    with torch.no_grad():
        y = m(_x())
        check_prefill_then_steps(m, _x(), prefill=4, atol=1e-10)
    assert y.shape == (2, T, D) and torch.isfinite(y).all()


@pytest.mark.parametrize("feature", ["elu", "relu", "identity"])
def test_mha_alias_equals_the_direct_class(feature):
    torch.manual_seed(0)
    alias = MHA(D, H, 2, None, True, False, None, True, 3, 2, attention_type="linear", linear_attention_chunk_size=3,
                linear_feature_map=feature).double().eval()
    direct = LinearAttention(D, H, 2, qkv_proj_bias=True, out_proj_bias=False, layer_idx=3, rotary_emb_dim=2,
                             chunk_size=5, feature_map=feature).double().eval()
    assert type(alias) is LinearAttention and not isinstance(alias, MHA)
    assert (alias.chunk_size, alias.feature_map, alias.layer_idx, alias.num_heads_kv) == (3, feature, 3, 2)
    assert alias.state_dict().keys() == direct.state_dict().keys()
    direct.load_state_dict(alias.state_dict())
    x = _x()
    with torch.no_grad():
        assert_close(direct(x), alias(x), atol=1e-10)
        ca, cd = alias.allocate_inference_cache(2, T), direct.allocate_inference_cache(2, T)
        a = torch.cat([alias(x[:, :4], cache=ca)] + [alias(x[:, t : t + 1], cache=ca) for t in range(4, T)], 1)
        d = torch.cat([direct(x[:, :4], cache=cd)] + [direct(x[:, t : t + 1], cache=cd) for t in range(4, T)], 1)
    assert_close(a, d, atol=1e-10)
    assert_close(a, alias(x), atol=1e-10)


def test_state_dict_of_softmax_mha_loads_into_the_alias():
    """The alias keeps MHA's parameter names: weights trained as a softmax MHA load into it."""
    softmax = MHA(D, H, 2, rotary_emb_dim=2)
    linear = MHA(D, H, 2, rotary_emb_dim=2, attention_type="linear")
    linear.load_state_dict(softmax.state_dict())
    assert torch.equal(linear.in_proj.weight, softmax.in_proj.weight)


def test_gqa_and_mqa_aliases_keep_their_heads():
    g = GQA(D, H, 2, attention_type="linear")
    q = MQA(D, H, attention_type="linear")
    assert isinstance(g, LinearAttention) and g.num_heads_kv == 2
    assert isinstance(q, LinearAttention) and q.num_heads_kv == 1
    with pytest.raises(ValueError, match="exactly one key/value head"):
        MQA(D, H, 2, attention_type="linear")
    with pytest.raises(ValueError, match="no window"):
        SlidingWindowAttention(D, H, window_size=3, attention_type="linear")


@pytest.mark.parametrize("bad", [dict(score_mod=soft_cap(1.0)), dict(mask_mod=causal_mask), dict(window_size=3),
                                 dict(dropout=0.1), dict(softmax_scale=0.5)])
def test_alias_refuses_softmax_only_options(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=rf"MHA: attention_type='linear'.*'{name}'"):
        MHA(D, H, attention_type="linear", **bad)


def test_alias_rejects_unknown_arguments_like_mha():
    with pytest.raises(TypeError, match="nonsense"):
        MHA(D, H, attention_type="linear", nonsense=1)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_heads"):
        LinearAttention(D)
    with pytest.raises(ValueError, match="divisor"):
        LinearAttention(D, H, 3)
    with pytest.raises(ValueError, match="chunk_size=0"):
        LinearAttention(D, H, chunk_size=0)
    with pytest.raises(ValueError, match="feature_map='softmax'"):
        LinearAttention(D, H, feature_map="softmax")
    with pytest.raises(ValueError, match="bias position"):
        LinearAttention(D, H, position=ALiBi(H))
    with pytest.raises(ValueError, match="non-causal"):
        LinearAttention(D, H, causal=False).allocate_inference_cache(1, 4)


def test_forward_errors():
    m = LinearAttention(D, H).double()
    with pytest.raises(ValueError, match="key-padding mask only"):
        m(_x(), mask=torch.ones(2, T, T, dtype=torch.bool))
    with pytest.raises(TypeError, match="LinearAttention: lengths must be an int32 or int64"):
        m(_x(), lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"LinearAttention: lengths must lie in \[0, T\]"):
        m(_x(), lengths=torch.tensor([T + 1, 2]))
    with pytest.raises(TypeError, match="LinearAttention: cache must be a LinearAttentionCache"):
        m(_x(), cache=MHA(D, H).double().allocate_inference_cache(2, T))
    with pytest.raises(ValueError, match="batch_size=1"):
        m(_x(), cache=m.allocate_inference_cache(1, T))


def test_bidirectional_form_sees_the_future():
    m = LinearAttention(D, H, causal=False).double().eval()
    x = _x()
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(m(x)[:, 0], m(x2)[:, 0])


@pytest.mark.parametrize("position", ["rope", "sinusoidal"])
def test_block_config_builds_and_decodes(position):
    cfg = BlockConfig(attention="linear_attention", position=position, d_model=D, n_heads=H, n_kv_heads=2, d_ff=32,
                      linear_attention_chunk_size=3)
    blk = ConfigurableBlock(cfg).double().eval()
    assert isinstance(blk.attention, LinearAttention) and blk.attention.chunk_size == 3
    assert (blk.attention.rotary is not None) == (position == "rope")
    x = _x()
    with torch.no_grad():
        y, _ = blk(x)
        cache = blk.allocate_inference_cache(2, T)
        a, cache = blk(x[:, :5], cache=cache)
        steps = [blk(x[:, t : t + 1], cache=cache)[0] for t in range(5, T)]
    assert_close(torch.cat([a] + steps, dim=1), y, atol=1e-10)


def test_block_config_alias_through_mha():
    cfg = BlockConfig(attention="mha", attention_type="linear", d_model=D, n_heads=H, d_ff=32)
    assert isinstance(ConfigurableBlock(cfg).attention, LinearAttention)


@pytest.mark.parametrize(("fields", "match"), [(dict(window_size=3), "no sliding window"),
                                                (dict(dropout=0.1), "attention_dropout=0.0"),
                                                (dict(attention_type="flash"), "softmax backend")])
def test_block_config_refusals(fields, match):
    cfg = BlockConfig(attention="linear_attention", d_model=D, n_heads=H, d_ff=32, **fields)
    with pytest.raises(ValueError, match=match):
        ConfigurableBlock(cfg)


def test_sublayer_dropout_with_attention_dropout_off():
    cfg = BlockConfig(attention="linear_attention", d_model=D, n_heads=H, d_ff=32, dropout=0.1, attention_dropout=0.0)
    assert isinstance(ConfigurableBlock(cfg).attention, LinearAttention)


@pytest.mark.parametrize("cls", [MHA, GQA, MQA, SlidingWindowAttention, MLA, LinearAttention, CrossAttention])
def test_declared_inputs_are_the_keyword_only_inputs_of_forward(cls):
    params = inspect.signature(cls.forward).parameters
    keyword_only = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert cls.inputs <= MIXER_INPUTS
    assert cls.inputs == keyword_only & MIXER_INPUTS
    assert all(params[n].default is None for n in cls.inputs)
    assert list(params)[:2] == ["self", "x"]
    assert "cache" in params and params["cache"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
