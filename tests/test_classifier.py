"""Classifier: pooling math, event timesteps through intermediate pooling, padded batches, every mixer."""

from __future__ import annotations

import pytest
import torch
from test_lm import ALL_TYPES, TEST_MIXER_KWARGS, DecayMixer, no_grad, stand_in_mixers  # noqa: F401 (fixtures)

from seqblocks import Classifier
from seqblocks.models.classifier import pool_sequence, pool_windows
from seqblocks.testing import assert_close


def test_pool_windows_with_lengths_and_timesteps():
    x = torch.arange(1.0, 8.0)[None, :, None].repeat(2, 1, 1)  # values 1..7, T = 7
    lengths = torch.tensor([7, 4])
    ts = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7], [0.5, 0.5, 1, 1, 9, 9, 9]])
    mean, new_len, new_ts = pool_windows(x, "mean", 3, lengths, ts)
    assert new_len.tolist() == [3, 2]  # ceil(7 / 3), ceil(4 / 3)
    assert mean[0, :, 0].tolist() == [2.0, 5.0, 7.0]  # the trailing partial window is kept
    assert mean[1, :, 0].tolist() == [2.0, 4.0, 0.0]  # padding never enters a window
    assert new_ts.tolist() == [[6.0, 15.0, 7.0], [2.0, 1.0, 0.0]]  # time deltas summed per window
    mx, _, _ = pool_windows(x, "max", 3, lengths)
    assert mx[:, :, 0].tolist() == [[3.0, 6.0, 7.0], [3.0, 4.0, 0.0]]
    last, _, _ = pool_windows(x, "stride", 3, lengths)
    assert last[:, :, 0].tolist() == [[3.0, 6.0, 7.0], [3.0, 4.0, 0.0]]
    full, none_len, none_ts = pool_windows(x, "mean", 2)
    assert full.shape == (2, 4, 1) and none_len is None and none_ts is None
    with pytest.raises(ValueError, match="intermediate pooling"):
        pool_windows(x, "median", 2)


def test_pool_sequence():
    x = torch.tensor([[[1.0], [5.0], [3.0]], [[2.0], [-1.0], [9.0]]])
    lengths = torch.tensor([3, 2])
    assert pool_sequence(x, "last", lengths)[:, 0].tolist() == [3.0, -1.0]
    assert pool_sequence(x, "mean", lengths)[:, 0].tolist() == [3.0, 0.5]
    assert pool_sequence(x, "max", lengths)[:, 0].tolist() == [5.0, 2.0]
    assert pool_sequence(x, "last")[:, 0].tolist() == [3.0, 9.0]


def event_classifier(**kwargs):
    kwargs = {"input_dim": 3, "num_classes": 4, "d_model": 16, "d_state": 4, "n_layers": 3,
              "lrnn_cls": "sbtest_decay", "intermediate_pooling": ["mean", "stride", "none"],
              "pooling_factor": 2, "dropout": 0.0, "dtype": torch.float64, **kwargs}
    return Classifier(**kwargs).eval()


def test_classifier_with_event_timesteps():
    model = event_classifier()
    x = torch.randn(3, 11, 3, dtype=torch.float64)
    lengths = torch.tensor([11, 5, 8])
    ts = torch.rand(3, 11, dtype=torch.float64) * 2
    out = model(x, lengths=lengths, integration_timesteps=ts)
    assert out.shape == (3, 4)
    for b in range(3):  # a padded row classifies exactly as the row alone
        n = int(lengths[b])
        alone = model(x[b : b + 1, :n], integration_timesteps=ts[b : b + 1, :n])
        assert_close(out[b : b + 1], alone, atol=1e-10)
    # Timesteps matter, and the pooled layers see the summed deltas: rescaling time changes the output.
    assert not torch.allclose(model(x, lengths=lengths, integration_timesteps=ts * 3), out)


def test_pooled_timesteps_reach_later_layers():
    """After mean pooling with stride 2, layer 2 sees dt'_k = dt_2k + dt_2k+1."""
    model = event_classifier(n_layers=2, intermediate_pooling=["mean", "none"], pooling="mean")
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    ts = torch.rand(1, 6, dtype=torch.float64) + 0.1
    calls = []
    hook = model.mixers[1].register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs),
                                                 with_kwargs=True)
    model(x, integration_timesteps=ts)
    hook.remove()
    assert_close(calls[0]["integration_timesteps"], ts.view(1, 3, 2).sum(-1), atol=1e-12)


def test_classifier_inputs_and_heads():
    tokens = Classifier(vocab_size=20, num_classes=3, d_model=16, n_layers=2, lrnn_cls="sbtest_decay",
                        embedding_dim=8, max_position_embeddings=32, pooling="max").eval()
    assert tokens(torch.randint(0, 20, (2, 9))).shape == (2, 3)
    regression = Classifier(5, output_dim=2, d_model=16, n_layers=2, lrnn_cls=["sbtest_decay", DecayMixer],
                            pooling="mean", lrnn_params={"d_model": 16, "d_state": 2})
    assert regression(torch.randn(2, 7, 5)).shape == (2, 2)
    assert regression.mixers[0].d_state == 2
    train = event_classifier(dropout=0.5).train()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    assert not torch.equal(train(x), train(x))


def test_classifier_errors():
    with pytest.raises(ValueError, match="pooling"):
        event_classifier(pooling="median")
    with pytest.raises(ValueError, match="intermediate_pooling has 2 entries"):
        event_classifier(intermediate_pooling=["mean", "none"])
    with pytest.raises(ValueError, match="input_dim"):
        Classifier(num_classes=2, lrnn_cls="sbtest_decay")
    with pytest.raises(ValueError, match="unknown mixer"):
        event_classifier(lrnn_cls="nope")
    model = event_classifier()
    with pytest.raises(ValueError, match=r"\[B, T, 3\]"):
        model(torch.randn(2, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="lengths must lie"):
        model(torch.randn(2, 5, 3, dtype=torch.float64), lengths=torch.tensor([6, 2]))


@pytest.mark.parametrize("mixer_type", ALL_TYPES)
def test_classifier_each_mixer(mixer_type):
    kwargs = TEST_MIXER_KWARGS.get(mixer_type)
    model = event_classifier(lrnn_cls=mixer_type, n_layers=2, intermediate_pooling=["stride", "none"],
                             lrnn_params={mixer_type: kwargs} if kwargs else None)
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    lengths = torch.tensor([9, 6])
    ts = torch.rand(2, 9, dtype=torch.float64) + 0.5
    out = model(x, lengths=lengths, integration_timesteps=ts)
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    if "lengths" in model.mixers[0].inputs:  # with lengths support, padding never leaks into a row
        alone = model(x[1:, :6], integration_timesteps=ts[1:, :6])
        assert_close(out[1:], alone, atol=1e-8)
