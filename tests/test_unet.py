"""LRUUnet: shapes at odd lengths, causality, streaming == offline, save / load, dtypes, errors; the
denoising task and SI-SNR; a short CPU run that improves SI-SNR."""

from __future__ import annotations

import pytest
import torch

from seqblocks import LRUUnet
from seqblocks.checkpoint import load_pretrained
from seqblocks.tasks.signals import Denoising, get_signal_task, si_snr
from seqblocks.train.regression import fit_regression

CONFIGS = [
    {},  # the defaults: 1 -> 1 channel, channels [8, 16], factors [4, 2]
    {"in_channels": 2, "out_channels": 3, "channels": [4, 8, 8], "resample_factors": [2, 3, 2], "pre_conv": True},
    {"channels": [6], "resample_factors": [1]},
]


def _randomised(model: LRUUnet) -> LRUUnet:
    """The output map starts at zero (identity model); give it weights so every path shows in the output."""
    with torch.no_grad():
        model.out_proj.weight.normal_()
        model.out_proj.bias.normal_()
    return model


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("T", [1, 7, 63, 65, 200])
def test_shapes_at_odd_lengths(config, T):
    model = _randomised(LRUUnet(**config))
    x = torch.randn(2, model.in_channels, T)
    y = model(x)
    assert y.shape == (2, model.out_channels, T)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("T", [5, 64, 77])
def test_streaming_equals_offline(config, T):
    model = _randomised(LRUUnet(**config, dtype=torch.float64))
    x = torch.randn(2, model.in_channels, T, dtype=torch.float64)
    offline = model(x)
    for chunk in (model.frame, 4 * model.frame):
        torch.testing.assert_close(model.stream(x, chunk), offline, rtol=1e-10, atol=1e-10)


def test_step_by_step_frames_fp32():
    model = _randomised(LRUUnet())
    x = torch.randn(3, 1, 8 * 9 + 3)
    cache = model.allocate_inference_cache(3)
    outs = [model.step(x[..., s:s + 8], cache) for s in range(0, x.shape[-1], 8)]
    assert cache.num_samples == x.shape[-1] and cache.closed
    torch.testing.assert_close(torch.cat(outs, -1), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ended"):
        model.step(x[..., :8], cache)


@pytest.mark.parametrize("config", CONFIGS[:2])
def test_causal(config):
    model = _randomised(LRUUnet(**config))
    x = torch.randn(2, model.in_channels, 50)
    x2 = x.clone()
    x2[..., 23:] += torch.randn_like(x2[..., 23:])
    y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[..., :23], y2[..., :23], rtol=0, atol=0)
    assert (y[..., 23:] - y2[..., 23:]).abs().max() > 1e-3


def test_non_causal_sees_the_future_and_cannot_stream():
    model = _randomised(LRUUnet(causal=False))
    x = torch.randn(1, 1, 40)
    x2 = x.clone()
    x2[..., 30:] += 1.0
    assert (model(x)[..., :30] - model(x2)[..., :30]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="causal"):
        model.allocate_inference_cache(1)
    with pytest.raises(ValueError, match="causal"):
        model.stream(x)


def test_identity_at_init():
    model = LRUUnet()
    x = torch.randn(2, 1, 33)
    torch.testing.assert_close(model(x), x)


def test_forward_backward_reaches_every_parameter():
    model = _randomised(LRUUnet(**CONFIGS[1]))
    x = torch.randn(2, model.in_channels, 48)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_save_load_round_trip(tmp_path):
    model = _randomised(LRUUnet(**CONFIGS[1], d_state=6))
    model.save_pretrained(tmp_path)
    for loaded in (LRUUnet.from_pretrained(tmp_path), load_pretrained(tmp_path)):
        assert isinstance(loaded, LRUUnet) and loaded.checkpoint_config() == model.checkpoint_config()
        x = torch.randn(2, model.in_channels, 30)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_low_precision():
    x = torch.randn(2, 1, 45)
    fp32 = _randomised(LRUUnet())
    y = fp32(x.bfloat16())  # an fp32 model takes bf16 input and answers in bf16
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fp32(x), rtol=0.05, atol=0.05)
    bf16 = fp32.to(torch.bfloat16)
    assert bf16.enc[0].lru.nu_log.dtype == torch.float32  # the poles stay fp32
    yb = bf16(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb.float()).all()
    half = LRUUnet().to(torch.float16)
    assert half.stream(x.half()).dtype == torch.float16


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"channels": [8, 16], "resample_factors": [4]}, "same length"),
    ({"channels": []}, "non-empty"),
    ({"resample_factors": [4, 0]}, "positive ints"),
    ({"in_channels": 0}, "in_channels"),
    ({"d_state": -1}, "d_state"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRUUnet(**kwargs)


def test_bad_inputs():
    model = LRUUnet()
    with pytest.raises(ValueError, match=r"\[B, C_in=1, T\]"):
        model(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"\[B, C_in=1, T\]"):
        model(torch.randn(2, 16))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(2, 1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of the frame"):
        model.stream(torch.randn(1, 1, 16), 6)
    cache = model.allocate_inference_cache(2)
    with pytest.raises(ValueError, match="holds 2 streams"):
        model.step(torch.randn(1, 1, 8), cache)


# ---------------------------------------------------------------- the task and its metric


def test_si_snr():
    ref = torch.randn(3, 200)
    assert (si_snr(ref, ref) > 80).all()
    noisy = ref + 0.1 * torch.randn(3, 200)
    torch.testing.assert_close(si_snr(3.0 * noisy + 1.0, ref), si_snr(noisy, ref), rtol=1e-4, atol=1e-4)
    expected = 10 * torch.log10(torch.tensor(1.0 / 0.01))  # unit-variance signal, noise std 0.1: about 20 dB
    assert (si_snr(noisy, ref) - expected).abs().max() < 2.0
    with pytest.raises(ValueError, match="differ"):
        si_snr(ref, ref[:, :10])


def test_denoising_task_is_deterministic():
    task = Denoising(seq_len=100, eval_examples=8)
    a, b = task.batch("train", 3, 4, seed=1), task.batch("train", 3, 4, seed=1)
    torch.testing.assert_close(a.noisy, b.noisy, rtol=0, atol=0)
    assert not torch.equal(a.noisy, task.batch("train", 4, 4, seed=1).noisy)
    assert not torch.equal(a.noisy, task.batch("val", 3, 4, seed=1).noisy)
    assert a.noisy.shape == a.clean.shape == (4, 1, 100)
    torch.testing.assert_close(a.clean.pow(2).mean(-1), torch.ones(4, 1), rtol=1e-4, atol=1e-4)  # unit RMS
    snr = si_snr(a.noisy.squeeze(1), a.clean.squeeze(1))
    assert (snr > -1).all() and (snr < 11).all()  # input SNR in [0, 10] dB
    assert get_signal_task("denoise", **task.config()).config() == task.config()
    with pytest.raises(ValueError, match="expected one of"):
        get_signal_task("nope")
    with pytest.raises(ValueError, match="max_freq"):
        Denoising(max_freq=0.6)


def test_short_cpu_run_improves_si_snr():
    model = LRUUnet()
    task = Denoising(seq_len=128, eval_examples=32)
    result = fit_regression(model, task, steps=30, batch_size=8, lr=3e-3)
    assert result.before["improvement"] == pytest.approx(0.0, abs=1e-4)  # the untrained model is the identity
    assert result.after["improvement"] > 1.5, result.after


def test_training_is_deterministic():
    task = Denoising(seq_len=64, eval_examples=8)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(fit_regression(LRUUnet(), task, steps=3, batch_size=4).losses)
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_demo_command(tmp_path, capsys):
    from seqblocks.cli import main

    assert main(["demo", "denoise", "--steps", "2", "--seq-len", "64", "--no-progress", "--threads", "1",
                 "--out", str(tmp_path / "unet")]) == 0
    out = capsys.readouterr().out
    assert "held-out SI-SNR" in out and "== offline" in out
    assert isinstance(load_pretrained(tmp_path / "unet"), LRUUnet)
