"""The GLA and RetNet mixers against fla 0.6.0's layers: their state dicts load into ours unchanged,
and our outputs equal the layer's computation written through fla's own naive recurrences (fla's
layers run Triton kernels, which cannot run on this CPU; the projections, gate and norm are fla's
modules and arithmetic). The mixer contract runs over both in tests/test_mixer_contract.py.

Shapes: B batch, T time, D model width, H heads, K key head width, V value head width.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from seqblocks.layers.mixers import GatedLinearAttention, MultiScaleRetention
from seqblocks.testing import assert_close

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fla warns that Triton cannot run on this CPU
    fla_gla = pytest.importorskip("fla.layers.gla", reason="fla (flash-linear-attention) is not installed")
    fla_msr = pytest.importorskip("fla.layers.multiscale_retention")
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

D = 32


def _head_norm_gate(o, g, weight, eps):
    # fla's FusedRMSNormGated (swish): rmsnorm(o) * weight * silu(g), per head, in fp32
    o = o.float()
    return o * torch.rsqrt(o.square().mean(-1, keepdim=True) + eps) * weight * F.silu(g.float())


def _fla_gla_forward(layer, x):
    H, K, V = layer.num_heads, layer.head_k_dim, layer.head_v_dim
    q, k, v = (p(x).unflatten(-1, (H, -1)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    gk = F.logsigmoid(layer.gk_proj(x).unflatten(-1, (H, K))) / layer.gate_logit_normalizer
    o, _ = naive_recurrent_gla(q, k, v, gk)
    o = _head_norm_gate(o, layer.g_proj(x).unflatten(-1, (H, V)), layer.g_norm_swish_gate.weight,
                        layer.g_norm_swish_gate.eps)
    return layer.o_proj(o.flatten(-2))


def _rope(x, base=10000.0):
    # GPT-NeoX halves over the whole head, positions 0..T-1 (fla's RotaryEmbedding, interleaved=False)
    T, K = x.shape[1], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, K, 2, dtype=torch.float64) / K)
    ang = (torch.arange(T, dtype=torch.float64)[:, None] * inv)[None, :, None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def _fla_retnet_forward(layer, x):
    H, V = layer.num_heads, layer.head_v_dim
    q, k, v = (p(x).unflatten(-1, (H, -1)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    q, k = _rope(q), _rope(k)
    g = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32))).expand(*x.shape[:2], H)
    o, _ = naive_recurrent_simple_gla(q, k, v, g)
    o = _head_norm_gate(o, layer.g_proj(x).unflatten(-1, (H, V)), layer.g_norm_swish_gate.weight,
                        layer.g_norm_swish_gate.eps)
    return layer.o_proj(o.flatten(-2))


def test_gla_loads_fla_state_dict_and_matches():
    torch.manual_seed(0)
    theirs = fla_gla.GatedLinearAttention(hidden_size=D, num_heads=2, gate_low_rank_dim=8)
    with torch.no_grad():
        theirs.g_norm_swish_gate.weight.uniform_(0.5, 1.5)
    ours = GatedLinearAttention(D, num_heads=2, gate_low_rank_dim=8)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 21, D)
    with torch.no_grad():
        assert_close(ours(x), _fla_gla_forward(theirs, x), atol=2e-5, rtol=1e-4)


def test_retnet_loads_fla_state_dict_and_matches():
    torch.manual_seed(0)
    theirs = fla_msr.MultiScaleRetention(hidden_size=D, num_heads=4)
    ours = MultiScaleRetention(D, num_heads=4)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 19, D)
    with torch.no_grad():
        assert_close(ours(x), _fla_retnet_forward(theirs, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [GatedLinearAttention, MultiScaleRetention])
def test_packed_documents_equal_separate_rows(cls):
    torch.manual_seed(0)
    layer = cls(D, num_heads=2).double()
    x = torch.randn(1, 12, D, dtype=torch.float64)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    packed = layer(x, cu_seqlens=cu)
    assert_close(packed[:, :5], layer(x[:, :5]), atol=1e-10)
    assert_close(packed[:, 5:], layer(x[:, 5:]), atol=1e-10)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, layer.allocate_inference_cache(1, 12), cu_seqlens=cu)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 / int64 tensor"):
        layer(x, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, cu_seqlens=torch.tensor([0, 5, 11], dtype=torch.int32))  # does not end at T


@pytest.mark.parametrize("cls", [GatedLinearAttention, MultiScaleRetention])
def test_bf16_close_to_fp32_and_gradients_flow(cls):
    torch.manual_seed(0)
    layer = cls(D, num_heads=2)
    x = torch.randn(2, 17, D)
    ref = layer(x)
    low = cls(D, num_heads=2, dtype=torch.bfloat16)
    low.load_state_dict(layer.state_dict())
    xb = x.bfloat16().requires_grad_()
    y = low(xb)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    y.float().square().sum().backward()
    assert torch.isfinite(xb.grad).all() and all(torch.isfinite(p.grad).all() for p in low.parameters())


def test_feature_map_gqa_and_no_output_gate():
    torch.manual_seed(0)
    layer = GatedLinearAttention(D, num_heads=4, num_kv_heads=2, feature_map="relu", use_output_gate=False,
                                 clamp_min=-2.0).double()
    assert "g_norm.weight" in layer.state_dict() and layer.k_proj.out_features == layer.key_dim // 2
    x = torch.randn(2, 9, D, dtype=torch.float64)
    cache = layer.allocate_inference_cache(2, 9)
    steps = torch.cat([layer(x[:, :4], cache)] + [layer(x[:, t : t + 1], cache) for t in range(4, 9)], 1)
    assert_close(steps, layer(x), atol=1e-10)


@pytest.mark.parametrize("kwargs, match", [
    ({"expand_k": 0.3}, "expand_k"), ({"num_heads": 3}, "divisible"), ({"feature_map": "tanh"}, "feature_map"),
    ({"num_kv_heads": 3}, "num_kv_heads"), ({"gate_logit_normalizer": 0}, "gate_logit_normalizer"),
    ({"clamp_min": 1.0}, "clamp_min"),
])
def test_gla_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedLinearAttention(D, **kwargs)


def test_retnet_decays_are_the_papers_and_survive_casts():
    layer = MultiScaleRetention(D, num_heads=4).bfloat16()
    expected = torch.log(1 - 2.0 ** (-5.0 - torch.arange(4, dtype=torch.float64)))
    assert layer.log_decay.dtype == torch.float64
    assert_close(layer.log_decay, expected, atol=1e-15)
    with pytest.raises(ValueError, match="even"):
        MultiScaleRetention(24, num_heads=8)


def test_tiny_gla_hybrid_preset_builds_and_decodes():
    from seqblocks import generate
    from seqblocks.presets import PRESETS, build_model

    torch.manual_seed(0)
    model = build_model(PRESETS["tiny-gla-hybrid"]["model"]).eval()
    assert model.config.mixer_types == ("gla", "attn", "gla", "attn")
    prompt = torch.randint(0, 98, (2, 5))
    out = generate(model, prompt, max_new_tokens=4, temperature=0.0)
    tokens = out.sequences
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), tokens[:, 5:])  # greedy decode == full-pass argmax


def test_gla_and_retnet_compile_to_one_graph():
    from seqblocks.models import LRNNLMHeadModel

    torch.manual_seed(0)
    model = LRNNLMHeadModel(d_model=D, d_state=8, n_layer=2, vocab_size=50, mixer_types=["gla", "retnet"],
                            mixer_kwargs={"gla": {"num_heads": 2}, "retnet": {"num_heads": 2}})
    ids = torch.randint(0, 50, (2, 12))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    torch.testing.assert_close(torch.compile(model, backend="eager")(ids).logits, model(ids).logits)


def test_save_and_load_round_trip(tmp_path):
    from seqblocks.models import LRNNLMHeadModel

    torch.manual_seed(0)
    model = LRNNLMHeadModel(d_model=D, d_state=8, n_layer=2, vocab_size=50, mixer_types=["gla", "retnet"],
                            mixer_kwargs={"gla": {"num_heads": 2, "gate_low_rank_dim": 8}, "retnet": {"num_heads": 2}})
    model.save_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 50, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
