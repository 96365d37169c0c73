"""The post-training loop shared by distillation, DPO, GRPO and LoRA fine-tuning.

It is the trainer's run-directory discipline around an arbitrary objective: ``run_loop`` owns the
run directory (``seqblocks.train.rundir``: lock, refusal to overwrite a previous run unless told),
writes ``metrics.jsonl`` rows of whatever the objective reports, checkpoints atomically every
``ckpt_every`` steps (model weights + ``train_state.pt`` with optimizer, scheduler and RNG state),
and resumes from the latest checkpoint. The objective is a pure function of the step index (each
recipe seeds its data and sampling from ``(seed, step)``), so a resumed run repeats exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqblocks.config import ConfigBase
from seqblocks.train.checkpointing import (
    TRAIN_STATE,
    latest_checkpoint,
    load_train_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from seqblocks.train.metrics import MetricsWriter, read_metrics, rewrite_metrics
from seqblocks.train.optim import make_scheduler
from seqblocks.train.rundir import METRICS_FILE, RUN_CONFIG, RunDirectory

__all__ = ["LoopConfig", "LoopResult", "run_loop", "save_model_weights", "load_model_weights"]

Objective = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig(ConfigBase):
    """The optimisation part of a post-training run (each recipe's config adds its own fields).

    Args:
        steps (int): optimizer steps. Default: 100.
        lr (float): peak learning rate (AdamW). Default: 1e-4.
        weight_decay (float): AdamW weight decay of every trained tensor. Default: 0.0.
        warmup_steps (int): linear warmup steps. Default: 0.
        min_lr_ratio (float): final learning rate of the cosine, as a fraction of the peak. Default: 1.0
            (constant after warmup).
        grad_clip (float): clip the gradient norm to this; 0 disables. Default: 1.0.
        seed (int): seeds data order and sampling. Default: 0.
        log_every (int): a metrics row every N steps. Default: 10.
        ckpt_every (int): checkpoint every N steps (and at the end); 0: only at the end. Default: 50.
        keep_checkpoints (int): checkpoints kept; 0 keeps all. Default: 2.

    The model's device is the caller's choice (the loop trains it where it is), so a run may resume
    on another device.
    """

    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 50
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("warmup_steps", "ckpt_every", "keep_checkpoints", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"{type(self).__name__}.lr={self.lr!r} must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{type(self).__name__}.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")


@dataclasses.dataclass
class LoopResult:
    """What ``run_loop`` hands back: the trained ``model``, ``step`` reached, the last logged ``metrics``,
    the last ``checkpoint`` directory, and ``already_complete`` when a resumed run had nothing left."""

    model: nn.Module
    step: int
    metrics: dict[str, float]
    checkpoint: Path | None
    already_complete: bool = False


def save_model_weights(model: nn.Module, directory: Path) -> None:
    """The default checkpoint writer: ``model.save_pretrained(directory)`` (config + safetensors)."""
    model.save_pretrained(directory)


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """The default checkpoint reader: the safetensors weights of ``directory`` into ``model``."""
    from seqblocks.checkpoint import WEIGHTS_NAME, load_weights

    load_weights(model, directory / WEIGHTS_NAME)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "steps"}


def run_loop(model: nn.Module, objective: Objective, config: LoopConfig, out_dir: str | Path, *, recipe: str,
             resume: bool = False, overwrite: bool = False, progress: bool = False,
             save_fn: Callable[[nn.Module, Path], None] = save_model_weights,
             load_fn: Callable[[nn.Module, Path], None] = load_model_weights,
             run_info: dict[str, Any] | None = None, log: Callable[[str], None] | None = None,
             parameters: list[nn.Parameter] | None = None) -> LoopResult:
    """Optimise ``objective`` over ``model``'s trainable parameters for ``config.steps`` steps.

    Args:
        model (nn.Module): the model being trained (already on its device).
        objective (Callable[[int], tuple[Tensor, dict]]): ``objective(step) -> (loss, metrics)``; the
            loss is a scalar to minimise, the metrics floats to log; a pure function of ``step``.
        config (LoopConfig): the run (a recipe's subclass).
        out_dir (str | Path): run directory: ``run.json``, ``metrics.jsonl``, ``checkpoints/``.
        recipe (str): the recipe's name, stored in each checkpoint; resuming another recipe's run is refused.
        resume (bool): continue from the latest checkpoint of ``out_dir``. Default: False.
        overwrite (bool): replace a previous run in ``out_dir``. Default: False.
        progress (bool): a tqdm bar. Default: False.
        save_fn / load_fn: write / read the model part of a checkpoint (LoRA saves adapters only).
            Default: ``save_pretrained`` / the safetensors weights.
        run_info (dict | None): more JSON for ``run.json`` (the recipe's models, data). Default: None.
        log (Callable[[str], None] | None): where messages go. Default: stderr.
        parameters (list | None): the tensors to train. Default: None (every ``requires_grad`` one).

    Returns:
        LoopResult

    Raises:
        FileNotFoundError: ``resume`` without a checkpoint in ``out_dir``.
        ValueError: ``resume`` with ``overwrite``; a checkpoint of another recipe or configuration
            (only ``steps`` may change on resume); no trainable parameters; a non-finite loss
            (FloatingPointError).
    """
    if resume and overwrite:
        raise ValueError("resume continues the run in the directory and overwrite deletes it; give one")
    say = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = Path(out_dir)
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError(f"{recipe}: the model has no trainable parameters (requires_grad=False everywhere)")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = make_scheduler(optimizer, config.steps, config.warmup_steps, config.min_lr_ratio)
    with RunDirectory(out_dir, log=say) as run:
        run.prepare(resume=resume, overwrite=overwrite)
        start, ckpt, elapsed = 0, None, 0.0
        if resume:
            ckpt = latest_checkpoint(out_dir)
            if ckpt is None:
                raise FileNotFoundError(f"resume: {str(out_dir)!r} holds no checkpoint to resume from")
            state = load_train_state(ckpt)
            if state.get("recipe") != recipe:
                raise ValueError(f"resume: {ckpt} is a {state.get('recipe')!r} checkpoint, not {recipe!r}")
            if _comparable(state["config"]) != _comparable(config.to_dict()):
                raise ValueError(f"resume: the configuration differs from the checkpoint's (only steps may change): "
                                 f"saved {state['config']}, given {config.to_dict()}")
            load_fn(model, ckpt)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start, elapsed = int(state["step"]), float(state["elapsed_s"])
            say(f"{recipe}: resumed from {ckpt} at step {start}")
        metrics_path = out_dir / METRICS_FILE
        with run.writing(out_dir / RUN_CONFIG):
            from seqblocks.train.checkpointing import atomic_write_text

            atomic_write_text(out_dir / RUN_CONFIG, json.dumps({"recipe": recipe, "config": config.to_dict(),
                                                                **(run_info or {})}, indent=2, default=str))
        history = read_metrics(metrics_path, start) if resume else []
        with run.writing(metrics_path):
            rewrite_metrics(metrics_path, history)
        if start >= config.steps:
            last = next((r for r in reversed(history) if r.get("type") == "train"), {})
            return LoopResult(model, start, {k: v for k, v in last.items() if k != "type"}, ckpt, True)

        def checkpoint(step: int) -> Path:
            def write(tmp: Path) -> None:
                save_fn(model, tmp)
                state = {"recipe": recipe, "step": step, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rng_state(), "config": config.to_dict(),
                         "elapsed_s": elapsed}
                with open(tmp / TRAIN_STATE, "wb") as handle:
                    torch.save(state, handle)

            with run.writing(out_dir / "checkpoints"):
                return save_checkpoint(out_dir, step, write, keep=config.keep_checkpoints)

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=start, desc=recipe, dynamic_ncols=True, file=sys.stderr)
        window: dict[str, float] = {}
        count, last_row = 0, {}
        model.train()
        writer = None
        try:
            with run.writing(metrics_path):
                writer = MetricsWriter(metrics_path)
            for step in range(start, config.steps):
                t0 = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                loss, metrics = objective(step)
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"{recipe} step {step + 1}: the loss is {float(loss.detach())}; lower the "
                                             f"learning rate (lr={config.lr})")
                loss.backward()
                max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed += time.perf_counter() - t0
                done = step + 1
                for key, value in {"loss": float(loss.detach()), **metrics}.items():
                    window[key] = window.get(key, 0.0) + float(value)
                count += 1
                if bar is not None:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
                    bar.update(1)
                if done % config.log_every == 0 or done == config.steps:
                    last_row = {"type": "train", "step": done, **{k: v / count for k, v in window.items()},
                                "lr": lr, "grad_norm": float(grad_norm), "elapsed_s": elapsed}
                    with run.writing(metrics_path):
                        writer.write(last_row)
                    window, count = {}, 0
                if (config.ckpt_every and done % config.ckpt_every == 0) or done == config.steps:
                    ckpt = checkpoint(done)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
    return LoopResult(model, config.steps, {k: v for k, v in last_row.items() if k != "type"}, ckpt)
