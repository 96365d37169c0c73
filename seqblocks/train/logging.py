"""Where a run's metrics go, and the throughput figures logged with them.

``RunLogger`` writes each row to ``metrics.jsonl`` (always; the loss plot reads it), to TensorBoard
(``TrainConfig.tensorboard``: event files under ``RUN/tensorboard`` through
``torch.utils.tensorboard``, which needs the ``tensorboard`` package) and to Weights & Biases in
offline mode (``TrainConfig.wandb``: files under ``RUN/wandb``, synced later with ``wandb sync`` if
wanted; never a network call from the run). A resumed run's TensorBoard writer drops the events
after the checkpoint's step, as the JSONL file drops its rows.

MFU (model FLOP utilisation) is ``6 * active parameters * tokens per second / peak FLOP/s``: the
forward and backward matmul FLOPs of a dense model per token, without attention's quadratic term.
The peak is ``TrainConfig.peak_flops`` when given, else the bf16 dense peak of a known CUDA device
(``PEAK_FLOPS``), else unknown (a CPU): MFU is then not logged.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqblocks.train.metrics import MetricsWriter

__all__ = ["RunLogger", "PEAK_FLOPS", "peak_flops", "mfu", "active_params", "memory_gib", "TENSORBOARD_DIR",
           "WANDB_DIR"]

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"

# Dense bf16 tensor-core peaks (FLOP/s) by a substring of the CUDA device name, most specific first.
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
              ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12),
              ("V100", 125e12), ("T4", 65e12))


def peak_flops(device: torch.device, given: float = 0.0) -> float | None:
    """The peak FLOP/s MFU is measured against: ``given`` when positive, else the device's from
    ``PEAK_FLOPS``, else None."""
    if given > 0:
        return given
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS:
            if key in name:
                return value
    return None


def active_params(model: nn.Module) -> int:
    """Parameters whose FLOPs each token pays: all of them, less an untied input embedding (a lookup).

    A model that routes tokens to a subset of its weights reports its own count with
    ``num_active_params()``."""
    counter = getattr(model, "num_active_params", None)
    if callable(counter):
        return int(counter())
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding = getattr(getattr(model, "embedding", None), "weight", None)
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if embedding is not None and embedding is not head:
        total -= embedding.numel()
    return total


def mfu(n_active: int, tokens_per_s: float, peak: float | None) -> float | None:
    """6 * N * tokens/s / peak, or None without a peak."""
    return 6.0 * n_active * tokens_per_s / peak if peak else None


def memory_gib(device: torch.device) -> float:
    """Peak memory so far, GiB: allocated CUDA memory on a GPU, the process's peak resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class RunLogger:
    """Writes metric rows to ``metrics.jsonl`` and, when asked, TensorBoard and W&B (offline).

    Args:
        out_dir (Path): the run directory.
        tensorboard (bool): write TensorBoard event files. Default: False.
        wandb (bool): log to W&B in offline mode. Default: False.
        start_step (int): the step the run starts from (a resumed run's TensorBoard drops later events).
            Default: 0.
        config (dict | None): the run's configuration, given to W&B. Default: None.

    Raises:
        ImportError: TensorBoard or W&B asked for and not installed (the message names the extra).
    """

    def __init__(self, out_dir: Path, *, tensorboard: bool = False, wandb: bool = False, start_step: int = 0,
                 config: dict[str, Any] | None = None) -> None:
        from seqblocks.tokenizers import MissingExtraError

        self.jsonl = MetricsWriter(Path(out_dir) / "metrics.jsonl")
        self.tensorboard = self.wandb_run = None
        try:
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise MissingExtraError("TrainConfig.tensorboard needs the 'tensorboard' package: pip install "
                                            "'seqblocks[tensorboard]'") from None
                self.tensorboard = SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR), purge_step=start_step or None)
            if wandb:
                try:
                    import wandb as wandb_module
                except ImportError:
                    raise MissingExtraError("TrainConfig.wandb needs the 'wandb' package: pip install "
                                            "'seqblocks[wandb]'") from None
                os.makedirs(Path(out_dir) / WANDB_DIR, exist_ok=True)
                self.wandb_run = wandb_module.init(mode="offline", dir=str(Path(out_dir) / WANDB_DIR),
                                                   project="seqblocks", name=Path(out_dir).name, config=config or {})
        except BaseException:
            self.close()
            raise

    def write(self, row: dict[str, Any]) -> None:
        """One row: ``type`` ("train" / "eval") and ``step`` plus numbers (others go to JSONL only)."""
        self.jsonl.write(row)
        step = row.get("step", 0)
        scalars = {f"{row.get('type', 'metrics')}/{k}": float(v) for k, v in row.items()
                   if k not in ("type", "step") and isinstance(v, int | float) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
