"""The DeltaNet and Gated DeltaNet mixers: fla 0.6.0's layer state dicts load unchanged and give the
output of fla's math (its naive recurrences on the same weights); packed sequences equal separate
ones; bf16; the decode cache; torch.compile; save / load; constructor checks. The mixer contract
itself runs in tests/test_mixer_contract.py (``-k deltanet``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from seqblocks.layers.mixers import DeltaNet, GatedDeltaNet
from seqblocks.models import LRNNLMHeadModel

D = 32


def fla_conv(conv, x):
    # fla's ShortConvolution (a depthwise nn.Conv1d, causal, SiLU), written out
    return F.silu(F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=conv.kernel_size[0] - 1,
                           groups=conv.weight.shape[0])[..., :x.shape[1]].transpose(1, 2))


def l2(x):
    return x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def fla_deltanet_math(layer, x):
    """fla's DeltaNet forward (default options) with fla's naive recurrence as the core."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    H = layer.num_heads
    q, k, v = (fla_conv(c, p(x)).unflatten(-1, (H, -1)) for c, p in
               ((layer.q_conv1d, layer.q_proj), (layer.k_conv1d, layer.k_proj), (layer.v_conv1d, layer.v_proj)))
    beta = layer.b_proj(x).sigmoid()
    o, _ = delta_rule_recurrence(*(t.transpose(1, 2) for t in (l2(q), l2(k), v, beta)))
    o = rms(o.transpose(1, 2), layer.o_norm.weight, layer.o_norm.eps)
    if layer.use_gate:
        o = o * F.silu(layer.g_proj(x).unflatten(-1, (H, -1)))
    return layer.o_proj(o.flatten(-2))


def fla_gated_deltanet_math(layer, x):
    """fla's GatedDeltaNet forward with fla's naive recurrence as the core (value heads grouped)."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    H, HV = layer.num_heads, layer.num_v_heads
    q, k = (l2(fla_conv(c, p(x)).unflatten(-1, (H, -1))).repeat_interleave(HV // H, dim=2) for c, p in
            ((layer.q_conv1d, layer.q_proj), (layer.k_conv1d, layer.k_proj)))
    v = fla_conv(layer.v_conv1d, layer.v_proj(x)).unflatten(-1, (HV, -1))
    g = -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)
    o, _ = naive_recurrent_gated_delta_rule(q, k, v, layer.b_proj(x).sigmoid(), g)
    o = rms(o, layer.o_norm.weight, layer.o_norm.eps) * F.silu(layer.g_proj(x).unflatten(-1, (HV, -1)))
    return layer.o_proj(o.flatten(-2))


@pytest.mark.parametrize("use_gate", [False, True])
def test_fla_deltanet_state_dict_loads_and_outputs_match(use_gate):
    fla_layers = pytest.importorskip("fla.layers")
    torch.manual_seed(0)
    theirs = fla_layers.DeltaNet(hidden_size=D, num_heads=2, use_gate=use_gate, expand_v=2.0)
    torch.nn.init.normal_(theirs.o_norm.weight, std=0.3)  # fla's starts at 1; move it so the test sees it
    ours = DeltaNet(D, num_heads=2, use_gate=use_gate, expand_v=2.0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 13, D)
    torch.testing.assert_close(ours(x), fla_deltanet_math(theirs, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_v_heads", [None, 4])
def test_fla_gated_deltanet_state_dict_loads_and_outputs_match(num_v_heads):
    fla_layers = pytest.importorskip("fla.layers")
    torch.manual_seed(0)
    theirs = fla_layers.GatedDeltaNet(hidden_size=D, head_dim=8, num_heads=2, num_v_heads=num_v_heads)
    torch.nn.init.normal_(theirs.o_norm.weight, std=0.3)
    ours = GatedDeltaNet(D, head_dim=8, num_heads=2, num_v_heads=num_v_heads)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 13, D)
    torch.testing.assert_close(ours(x), fla_gated_deltanet_math(theirs, x), atol=1e-5, rtol=1e-4)


def small(cls, **kw):
    torch.manual_seed(0)
    if cls is GatedDeltaNet:
        return GatedDeltaNet(D, head_dim=8, num_heads=2, chunk_size=8, **kw)
    return DeltaNet(D, num_heads=2, chunk_size=8, **kw)


@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet])
def test_packed_sequences_equal_separate_ones(cls):
    layer = small(cls).double()
    lens = [5, 1, 12]
    xs = [torch.randn(1, n, D, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 5, 6, 18])
    packed = layer(torch.cat(xs, dim=1), cu_seqlens=cu)
    torch.testing.assert_close(packed, torch.cat([layer(x) for x in xs], dim=1))
    with pytest.raises(ValueError, match="cu_seqlens takes a packed batch"):
        layer(torch.cat(xs, dim=1), layer.allocate_inference_cache(1, 32), cu_seqlens=cu)


@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet])
@pytest.mark.parametrize("kw", [{}, {"use_short_conv": False}, {"allow_neg_eigval": True}, {"use_gate": False}])
def test_options_prefill_then_steps(cls, kw):
    if cls is DeltaNet and "use_gate" in kw:
        kw = {"use_gate": True, "qk_activation": "elu", "qk_norm": "sum", "use_beta": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = small(cls, **kw).double()
    x = torch.randn(2, 11, D, dtype=torch.float64)
    full = layer(x)
    cache = layer.allocate_inference_cache(2, 16)
    parts = [layer(x[:, :7], cache)] + [layer(x[:, t:t + 1], cache) for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full)
    assert cache.seqlen_offset.tolist() == [11, 11]


@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet])
def test_bf16_module_keeps_an_fp32_state(cls):
    layer = small(cls).to(torch.bfloat16)
    if cls is GatedDeltaNet:
        assert layer.A_log.dtype == torch.float32 and layer.dt_bias.dtype == torch.float32
    x = torch.randn(2, 9, D)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    cache = layer.allocate_inference_cache(2, 16)
    assert cache.state.dtype == torch.float32
    layer(x.bfloat16(), cache)
    y32 = small(cls)(x)
    torch.testing.assert_close(y.float(), y32, atol=5e-2, rtol=5e-2)


def test_hybrid_lm_compiles_without_graph_breaks_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = LRNNLMHeadModel(d_model=D, d_state=8, n_layer=3, vocab_size=40,
                            mixer_types=["gated_deltanet", "deltanet", "attn"],
                            mixer_kwargs={"gated_deltanet": {"head_dim": 8, "num_heads": 2},
                                          "deltanet": {"num_heads": 2}, "attn": {"num_heads": 2}})
    ids = torch.randint(0, 40, (2, 10))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    torch.testing.assert_close(torch.compile(model, backend="eager")(ids).logits, model(ids).logits)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    again = LRNNLMHeadModel(d_model=D, d_state=8, n_layer=3, vocab_size=40,
                            mixer_types=["gated_deltanet", "deltanet", "attn"],
                            mixer_kwargs={"gated_deltanet": {"head_dim": 8, "num_heads": 2},
                                          "deltanet": {"num_heads": 2}, "attn": {"num_heads": 2}})
    again.load_state_dict(torch.load(path))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_constructor_errors_name_the_value():
    with pytest.raises(ValueError, match=r"d_model \* expand_k = 30 must be a whole multiple of num_heads=4"):
        DeltaNet(30)
    with pytest.raises(ValueError, match="qk_activation must be one of"):
        DeltaNet(D, qk_activation="gelu")
    with pytest.raises(ValueError, match="num_v_heads=3 must be a multiple of num_heads=2"):
        GatedDeltaNet(D, head_dim=8, num_heads=2, num_v_heads=3)
    with pytest.raises(ValueError, match="output_gate_activation must be one of"):
        GatedDeltaNet(D, head_dim=8, num_heads=2, output_gate_activation="relu")
    with pytest.raises(TypeError, match="head_dim must be a positive int"):
        GatedDeltaNet(D, head_dim=8.0)
