import pytest
import torch
import torch.nn.functional as F

from seqblocks import BlockConfig, GatedMLP, ffn_registry


def test_gated_mlp_signature_defaults_and_rounding():
    mlp = GatedMLP(in_features=100)
    assert mlp.hidden_features == 384  # int(800 / 3) = 266 -> next multiple of 128
    assert mlp.out_features == 100 and mlp.fc1.bias is None and mlp.fc2.bias is None
    mlp = GatedMLP(64, hidden_features=100, out_features=32, bias=True, multiple_of=16)
    assert (mlp.hidden_features, mlp.fc1.out_features, mlp.fc2.out_features) == (112, 224, 32)
    assert mlp.fc1.bias is not None


def test_gated_mlp_math():
    mlp = GatedMLP(8, hidden_features=16, multiple_of=8, activation=F.gelu)
    x = torch.randn(2, 3, 8)
    h = x @ mlp.fc1.weight.T
    y, gate = h[..., :16], h[..., 16:]
    torch.testing.assert_close(mlp(x), (y * F.gelu(gate)) @ mlp.fc2.weight.T)


def test_gated_mlp_rejects_bad_sizes():
    with pytest.raises(ValueError, match="in_features=0"):
        GatedMLP(0)
    with pytest.raises(ValueError, match="multiple_of=0"):
        GatedMLP(8, multiple_of=0)


def _relu2(x):
    return F.relu(x) ** 2


@pytest.mark.parametrize("name, act", [("standard", F.gelu), ("relu", F.relu), ("relu2", _relu2)])
def test_two_matrix_ffns(name, act):
    cfg = BlockConfig(d_model=8, n_heads=2, d_ff=24, ffn=name)
    ffn = ffn_registry.get(name)(cfg)
    x = torch.randn(2, 3, 8)
    expected = ffn.down(act(ffn.up(x)))
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.up.out_features == 24 and ffn.up.bias is not None


@pytest.mark.parametrize("name, act", [("gated", F.silu), ("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_ffns(name, act):
    cfg = BlockConfig(d_model=8, n_heads=2, d_ff=24, bias=False)
    ffn = ffn_registry.get(name)(cfg)
    x = torch.randn(2, 3, 8)
    gate, up = (x @ ffn.gate_up.weight.T).chunk(2, -1)
    torch.testing.assert_close(ffn(x), (act(gate) * up) @ ffn.down.weight.T)
    assert ffn.gate_up.bias is None


def test_relu2_mlp_is_registered_and_computes_squared_relu():
    from seqblocks.layers.ffn import ReLU2MLP
    from seqblocks.registry import MLPS

    assert MLPS.get("relu2_mlp") is ReLU2MLP
    mlp = ReLU2MLP(8, hidden_features=20, out_features=6, bias=True, multiple_of=16)
    assert mlp.hidden_features == 32 and mlp.fc1.weight.shape == (32, 8) and mlp.fc2.weight.shape == (6, 32)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(mlp(x), mlp.fc2(torch.clamp(mlp.fc1(x), min=0) ** 2))
    assert ReLU2MLP(8).hidden_features == 128  # 4 * 8 rounded up to the default multiple
    for bad in ({"in_features": 0}, {"in_features": 8, "multiple_of": 0}, {"in_features": 8, "hidden_features": -1}):
        with pytest.raises(ValueError, match="ReLU2MLP"):
            ReLU2MLP(**bad)
