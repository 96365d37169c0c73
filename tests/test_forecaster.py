"""Forecaster and generate_continuous: forward / backward over several mixers, prefill + steps ==
forward, generation == teacher forcing (regular and irregular intervals), the event form, save / load,
dtypes, errors; the oscillator task and a short run that beats the last-value forecast."""

from __future__ import annotations

import pytest
import torch

import seqblocks
from seqblocks import Forecaster, generate_continuous
from seqblocks.checkpoint import load_pretrained
from seqblocks.tasks.signals import CoupledOscillators
from seqblocks.train.regression import fit_regression

MIXERS = ["S5", "Mamba", ["LRU", "attn"], "S4D"]
EVENT = {"S5": {"dt_min": 0.01, "dt_max": 1.0}, "Mamba": {"dt_min": 0.01, "dt_max": 1.0}}


def _model(mixers, **kwargs) -> Forecaster:
    model = Forecaster(3, d_model=16, n_layer=2, mixer_types=mixers, d_state=8, **kwargs)
    with torch.no_grad():  # the head starts at zero (the last-value forecast); give it weights
        model.head.weight.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("mixers", MIXERS)
def test_forward_backward(mixers):
    model = _model(mixers, d_intermediate=16)
    x, ts = torch.randn(2, 9, 3), torch.rand(2, 9) + 0.1
    y = model(x, integration_timesteps=ts)
    assert y.shape == (2, 9, 3) and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("mixers", MIXERS)
def test_prefill_then_steps_equals_forward(mixers):
    model = _model(mixers)
    x, ts = torch.randn(2, 10, 3), torch.rand(2, 10) + 0.1
    full = model(x, integration_timesteps=ts)
    caches = model.allocate_inference_cache(2, 10)
    parts = [model(x[:, :6], integration_timesteps=ts[:, :6], inference_params=caches)]
    parts += [model.step(x[:, t], caches, integration_timesteps=ts[:, t]) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_seqlen"):
        model.step(x[:, 0], caches)


@pytest.mark.parametrize("mixers", MIXERS)
def test_causal(mixers):
    model = _model(mixers)
    x, ts = torch.randn(2, 10, 3), torch.rand(2, 10) + 0.1
    x2, ts2 = x.clone(), ts.clone()
    x2[:, 5:] += 1.0
    ts2[:, 5:] += 0.5
    y, y2 = model(x, ts), model(x2, ts2)
    # S4D runs as an FFT convolution: the past moves by rounding only.
    torch.testing.assert_close(y[:, :5], y2[:, :5], rtol=0, atol=1e-5)
    assert (y[:, 5:] - y2[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("mixers", MIXERS)
@pytest.mark.parametrize("timesteps", ["none", "one", "per_position"])
def test_generation_equals_teacher_forcing(mixers, timesteps):
    model = _model(mixers)
    B, T, N = 2, 5, 7
    x = torch.randn(B, T, 3)
    ts = {"none": None, "one": torch.rand(B) + 0.1, "per_position": torch.rand(B, T + N - 1) + 0.1}[timesteps]
    generated = generate_continuous(model, x, N, integration_timesteps=ts)
    assert generated.shape == (B, N, 3)
    # Feed the context and the generated samples back in one forward pass: the same predictions.
    fed = torch.cat((x, generated[:, :-1]), 1)
    full_ts = None if ts is None else (ts if ts.dim() == 2 else ts[:, None].expand(B, T + N - 1))
    teacher = model(fed, integration_timesteps=full_ts)[:, T - 1:]
    torch.testing.assert_close(generated, teacher, rtol=1e-5, atol=1e-5)


def test_seed_form_and_generate_entry_point():
    model = _model("S5")
    seed = torch.randn(4, 3)
    out = generate_continuous(model, seed, 6, integration_timesteps=torch.full((4, 1), 0.5))
    assert out.shape == (4, 6, 3)
    torch.testing.assert_close(seqblocks.generate(model, seed, 6, integration_timesteps=torch.full((4,), 0.5)), out)
    torch.testing.assert_close(out[:, 0], model(seed[:, None], torch.full((4, 1), 0.5))[:, 0])
    with pytest.raises(ValueError, match="token-sampling"):
        seqblocks.generate(model, seed, 6, temperature=0.5)
    assert model.training  # generation leaves the mode as it was


@pytest.mark.parametrize("mixer", ["S5", "Mamba"])
def test_event_form(mixer):
    model = _model(mixer, mixer_kwargs=EVENT[mixer])
    assert model.event_form()
    x = torch.randn(2, 8, 3)
    torch.testing.assert_close(model(x, integration_timesteps=torch.ones(2, 8)), model(x), rtol=0, atol=0)
    assert (model(x, integration_timesteps=torch.full((2, 8), 0.3)) - model(x)).abs().max() > 1e-3


def test_mixers_without_event_form_ignore_timesteps():
    model = _model(["LRU", "attn"])
    assert not model.event_form()
    x = torch.randn(2, 8, 3)
    torch.testing.assert_close(model(x, integration_timesteps=torch.full((2, 8), 0.3)), model(x))


def test_predict_increment_starts_at_last_value():
    model = Forecaster(2, d_model=8, n_layer=1)
    x = torch.randn(2, 6, 2)
    torch.testing.assert_close(model(x), x)
    other = Forecaster(2, d_model=8, n_layer=1, output_dim=1)
    assert other(x).shape == (2, 6, 1)
    with pytest.raises(ValueError, match="feeding outputs back"):
        generate_continuous(other, x, 3)


def test_save_load_round_trip(tmp_path):
    model = _model(["S5", "Mamba"], d_intermediate=16, mixer_kwargs={"S5": {"conj_sym": True}})
    model.save_pretrained(tmp_path)
    x, ts = torch.randn(2, 7, 3), torch.rand(2, 7)
    for loaded in (Forecaster.from_pretrained(tmp_path), load_pretrained(tmp_path)):
        assert isinstance(loaded, Forecaster) and loaded.checkpoint_config() == model.checkpoint_config()
        torch.testing.assert_close(loaded(x, ts), model(x, ts), rtol=0, atol=0)


def test_low_precision():
    model = _model("S5")
    x, ts = torch.randn(2, 7, 3), torch.rand(2, 7)
    y = model(x.bfloat16(), ts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), model(x, ts), rtol=0.05, atol=0.05)
    bf16 = model.to(torch.bfloat16)
    out = generate_continuous(bf16, x.bfloat16(), 4, integration_timesteps=torch.rand(2, 10))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_errors():
    model = _model("S5")
    with pytest.raises(ValueError, match=r"\[B, T, F=3\]"):
        model(torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T\] = \[2, 5\]"):
        model(torch.randn(2, 5, 3), integration_timesteps=torch.rand(2, 4))
    with pytest.raises(ValueError, match="non-negative"):
        model(torch.randn(2, 5, 3), integration_timesteps=-torch.rand(2, 5))
    with pytest.raises(ValueError, match="num_steps"):
        generate_continuous(model, torch.randn(2, 3), 0)
    with pytest.raises(ValueError, match=r"\[B, T \+ N - 1\]"):
        generate_continuous(model, torch.randn(2, 4, 3), 3, integration_timesteps=torch.rand(2, 5))
    with pytest.raises(ValueError, match="3 names"):
        Forecaster(3, n_layer=3, mixer_types=["S5", "LRU"])
    with pytest.raises(ValueError, match="unknown mixer"):
        Forecaster(3, mixer_types="nope")
    with pytest.raises(ValueError, match="input_dim"):
        Forecaster(0)


# ---------------------------------------------------------------- the oscillator task


def test_oscillator_task_is_deterministic():
    task = CoupledOscillators(seq_len=40, eval_examples=8)
    a, b = task.batch("train", 2, 4, seed=3), task.batch("train", 2, 4, seed=3)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    torch.testing.assert_close(a.timesteps, b.timesteps, rtol=0, atol=0)
    assert not torch.equal(a.values, task.batch("train", 3, 4, seed=3).values)
    assert a.values.shape == (4, 40, 2) and a.timesteps.shape == (4, 40)
    assert (a.timesteps >= 0.02).all() and (a.timesteps <= 0.5).all()
    regular = CoupledOscillators(seq_len=40, min_gap=0.1, max_gap=0.1)
    torch.testing.assert_close(regular.batch("val", 0, 2).timesteps, torch.full((2, 40), 0.1))
    with pytest.raises(ValueError, match="min_gap"):
        CoupledOscillators(min_gap=0.5, max_gap=0.1)


def test_oscillators_without_noise_are_smooth():
    # Noise-free samples at tiny gaps: consecutive positions are close and the solution stays finite.
    task = CoupledOscillators(seq_len=64, min_gap=0.001, max_gap=0.001, noise=0.0)
    v = task.batch("val", 0, 4).values
    assert torch.isfinite(v).all()
    assert (v[:, 1:] - v[:, :-1]).abs().max() < 0.05


def test_short_cpu_run_beats_last_value_forecast():
    torch.manual_seed(0)
    task = CoupledOscillators(seq_len=32, eval_examples=32)
    model = Forecaster(2, d_model=16, n_layer=2, mixer_types="S5", mixer_kwargs=EVENT["S5"])
    result = fit_regression(model, task, steps=40, batch_size=16, lr=3e-3)
    assert result.before["mse"] == pytest.approx(result.before["persistence_mse"], rel=1e-5)
    assert result.after["mse"] < 0.8 * result.after["persistence_mse"], result.after


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["S5", "Mamba"])
def test_event_form_beats_regular_form(mixer):
    """The measured claim of docs/continuous.md: with irregular sampling, the event form (the gaps as
    integration_timesteps) forecasts better than the same model that sees the values only."""
    mse = {}
    for event in (True, False):
        torch.manual_seed(0)
        task = CoupledOscillators(seq_len=64, timesteps=event, eval_examples=64)
        model = Forecaster(2, d_model=32, n_layer=2, mixer_types=mixer, mixer_kwargs=EVENT[mixer])
        mse[event] = fit_regression(model, task, steps=150, batch_size=16, lr=3e-3).after["mse"]
    assert mse[True] < 0.95 * mse[False], mse


def test_demo_command(tmp_path, capsys):
    from seqblocks.cli import main

    assert main(["demo", "oscillators", "--steps", "2", "--seq-len", "16", "--no-progress", "--threads", "1",
                 "--mixers", "S5,LRU", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "event: MSE" in out and "regular: MSE" in out and "free-running forecast" in out
    assert (tmp_path / "oscillators.csv").read_text().count("\n") == 5
