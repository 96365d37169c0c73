"""``seqblocks demo``: the real-valued models learning on a laptop CPU in a minute.

- ``seqblocks demo denoise``: an ``LRUUnet`` trained on the ``denoise`` task (negative SI-SNR); prints
  the held-out SI-SNR before and after, and checks that streaming one frame at a time through ``step``
  gives the offline output.
- ``seqblocks demo oscillators``: ``Forecaster`` s on the ``oscillators`` task (irregular sampling),
  each mixer trained in its event form (the sampling intervals as ``integration_timesteps``) and its
  regular form (values only); prints the next-sample MSE of each, and a free-running forecast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

__all__ = ["cmd_demo"]


def _out(text: str = "") -> None:
    print(text, flush=True)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from seqblocks.train.regression import fit_regression

    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    torch.manual_seed(args.seed)
    fit = {"steps": args.steps or 150, "batch_size": args.batch_size or 16, "lr": args.lr or 3e-3, "seed": args.seed,
           "log_every": 0 if args.no_progress else 25, "log": _log}
    if args.what == "denoise":
        return _denoise(args, fit, fit_regression)
    return _oscillators(args, fit, fit_regression)


def _denoise(args: argparse.Namespace, fit: dict, fit_regression) -> int:
    from seqblocks.models.unet import LRUUnet
    from seqblocks.tasks.signals import Denoising

    task = Denoising(seq_len=args.seq_len or 512, eval_examples=64)
    model = LRUUnet()
    n = sum(p.numel() for p in model.parameters())
    _out(f"LRUUnet(channels={model.channels}, resample_factors={model.resample_factors}): {n:,} parameters; "
         f"task denoise, {task.seq_len} samples per waveform, input SNR {task.min_snr_db:g}-{task.max_snr_db:g} dB")
    result = fit_regression(model, task, **fit)
    b, a = result.before, result.after
    _out(f"held-out SI-SNR: input {b['input_si_snr']:.2f} dB; model before training {b['si_snr']:.2f} dB, after "
         f"{fit['steps']} steps {a['si_snr']:.2f} dB (improvement {a['improvement']:+.2f} dB)")
    x = task.eval_batches(4, fit["seed"])[0].noisy
    with torch.no_grad():
        gap = (model.stream(x) - model(x)).abs().max().item()
    _out(f"streaming one frame ({model.frame} samples) at a time == offline: max |difference| {gap:.2e}")
    if args.out:
        model.save_pretrained(Path(args.out))
        _out(f"saved: {args.out} (load with seqblocks.LRUUnet.from_pretrained)")
    return 0


def _oscillators(args: argparse.Namespace, fit: dict, fit_regression) -> int:
    from seqblocks.models.forecaster import Forecaster, generate_continuous
    from seqblocks.tasks.signals import CoupledOscillators

    mixers = [m.strip() for m in (args.mixers or "S5").split(",") if m.strip()]
    T = args.seq_len or 64
    _out(f"task oscillators: {T} samples per row, gaps uniform in [0.02, 0.5], next-sample MSE")
    rows = []
    for mixer in mixers:
        for event in (True, False):
            torch.manual_seed(args.seed)
            task = CoupledOscillators(seq_len=T, timesteps=event, eval_examples=64)
            model = Forecaster(task.num_features, d_model=32, n_layer=2, mixer_types=mixer,
                               mixer_kwargs=_event_kwargs(mixer))
            result = fit_regression(model, task, **fit)
            form = "event" if event else "regular"
            rows.append((mixer, form, result.after["mse"], result.after["persistence_mse"]))
            _out(f"{mixer:>8} {form:>7}: MSE {result.after['mse']:.4f} (last-value forecast "
                 f"{result.after['persistence_mse']:.4f})")
            if event:
                batch = task.eval_batches(8, args.seed)[0]
                context = T // 2
                pred = generate_continuous(model, batch.values[:, :context], T - context,
                                           integration_timesteps=batch.timesteps[:, :T - 1])
                err = (pred - batch.values[:, context:]).pow(2).mean().item()
                _out(f"{'':>8} {'':>7}  free-running forecast of samples {context}..{T - 1} from the first "
                     f"{context}: MSE {err:.4f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        lines = ["mixer,form,mse,persistence_mse"] + [f"{m},{f},{e:.6f},{p:.6f}" for m, f, e, p in rows]
        (Path(args.out) / "oscillators.csv").write_text("\n".join(lines) + "\n")
        _out(f"table: {Path(args.out) / 'oscillators.csv'}")
    return 0


def _event_kwargs(mixer: str) -> dict | None:
    """Step ranges that reach the oscillators' time scale (gaps 0.02-0.5, periods 2-6)."""
    if mixer.lower() in ("s5", "mamba"):
        return {"dt_min": 0.01, "dt_max": 1.0}
    return None
