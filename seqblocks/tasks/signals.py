"""Real-valued embedded tasks: waveform denoising (scored by SI-SNR) and forecasting noisy coupled
oscillators sampled at irregular times. Every batch is a pure function of (seed, split, index), as for
the token tasks (``seqblocks.tasks.base``); nothing is downloaded.

- ``Denoising``: clean waveforms are sums of sinusoids and linear chirps with random frequencies,
  amplitudes and phases, scaled to unit RMS; the input adds white Gaussian noise at an SNR drawn
  uniformly from ``[min_snr_db, max_snr_db]``. The model maps noisy [B, 1, T] to clean [B, 1, T] and
  is trained on the negative SI-SNR.
- ``CoupledOscillators``: two damped harmonic oscillators coupled by a spring,
  ``q_i'' = -w_i^2 q_i - g q_i' + k (q_j - q_i)``, solved exactly (matrix exponential of the linear
  system) at random sample times whose gaps are uniform in ``[min_gap, max_gap]``; the observations
  are the positions plus Gaussian noise. ``timesteps[:, t]`` is the gap from sample t to sample t + 1,
  the interval a forecaster integrates over to predict sample t + 1 (``seqblocks.models.forecaster``).

Shapes: B batch, C channels, T time, F features.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from seqblocks.tasks.base import batch_generator

__all__ = ["si_snr", "SignalBatch", "SeriesBatch", "Denoising", "CoupledOscillators", "SIGNAL_TASKS",
           "get_signal_task"]


def si_snr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB over the last dimension.

    Both signals are made zero-mean; the reference's share of the estimate is
    ``s = <e, r> r / |r|^2`` and the SI-SNR is ``10 log10(|s|^2 / |e - s|^2)``.

    Args:
        estimate (Tensor): [..., T].
        reference (Tensor): [..., T], same shape.
        eps (float): added to both energies. Default: 1e-8.

    Returns:
        Tensor: [...] in dB, fp32 (float64 for float64 inputs).

    Raises:
        ValueError: shapes differ or T < 2.
    """
    if estimate.shape != reference.shape:
        raise ValueError(f"si_snr: estimate {tuple(estimate.shape)} and reference {tuple(reference.shape)} differ")
    if estimate.dim() == 0 or estimate.shape[-1] < 2:
        raise ValueError(f"si_snr needs at least 2 samples on the last dimension, got shape {tuple(estimate.shape)}")
    dt = torch.promote_types(torch.promote_types(estimate.dtype, reference.dtype), torch.float32)
    e = estimate.to(dt) - estimate.to(dt).mean(-1, keepdim=True)
    r = reference.to(dt) - reference.to(dt).mean(-1, keepdim=True)
    s = (e * r).sum(-1, keepdim=True) / ((r * r).sum(-1, keepdim=True) + eps) * r
    return 10 * torch.log10(((s * s).sum(-1) + eps) / (((e - s) ** 2).sum(-1) + eps))


@dataclasses.dataclass
class SignalBatch:
    """A denoising batch: ``noisy`` [B, 1, T] model inputs and ``clean`` [B, 1, T] targets."""

    noisy: torch.Tensor
    clean: torch.Tensor

    def __getitem__(self, rows: slice) -> SignalBatch:
        return SignalBatch(self.noisy[rows], self.clean[rows])

    def to(self, device: torch.device | str) -> SignalBatch:
        return SignalBatch(self.noisy.to(device), self.clean.to(device))


@dataclasses.dataclass
class SeriesBatch:
    """A forecasting batch: ``values`` [B, T, F] observations and ``timesteps`` [B, T], the gap from each
    sample to the next (the last one to a sample past the end)."""

    values: torch.Tensor
    timesteps: torch.Tensor

    def __getitem__(self, rows: slice) -> SeriesBatch:
        return SeriesBatch(self.values[rows], self.timesteps[rows])

    def to(self, device: torch.device | str) -> SeriesBatch:
        return SeriesBatch(self.values.to(device), self.timesteps.to(device))


class _SignalTask(abc.ABC):
    """Batches as pure functions of (seed, split, index), and a fixed held-out set."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, eval_examples: int) -> None:
        _check(self.name, isinstance(eval_examples, int) and eval_examples > 0,
               f"eval_examples={eval_examples!r} must be a positive int")
        self.eval_examples = eval_examples

    @abc.abstractmethod
    def _make(self, generator: torch.Generator, batch_size: int) -> Any:
        """``batch_size`` examples drawn with ``generator``."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``type(task)(**task.config())`` rebuilds the task."""

    def batch(self, split: str, index: int, batch_size: int, seed: int = 0) -> Any:
        """The ``index``-th batch of ``split`` ("train" / "val"); a pure function of the arguments.

        Raises:
            ValueError: unknown split, negative index or non-positive batch size.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not isinstance(index, int) or index < 0 or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"need index >= 0 and batch_size > 0, got index={index!r}, batch_size={batch_size!r}")
        return self._make(batch_generator(seed, f"{self.name}-{split}", index), batch_size)

    def eval_batches(self, batch_size: int, seed: int = 0) -> list[Any]:
        """The held-out set (``eval_examples`` examples of "val", independent of ``batch_size``)."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        full = self.batch("val", 0, self.eval_examples, seed)
        return [full[i:i + batch_size] for i in range(0, self.eval_examples, batch_size)]


class Denoising(_SignalTask):
    """Denoise synthetic waveforms (sums of sinusoids and chirps in white noise); scored by SI-SNR.

    Args:
        seq_len (int): samples T per waveform. Default: 1024.
        num_components (int): sinusoids / chirps per waveform. Default: 3.
        chirp_fraction (float): probability that a component is a linear chirp. Default: 0.5.
        min_freq (float): lowest frequency, cycles per sample. Default: 0.002.
        max_freq (float): highest frequency, cycles per sample (< 0.5). Default: 0.05.
        min_snr_db (float): lowest input SNR in dB. Default: 0.
        max_snr_db (float): highest input SNR in dB. Default: 10.
        eval_examples (int): held-out set size. Default: 128.
    """

    name = "denoise"
    description = "waveform denoising: sums of sinusoids and chirps in white noise, scored by SI-SNR"

    def __init__(self, seq_len: int = 1024, num_components: int = 3, chirp_fraction: float = 0.5,
                 min_freq: float = 0.002, max_freq: float = 0.05, min_snr_db: float = 0.0, max_snr_db: float = 10.0,
                 *, eval_examples: int = 128) -> None:
        super().__init__(eval_examples)
        _check("denoise", isinstance(seq_len, int) and seq_len >= 2, f"seq_len={seq_len!r} must be an int >= 2")
        _check("denoise", isinstance(num_components, int) and num_components >= 1,
               f"num_components={num_components!r} must be a positive int")
        _check("denoise", 0.0 <= chirp_fraction <= 1.0, f"chirp_fraction={chirp_fraction!r} must lie in [0, 1]")
        _check("denoise", 0.0 < min_freq <= max_freq < 0.5,
               f"need 0 < min_freq <= max_freq < 0.5, got min_freq={min_freq!r}, max_freq={max_freq!r}")
        _check("denoise", min_snr_db <= max_snr_db,
               f"need min_snr_db <= max_snr_db, got {min_snr_db!r} > {max_snr_db!r}")
        self.seq_len, self.num_components, self.chirp_fraction = seq_len, num_components, float(chirp_fraction)
        self.min_freq, self.max_freq = float(min_freq), float(max_freq)
        self.min_snr_db, self.max_snr_db = float(min_snr_db), float(max_snr_db)

    def config(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "num_components": self.num_components, "chirp_fraction": self.chirp_fraction,
                "min_freq": self.min_freq, "max_freq": self.max_freq, "min_snr_db": self.min_snr_db,
                "max_snr_db": self.max_snr_db, "eval_examples": self.eval_examples}

    def _make(self, g: torch.Generator, batch_size: int) -> SignalBatch:
        B, K, T = batch_size, self.num_components, self.seq_len
        t = torch.arange(T, dtype=torch.float64)
        lo, hi = math.log(self.min_freq), math.log(self.max_freq)
        f0 = torch.exp(lo + (hi - lo) * torch.rand(B, K, 1, generator=g, dtype=torch.float64))
        f1 = torch.exp(lo + (hi - lo) * torch.rand(B, K, 1, generator=g, dtype=torch.float64))
        chirp = torch.rand(B, K, 1, generator=g, dtype=torch.float64) < self.chirp_fraction
        f1 = torch.where(chirp, f1, f0)
        phase0 = 2 * math.pi * torch.rand(B, K, 1, generator=g, dtype=torch.float64)
        amp = 0.3 + torch.rand(B, K, 1, generator=g, dtype=torch.float64)
        # Linear chirp from f0 to f1 over the row: the phase is the integral of the frequency.
        phase = phase0 + 2 * math.pi * (f0 * t + (f1 - f0) * t * t / (2 * T))
        clean = (amp * torch.sin(phase)).sum(1, keepdim=True)  # [B, 1, T]
        clean = clean / clean.pow(2).mean(-1, keepdim=True).sqrt()
        snr_db = self.min_snr_db + (self.max_snr_db - self.min_snr_db) * torch.rand(B, 1, 1, generator=g,
                                                                                      dtype=torch.float64)
        noise = torch.randn(B, 1, T, generator=g, dtype=torch.float64) * 10 ** (-snr_db / 20)
        return SignalBatch(noisy=(clean + noise).float(), clean=clean.float())

    def loss(self, model: Any, batch: SignalBatch) -> torch.Tensor:
        """Negative mean SI-SNR (dB) of ``model(batch.noisy)`` against the clean waveform."""
        return -si_snr(model(batch.noisy).squeeze(1), batch.clean.squeeze(1)).mean()

    @torch.no_grad()
    def evaluate(self, model: Any, batches: list[SignalBatch]) -> dict[str, float]:
        """``si_snr``: mean output SI-SNR (dB); ``input_si_snr``: that of the noisy inputs; ``improvement``."""
        out, inp = [], []
        for b in batches:
            out.append(si_snr(model(b.noisy).squeeze(1), b.clean.squeeze(1)))
            inp.append(si_snr(b.noisy.squeeze(1), b.clean.squeeze(1)))
        o, i = torch.cat(out).mean().item(), torch.cat(inp).mean().item()
        return {"si_snr": o, "input_si_snr": i, "improvement": o - i}


class CoupledOscillators(_SignalTask):
    """Forecast two noisy coupled damped oscillators sampled at irregular times (next-sample MSE).

    Each row draws frequencies ``w_i`` in ``[1, 3]`` (radians per unit time), coupling ``k`` in
    ``[0.2, 1]``, damping ``g`` in ``[0, 0.1]`` and a random initial state; the positions are observed
    at ``seq_len`` times with gaps uniform in ``[min_gap, max_gap]`` (``min_gap == max_gap`` is
    regular sampling) plus Gaussian noise of std ``noise``.

    Args:
        seq_len (int): samples T per row. Default: 128.
        min_gap (float): smallest gap between samples. Default: 0.02.
        max_gap (float): largest gap. Default: 0.5.
        noise (float): observation noise std. Default: 0.02.
        timesteps (bool): give the model the gaps as ``integration_timesteps`` (the event form of S5 /
            Mamba); False hides them (the regular form sees only the values). Default: True.
        eval_examples (int): held-out set size. Default: 128.
    """

    name = "oscillators"
    description = "forecast noisy coupled oscillators sampled at irregular times (next-sample MSE)"

    def __init__(self, seq_len: int = 128, min_gap: float = 0.02, max_gap: float = 0.5, noise: float = 0.02,
                 timesteps: bool = True, *, eval_examples: int = 128) -> None:
        super().__init__(eval_examples)
        _check("oscillators", isinstance(seq_len, int) and seq_len >= 2, f"seq_len={seq_len!r} must be an int >= 2")
        _check("oscillators", 0.0 < min_gap <= max_gap,
               f"need 0 < min_gap <= max_gap, got min_gap={min_gap!r}, max_gap={max_gap!r}")
        _check("oscillators", noise >= 0.0, f"noise={noise!r} must be non-negative")
        self.seq_len, self.min_gap, self.max_gap, self.noise = seq_len, float(min_gap), float(max_gap), float(noise)
        self.timesteps = bool(timesteps)

    @property
    def num_features(self) -> int:
        """F: the two observed positions."""
        return 2

    def config(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "min_gap": self.min_gap, "max_gap": self.max_gap, "noise": self.noise,
                "timesteps": self.timesteps, "eval_examples": self.eval_examples}

    def _make(self, g: torch.Generator, batch_size: int) -> SeriesBatch:
        B, T = batch_size, self.seq_len
        kw = {"generator": g, "dtype": torch.float64}
        w = 1.0 + 2.0 * torch.rand(B, 2, **kw)
        k = 0.2 + 0.8 * torch.rand(B, **kw)
        damp = 0.1 * torch.rand(B, **kw)
        # State (q1, q2, p1, p2): q' = p, p' = -K q - g p with K = diag(w^2) + k [[1, -1], [-1, 1]].
        K = torch.diag_embed(w * w) + k[:, None, None] * torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
        A = torch.zeros(B, 4, 4, dtype=torch.float64)
        A[:, :2, 2:] = torch.eye(2, dtype=torch.float64)
        A[:, 2:, :2] = -K
        A[:, 2:, 2:] = -damp[:, None, None] * torch.eye(2, dtype=torch.float64)
        z0 = torch.randn(B, 4, **kw)
        gaps = self.min_gap + (self.max_gap - self.min_gap) * torch.rand(B, T, **kw)  # gap after each sample
        times = torch.cat((torch.zeros(B, 1, dtype=torch.float64), gaps[:, :-1].cumsum(1)), 1)  # [B, T]
        # The exact solution at every sample time: z(s) = exp(A s) z0.
        z = torch.linalg.matrix_exp(A[:, None] * times[..., None, None]) @ z0[:, None, :, None]  # [B, T, 4, 1]
        values = z[:, :, :2, 0] + self.noise * torch.randn(B, T, 2, **kw)
        return SeriesBatch(values=values.float(), timesteps=gaps.float())

    def _predict(self, model: Any, batch: SeriesBatch) -> torch.Tensor:
        ts = batch.timesteps if self.timesteps else None
        return model(batch.values, integration_timesteps=ts)

    def loss(self, model: Any, batch: SeriesBatch) -> torch.Tensor:
        """Mean squared error of each next-sample prediction (positions 0 .. T - 2 predict 1 .. T - 1)."""
        pred = self._predict(model, batch)
        return F.mse_loss(pred[:, :-1].float(), batch.values[:, 1:].float())

    @torch.no_grad()
    def evaluate(self, model: Any, batches: list[SeriesBatch]) -> dict[str, float]:
        """``mse``: the model's next-sample MSE; ``persistence_mse``: predicting the last value."""
        mse = [self.loss(model, b).item() for b in batches]
        last = [F.mse_loss(b.values[:, :-1], b.values[:, 1:]).item() for b in batches]
        return {"mse": sum(mse) / len(mse), "persistence_mse": sum(last) / len(last)}


#: The real-valued tasks by name (``seqblocks demo`` and ``seqblocks.train.fit_regression`` use them).
SIGNAL_TASKS: dict[str, type[_SignalTask]] = {"denoise": Denoising, "oscillators": CoupledOscillators}


def get_signal_task(name: str, **options: Any) -> Denoising | CoupledOscillators:
    """Build real-valued task ``name`` ("denoise" or "oscillators") with ``options``.

    Raises:
        ValueError: an unknown name (listing the valid ones) or option.
    """
    if name not in SIGNAL_TASKS:
        raise ValueError(f"unknown signal task {name!r}; expected one of {sorted(SIGNAL_TASKS)}")
    try:
        return SIGNAL_TASKS[name](**options)
    except TypeError as err:
        raise ValueError(f"signal task {name!r}: {err}") from None


def _check(task: str, condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"{task}: {message}")
