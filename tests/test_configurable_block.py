import math

import pytest
import torch
import torch.nn.functional as F
from stand_ins import CausalMeanMixer
from torch import nn

from seqblocks import AttentionBase, BlockConfig, ConfigurableBlock, attention_registry
from seqblocks.testing import assert_close


@pytest.fixture
def mean_mixer():
    with attention_registry.scoped():
        attention_registry.register("test_mean", CausalMeanMixer)
        yield "test_mean"


def _config(attention, **kw):
    base = dict(attention=attention, d_model=16, n_heads=2, d_ff=32, norm="rms_norm", ffn="gated", position="none")
    base.update(kw)
    return BlockConfig(**base)


def test_pre_norm_formula(mean_mixer):
    block = ConfigurableBlock(_config(mean_mixer, pre_norm=True))
    x = torch.randn(2, 5, 16)
    h = x + block.attention(block.attn_norm(x))
    expected = h + block.ffn(block.ffn_norm(h))
    out, cache = block(x)
    assert cache is None
    assert_close(out, expected, atol=1e-6)


def test_post_norm_formula(mean_mixer):
    block = ConfigurableBlock(_config(mean_mixer, pre_norm=False))
    x = torch.randn(2, 5, 16)
    h = block.attn_norm(x + block.attention(x))
    expected = block.ffn_norm(h + block.ffn(h))
    out, _ = block(x)
    assert_close(out, expected, atol=1e-6)


def test_mixer_from_config_passes_matching_fields_and_mixer_kwargs(mean_mixer):
    block = ConfigurableBlock(_config(mean_mixer, mixer_kwargs={"layer_idx": 3}))
    assert isinstance(block.attention, CausalMeanMixer)


def test_none_components_skip_their_sublayer(mean_mixer):
    x = torch.randn(2, 5, 16)
    ffn_only = ConfigurableBlock(_config("none"))
    assert ffn_only.attn_norm is None
    assert_close(ffn_only(x)[0], x + ffn_only.ffn(ffn_only.ffn_norm(x)), atol=1e-6)
    mix_only = ConfigurableBlock(_config(mean_mixer, ffn="none", pre_norm=False))
    assert mix_only.ffn_norm is None
    assert_close(mix_only(x)[0], mix_only.attn_norm(x + mix_only.attention(x)), atol=1e-6)
    nothing = ConfigurableBlock(_config("none", ffn="none"))
    assert nothing(x)[0] is x and not list(nothing.parameters())


def test_cache_is_filled_and_returned(mean_mixer):
    block = ConfigurableBlock(_config(mean_mixer))
    x = torch.randn(2, 6, 16)
    full, _ = block(x)
    cache = block.allocate_inference_cache(2, 6)
    a, cache_a = block(x[:, :4], cache=cache)
    b, cache_b = block(x[:, 4:], cache=cache)
    assert cache_a is cache and cache_b is cache and cache.seqlen_offset.tolist() == [6, 6]
    assert_close(torch.cat((a, b), 1), full, atol=1e-6)


def test_dropout_only_in_training(mean_mixer):
    block = ConfigurableBlock(_config(mean_mixer, dropout=0.5))
    x = torch.randn(2, 6, 16)
    block.eval()
    assert torch.equal(block(x)[0], block(x)[0])
    block.train()
    assert not torch.equal(block(x)[0], block(x)[0])


def test_mask_reaches_only_mixers_that_take_it(mean_mixer):
    block = ConfigurableBlock(_config(mean_mixer))
    with pytest.raises(TypeError, match=r"does not take the inputs \['mask'\]"):
        block(torch.randn(1, 3, 16), mask=torch.ones(1, 3, dtype=torch.bool))


def test_rope_position_is_handed_to_attention():
    with attention_registry.scoped():

        @attention_registry.register("probe")
        class Probe(AttentionBase):
            def forward(self, x, mask=None, cache=None):
                return x, cache

        block = ConfigurableBlock(_config("probe", position="rope"))
        assert block.position is not None and block.attention.position is block.position
        additive = ConfigurableBlock(_config("probe", position="learned"))
        assert additive.position is None and additive.attention.position is None


def test_device_dtype_and_type_errors(mean_mixer):
    block = ConfigurableBlock(_config(mean_mixer), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in block.parameters())
    with pytest.raises(TypeError, match="expects a BlockConfig"):
        ConfigurableBlock({"attention": "mha"})
    with pytest.raises(ValueError, match=r"x must be \[B, T, 16\]"):
        block(torch.randn(2, 3, 4, dtype=torch.float64))


def test_seed_001_sliding_window_extension_example():
    """Seed 001's "How to add a new component", adapted to PyTorch, registered as written."""
    with attention_registry.scoped():
        if "sliding_window" in attention_registry:  # the built-in one; the example registers its own
            attention_registry.unregister("sliding_window")

        # Step 1: implement the module.
        @attention_registry.register("sliding_window")
        class SlidingWindowAttention(AttentionBase):
            """Attention with a fixed-size sliding window."""

            def __init__(self, config: BlockConfig) -> None:
                super().__init__(config)
                self.window_size = config.window_size or config.max_seq_len
                self.q_proj = nn.Linear(self.d_model, self.d_model, bias=config.bias)
                self.k_proj = nn.Linear(self.d_model, self.d_model, bias=config.bias)
                self.v_proj = nn.Linear(self.d_model, self.d_model, bias=config.bias)
                self.o_proj = nn.Linear(self.d_model, self.d_model, bias=config.bias)
                self.scale = self.head_dim**-0.5

            def forward(self, x, mask=None, cache=None):
                B, T, _ = x.shape
                q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                           for p in (self.q_proj, self.k_proj, self.v_proj))
                i = torch.arange(T)
                allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window_size)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
                return self.o_proj(out.transpose(1, 2).reshape(B, T, self.d_model)), cache

        # Step 3: reference it in a config.
        config = BlockConfig(attention="sliding_window", ffn="gated", norm="rms_norm", position="rope",
                             d_model=64, n_heads=8, window_size=3)
        block = ConfigurableBlock(config)
        assert isinstance(block.attention, SlidingWindowAttention)
        x = torch.randn(2, 10, 64)
        out, cache = block(x)
        assert out.shape == x.shape and cache is None
        # the window really limits the context: token 0 no longer influences token 5
        x2 = x.clone()
        x2[:, 0] += 1.0
        assert torch.equal(block(x2)[0][:, 5:], out[:, 5:])
        assert not torch.equal(block(x2)[0][:, 2], out[:, 2])
        assert math.isclose(block.attention.scale, 8**-0.5)
