"""The block options the imported families need, each on its own: Llama 3.1 RoPE scaling, the (1 + w)
RMSNorm, the tanh-GELU FFNs, the embedding scale, RG-LRU's first-position rule, Mamba-2's norm epsilon."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqblocks import RGLRU, BlockConfig, ConfigurableBlock, LanguageModel, LanguageModelConfig, RotaryEmbedding
from seqblocks.layers.mixers.mamba2 import Mamba2
from seqblocks.layers.norm import OffsetRMSNorm, RMSNorm, norm_params
from seqblocks.layers.position import llama3_frequencies
from seqblocks.registry import FFNS, NORMS
from seqblocks.testing import check_chunked_prefill, check_lengths, check_prefill_then_steps


def _llama3_by_hand(inv_freq, factor, low, high, old):
    """The rule written out per frequency, in plain Python."""
    out = []
    for f in inv_freq.tolist():
        wavelength = 2 * math.pi / f
        if wavelength < old / high:
            out.append(f)
        elif wavelength > old / low:
            out.append(f / factor)
        else:
            s = (old / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=torch.float64)


def test_llama3_rope_frequencies():
    rope = RotaryEmbedding(64, base=500000.0, scaling_factor=8.0, scaling_type="llama3", low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_positions=8192)
    plain = RotaryEmbedding(64, base=500000.0)
    want = _llama3_by_hand(plain.inv_freq, 8.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(rope.inv_freq, want, rtol=1e-12, atol=0)
    # the three bands are all present at this size: kept, divided, blended
    ratio = (plain.inv_freq / rope.inv_freq).tolist()
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(8.0) and any(1.0 < r < 8.0 for r in ratio)
    torch.testing.assert_close(llama3_frequencies(plain.inv_freq, 8.0, 1.0, 4.0, 8192), want, rtol=1e-12, atol=0)


def test_llama3_rope_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=params)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    block = BlockConfig(attention="gqa", position="rope", d_model=256, n_heads=4, rope_theta=500000.0,
                        rope_scaling=8.0, rope_scaling_type="llama3",
                        rope_scaling_kwargs={"original_max_positions": 64})
    rope = ConfigurableBlock(block).position
    torch.testing.assert_close(rope.inv_freq.float(), want, rtol=1e-6, atol=0)


def test_rope_scaling_arguments_are_checked():
    with pytest.raises(ValueError, match="scaling_type='yarn'"):
        RotaryEmbedding(8, scaling_type="yarn")
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        RotaryEmbedding(8, scaling_factor=2.0, scaling_type="llama3", low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match="original_max_positions"):
        RotaryEmbedding(8, scaling_factor=2.0, scaling_type="llama3", original_max_positions=0)
    with pytest.raises(ValueError, match="rope_scaling_kwargs must hold JSON"):
        BlockConfig(rope_scaling_kwargs={"f": object()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offset_rms_norm_is_rms_norm_times_one_plus_w(dtype):
    torch.manual_seed(0)
    offset = OffsetRMSNorm(16, eps=1e-6)
    assert torch.equal(offset.weight, torch.zeros(16))  # init: the identity scale
    with torch.no_grad():
        offset.weight.normal_()
    plain = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        plain.weight.copy_(1 + offset.weight)
    x = torch.randn(3, 5, 16).to(dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(offset(x), plain(x), rtol=0, atol=0)
    offset = offset.to(dtype)
    h = x.float()
    want = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6) * (1 + offset.weight.float())).to(dtype)
    torch.testing.assert_close(offset(x), want, rtol=0, atol=0)
    weight = norm_params(offset, dtype)[0]
    assert weight.dtype == torch.float32  # (1 + w) is formed in fp32, as the reference does
    assert NORMS.get("gemma_rms_norm") is OffsetRMSNorm


def test_tanh_gelu_ffns():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    std = FFNS.get("gelu_tanh")(BlockConfig(d_model=8, d_ff=16))
    want = std.down(F.gelu(std.up(x), approximate="tanh"))
    torch.testing.assert_close(std(x), want, rtol=0, atol=0)
    gated = FFNS.get("geglu_tanh")(BlockConfig(d_model=8, d_ff=16, bias=True))
    gate, up = gated.gate_up(x).chunk(2, -1)
    torch.testing.assert_close(gated(x), gated.down(F.gelu(gate, approximate="tanh") * up), rtol=0, atol=0)
    assert not torch.allclose(gated(x), FFNS.get("geglu")(gated.config)(x))  # a different activation


def test_embedding_scale():
    torch.manual_seed(0)
    config = LanguageModelConfig.tiny_llama(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=None)
    plain = LanguageModel(config).eval()
    scaled = LanguageModel(config.replace(embedding_scale=4.0)).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 32, (1, 6))
    hidden_plain = plain(ids, return_hidden=True).hidden_states[0]
    hidden_scaled = scaled(ids, return_hidden=True).hidden_states[0]
    torch.testing.assert_close(hidden_scaled, 4.0 * hidden_plain)
    with pytest.raises(ValueError, match="embedding_scale"):
        config.replace(embedding_scale=-1.0)


def _rglru(scale_first_input, dtype=torch.float64):
    torch.manual_seed(0)
    return RGLRU(12, expand=1, num_heads=3, bias=True, scale_first_input=scale_first_input, dtype=dtype)


def test_rglru_first_position_rule():
    """scale_first_input=False: h_0 = i_0 x_0 exactly (the reference rule); later steps unchanged."""
    a, b = _rglru(True), _rglru(False)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    xs = b.in_proj(x)
    xc = F.conv1d(F.pad(xs.transpose(1, 2), (b.d_conv - 1, 0)), b.conv_weight[:, None], b.conv_bias,
                  groups=b.d_inner).transpose(1, 2)
    _, ri = b._gates(xc)
    h0 = torch.sigmoid(ri[:, 0]) * xc[:, 0]
    g = F.gelu(b.gate_proj(x), approximate="tanh")
    torch.testing.assert_close(b(x)[:, 0], b.out_proj(h0 * g[:, 0]))
    assert not torch.allclose(a(x)[:, 0], b(x)[:, 0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rglru_first_position_rule_decodes_as_it_computes(dtype):
    mixer = _rglru(False, dtype)
    x = torch.randn(3, 9, 12, dtype=torch.float64).to(dtype)
    atol = 1e-10 if dtype == torch.float64 else 5e-2
    check_prefill_then_steps(mixer, x, prefill=1, atol=atol)
    check_prefill_then_steps(mixer, x, prefill=4, atol=atol)
    check_chunked_prefill(mixer, x, split=5, atol=atol)
    check_lengths(mixer, x, torch.tensor([9, 4, 1]), atol=atol)
    with pytest.raises(TypeError, match="scale_first_input"):
        RGLRU(8, scale_first_input="no")


def test_mamba2_rmsnorm_eps():
    torch.manual_seed(0)
    a = Mamba2(16, d_state=4, headdim=8, rmsnorm_eps=1e-5)
    b = Mamba2(16, d_state=4, headdim=8, rmsnorm_eps=0.5)
    b.load_state_dict(a.state_dict())
    assert b.norm.eps == 0.5
    x = torch.randn(1, 5, 16)
    assert not torch.allclose(a(x), b(x))
    with pytest.raises(ValueError, match="rmsnorm_eps"):
        Mamba2(16, d_state=4, headdim=8, rmsnorm_eps=0.0)
