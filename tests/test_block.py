import functools

import pytest
import torch
from stand_ins import CausalMeanMixer, TupleMixer
from torch import nn

from seqblocks import MHA, Block, GatedMLP, IdentityMixer, LayerNorm, RMSNorm
from seqblocks.testing import assert_close

NORMS = [nn.LayerNorm, LayerNorm, RMSNorm, nn.RMSNorm]


def _pair(norm_cls, residual_in_fp32, dtype, mlp=True):
    make = functools.partial(
        Block, 16, CausalMeanMixer, (lambda d: GatedMLP(d, multiple_of=8)) if mlp else nn.Identity,
        norm_cls=norm_cls, residual_in_fp32=residual_in_fp32,
    )
    fused, unfused = make(fused_add_norm=True), make(fused_add_norm=False)
    for module in (fused, unfused):
        for name, p in module.named_parameters():
            if "norm" in name:  # non-trivial norm parameters
                torch.manual_seed(len(name))
                p.data.normal_()
    unfused.load_state_dict(fused.state_dict())
    return fused.to(dtype), unfused.to(dtype)


@pytest.mark.parametrize("norm_cls", NORMS)
@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_equals_unfused(norm_cls, residual_in_fp32, dtype, atol):
    fused, unfused = _pair(norm_cls, residual_in_fp32, dtype)
    x = torch.randn(2, 6, 16, dtype=dtype)
    residual = torch.randn(2, 6, 16, dtype=dtype)
    for res in (None, residual):
        h1, r1 = fused(x, res)
        h2, r2 = unfused(x, res)
        assert h1.dtype == h2.dtype == dtype and r1.dtype == r2.dtype
        assert_close(h1, h2, atol=atol, rtol=atol)
        assert_close(r1, r2, atol=atol, rtol=atol)


@pytest.mark.parametrize("fused", [True, False])
def test_residual_dtype_follows_residual_in_fp32(fused):
    for flag, expected in ((True, torch.float32), (False, torch.bfloat16)):
        block = Block(16, CausalMeanMixer, GatedMLP, norm_cls=RMSNorm, fused_add_norm=fused,
                      residual_in_fp32=flag).to(torch.bfloat16)
        x = torch.randn(2, 4, 16, dtype=torch.bfloat16)
        h, r = block(x)
        assert h.dtype == torch.bfloat16 and r.dtype == expected
        h, r = block(h, r)
        assert h.dtype == torch.bfloat16 and r.dtype == expected


def test_block_math_add_norm_mixer_add_norm_mlp():
    block = Block(16, CausalMeanMixer, lambda d: GatedMLP(d, multiple_of=8), norm_cls=nn.LayerNorm,
                  fused_add_norm=False)
    x, res = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    r1 = x + res
    h1 = block.mixer(block.norm(r1))
    r2 = h1 + r1
    expected = block.mlp(block.norm2(r2))
    h, r = block(x, res)
    assert_close(h, expected, atol=1e-6)
    assert_close(r, r2, atol=1e-6)


def test_first_block_uses_hidden_states_as_residual():
    block = Block(16, CausalMeanMixer, nn.Identity)
    x = torch.randn(1, 3, 16)
    h, r = block(x)
    assert torch.equal(r, x) and block.mlp is None and block.norm2 is None
    assert_close(h, block.mixer(block.norm(x)), atol=1e-6)


def test_identity_mixer_block_is_a_true_identity():
    block = Block(16, IdentityMixer, nn.Identity)
    x, res = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    h, r = block(x, res)
    assert h is x and r is res
    h, r = block(x)
    assert h is x and r is None
    assert block.norm is None and not list(block.parameters())


def test_identity_mixer_with_mlp_runs_only_the_mlp_sublayer():
    block = Block(16, IdentityMixer, lambda d: GatedMLP(d, multiple_of=8), fused_add_norm=False)
    x, res = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    h, r = block(x, res)
    assert_close(r, x + res, atol=0)
    assert_close(h, block.mlp(block.norm2(x + res)), atol=1e-6)


def test_tuple_returning_mixer_is_handled():
    block = Block(16, TupleMixer, nn.Identity)
    x = torch.randn(2, 3, 16)
    h, _ = block(x)
    assert h.shape == x.shape
    assert_close(h, block.mixer.lin(block.norm(x)), atol=1e-6)


def test_mixer_kwargs_the_mixer_does_not_accept_raise():
    block = Block(16, CausalMeanMixer, nn.Identity)
    with pytest.raises(TypeError, match=r"CausalMeanMixer does not take the inputs \['lengths'\]"):
        block(torch.randn(1, 2, 16), lengths=torch.tensor([2]))
    # None-valued optional inputs are "not given"
    block(torch.randn(1, 2, 16), lengths=None)
    with pytest.raises(TypeError, match="TupleMixer is not a seqblocks Mixer and takes no"):
        Block(16, TupleMixer, nn.Identity)(torch.randn(1, 2, 16), lengths=torch.tensor([2]))


def test_fused_add_norm_rejects_other_norms():
    with pytest.raises(ValueError, match="fused_add_norm=True needs a LayerNorm or RMSNorm, got BatchNorm1d"):
        Block(16, CausalMeanMixer, nn.Identity, norm_cls=nn.BatchNorm1d)
    Block(16, CausalMeanMixer, nn.Identity, norm_cls=lambda d: nn.GroupNorm(1, d), fused_add_norm=False)


def test_shape_errors():
    block = Block(16, CausalMeanMixer, nn.Identity)
    with pytest.raises(ValueError, match=r"must be \[B, T, 16\]"):
        block(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="residual shape"):
        block(torch.randn(2, 3, 16), torch.randn(2, 4, 16))


def test_block_cache_prefill_then_steps_equals_full_pass():
    blocks = nn.ModuleList(Block(16, CausalMeanMixer, GatedMLP) for _ in range(3))
    x = torch.randn(2, 8, 16)

    def run(x, caches=None):
        h, r = x, None
        for i, b in enumerate(blocks):
            h, r = b(h, r, inference_params=None if caches is None else caches[i])
        return h + r

    full = run(x)
    caches = [b.allocate_inference_cache(2, 8) for b in blocks]
    outs = [run(x[:, :5], caches)] + [run(x[:, t : t + 1], caches) for t in range(5, 8)]
    assert_close(torch.cat(outs, 1), full, atol=1e-5)
    assert caches[0].seqlen_offset.tolist() == [8, 8]


def test_seed_000_usage_example():
    # Seed 000's example with only the import lines changed.
    block = Block(
        dim=768,
        mixer_cls=lambda dim: MHA(
            embed_dim=dim,
            num_heads=12,
            causal=True
        ),
        mlp_cls=lambda dim: GatedMLP(in_features=dim),
        norm_cls=nn.LayerNorm,
        fused_add_norm=True
    )
    x = torch.randn(2, 128, 768)  # (batch, seq_len, dim)
    hidden_states, residual = block(x)
    assert hidden_states.shape == residual.shape == (2, 128, 768)
    # causal: the first 64 outputs ignore the last 64 tokens
    x2 = x.clone()
    x2[:, 64:] = torch.randn(2, 64, 768)
    assert_close(block(x2)[0][:, :64], hidden_states[:, :64], atol=1e-5)

    class MyModel(nn.Module):
        def __init__(self, dim=768, n_layers=24):
            super().__init__()
            self.layers = nn.ModuleList([
                Block(
                    dim=dim,
                    mixer_cls=lambda d: MHA(embed_dim=d, num_heads=12),
                    mlp_cls=lambda d: GatedMLP(in_features=d),
                )
                for _ in range(n_layers)
            ])

        def forward(self, x):
            residual = None
            for layer in self.layers:
                x, residual = layer(x, residual=residual)
            return x

    model = MyModel(n_layers=2)
    out = model(torch.randn(2, 16, 768))
    assert out.shape == (2, 16, 768) and torch.isfinite(out).all()
    cache = block.allocate_inference_cache(batch_size=1, max_seqlen=2048, dtype=torch.float16)
    assert cache.batch_size == 1 and cache.max_seqlen == 2048
