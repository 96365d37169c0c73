import math

import pytest
import torch

from seqblocks import ALiBi, BlockConfig, LearnedPosition, NoPosition, RotaryEmbedding, SinusoidalPosition
from seqblocks.layers.position import alibi_slopes, positions_from_offset
from seqblocks.registry import POSITIONS
from seqblocks.testing import assert_close


def test_rope_preserves_norms():
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 9, 3, 16, dtype=torch.float64)
    y = rope.rotate(x, torch.arange(9))
    assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_only_on_relative_offset(interleaved):
    rope = RotaryEmbedding(8, interleaved=interleaved)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq, pk):
        return (rope.rotate(q, torch.tensor([pq])) * rope.rotate(k, torch.tensor([pk]))).sum()

    base = score(7, 3)
    for shift in (1, 10, 1000):
        assert_close(score(7 + shift, 3 + shift), base, atol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_rope_partial_rotary_leaves_the_rest():
    rope = RotaryEmbedding(16, rotary_dim=4)
    x = torch.randn(2, 5, 2, 16)
    y = rope.rotate(x, torch.arange(5))
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert not torch.equal(y[:, 1:, :, :4], x[:, 1:, :, :4])
    assert torch.equal(y[:, 0], x[:, 0])  # position 0 is the identity rotation


def test_rope_interleaved_is_a_channel_permutation_of_halves():
    x = torch.randn(1, 6, 2, 8)
    pos = torch.arange(6)
    inter = RotaryEmbedding(8, interleaved=True).rotate(x, pos)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved pairs -> halves
    halves = RotaryEmbedding(8).rotate(x[..., perm], pos)
    assert_close(inter[..., perm], halves, atol=1e-6)


def test_rope_linear_scaling_interpolates_positions():
    x = torch.randn(1, 1, 1, 8)
    scaled = RotaryEmbedding(8, scaling_factor=4.0).rotate(x, torch.tensor([40]))
    plain = RotaryEmbedding(8).rotate(x, torch.tensor([10]))
    assert_close(scaled, plain, atol=1e-6)
    ntk = RotaryEmbedding(8, scaling_factor=4.0, scaling_type="ntk")
    assert ntk.inv_freq[-1] < RotaryEmbedding(8).inv_freq[-1]


def test_rope_from_config_and_errors():
    rope = POSITIONS.get("rope").from_config(BlockConfig(d_model=64, n_heads=4, rotary_dim=8, rope_theta=500.0))
    assert (rope.head_dim, rope.rotary_dim, rope.base) == (16, 8, 500.0)
    with pytest.raises(ValueError, match="rotary_dim=5"):
        RotaryEmbedding(8, rotary_dim=5)
    with pytest.raises(ValueError, match="scaling_type"):
        RotaryEmbedding(8, scaling_type="yarn")
    with pytest.raises(ValueError, match=r"expects \[B, T, H, 8\]"):
        rope = RotaryEmbedding(8)
        rope.rotate(torch.randn(2, 3, 8), torch.arange(3))
    with pytest.raises(TypeError, match="integer"):
        RotaryEmbedding(8).rotate(torch.randn(1, 2, 1, 8), torch.tensor([0.0, 1.0]))


def test_alibi_slopes_power_of_two_and_not():
    assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]), atol=0)
    expected12 = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert_close(alibi_slopes(12), torch.tensor(expected12), atol=1e-7)
    s = alibi_slopes(12)
    assert len(set(s.tolist())) == 12 and bool((s > 0).all() and (s <= 1).all())


def test_alibi_bias_is_linear_in_distance():
    alibi = ALiBi(4)
    bias = alibi.score_bias(torch.arange(5), torch.arange(5))
    assert bias.shape == (1, 4, 5, 5)
    assert_close(bias[0, 2, 4, 1], -alibi.slopes[2] * 3, atol=1e-7)
    assert torch.equal(bias.diagonal(dim1=-2, dim2=-1), torch.zeros(1, 4, 5))


def _full_and_decoded(module, kind, T=7, B=2, H=4, D=16):
    """Apply ``module`` to a full sequence, and to each position p alone with its absolute position."""
    if kind == "rotary":
        x = torch.randn(B, T, H, D)
        full = module.rotate(x, torch.arange(T))
        steps = [module.rotate(x[:, p : p + 1], torch.tensor([p])) for p in range(T)]
        # per-row offsets: rows at different positions in one batch
        offsets = torch.tensor([2, 5])
        per_row = module.rotate(torch.stack([x[0, 2:3], x[1, 5:6]]), positions_from_offset(offsets, 1))
        assert_close(per_row[:, 0], torch.stack([full[0, 2], full[1, 5]]), atol=1e-6)
        return full, torch.cat(steps, dim=1)
    if kind == "bias":
        pos = torch.arange(T)
        full = module.score_bias(pos, pos)
        rows = [module.score_bias(torch.tensor([p]), torch.arange(p + 1)) for p in range(T)]
        for p, row in enumerate(rows):
            assert torch.equal(row[..., 0, :], full[..., p, : p + 1])
        return full, full
    x = torch.randn(B, T, D)
    full = module.embed(x, torch.arange(T))
    steps = [module.embed(x[:, p : p + 1], positions_from_offset(torch.full((B,), p), 1)) for p in range(T)]
    return full, torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", sorted(POSITIONS.keys()))
def test_every_position_type_honours_the_cache_offset(name):
    cfg = BlockConfig(d_model=16, n_heads=4, head_dim=16, max_seq_len=32)
    module = POSITIONS.get(name).from_config(cfg)
    full, decoded = _full_and_decoded(module, module.kind, D=16)
    assert_close(decoded, full, atol=1e-6)


def test_sinusoidal_formula():
    pe = SinusoidalPosition(6).encoding(torch.tensor([3]))[0, 0]
    expected = []
    for i in range(3):
        angle = 3 / 10000 ** (2 * i / 6)
        expected += [math.sin(angle), math.cos(angle)]
    assert_close(pe, torch.tensor(expected), atol=1e-6)
    assert SinusoidalPosition(5).encoding(torch.arange(2)).shape == (1, 2, 5)


def test_learned_positions_range_checked():
    pos = LearnedPosition(4, 8)
    x = torch.zeros(1, 4, 8)
    assert torch.equal(pos.embed(x, torch.arange(4))[0], pos.table.weight)
    with pytest.raises(ValueError, match=r"\[0, 4\).*\[2, 5\]"):
        pos.embed(torch.zeros(1, 4, 8), torch.arange(2, 6))


def test_no_position_is_identity():
    x = torch.randn(2, 3, 8)
    none = NoPosition()
    assert none.embed(x, torch.arange(3)) is x and none.score_bias(torch.arange(3), torch.arange(3)) is None
