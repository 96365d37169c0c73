"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from seqblocks.models.mup import lr_scale

__all__ = ["param_groups", "make_optimizer", "lr_factor", "make_scheduler"]

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Split ``model``'s trainable parameters into a decayed group and a non-decayed one.

    Not decayed: biases, every parameter of a norm layer, embeddings (tied output heads included,
    since they are the same tensor), parameters with fewer than 2 dimensions (gains, per-channel
    decay rates, skip weights), and any parameter a module marked ``_no_weight_decay = True``
    (mamba's convention for ``A_log`` / ``D``). Each parameter appears once even when shared.

    A parameter a module tagged with ``_optim = {"lr": ..., "weight_decay": ...}`` (S4 / S4D's ``lr`` /
    ``wd`` arguments for their SSM parameters) goes into a group of its own with those settings
    (weight decay 0 unless given); the schedule scales its lr like every other group's.

    A parameter muP tagged with a learning-rate multiplier (``seqblocks.models.mup``: the hidden
    weights of a ``mup=True`` LanguageModel, multiplier 1 / width_mult) goes, still split by decay,
    into a group with ``lr = lr * multiplier``; ``lr`` must then be given.

    Raises:
        ValueError: muP-tagged parameters and no ``lr``.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or _is_norm(module):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, keep, seen = [], [], set()
    hinted: dict[tuple, list] = {}
    scaled: dict[tuple[float, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        hints = getattr(param, "_optim", None)
        if hints:  # the module's own optimizer settings (S4 / S4D's lr and wd for the SSM parameters)
            hinted.setdefault(tuple(sorted(hints.items())), []).append(param)
            continue
        skip = (id(param) in no_decay or param.ndim < 2 or name.endswith("bias")
                or getattr(param, "_no_weight_decay", False))
        scale = lr_scale(param)
        if scale != 1.0:
            scaled.setdefault((scale, not skip), []).append(param)
            continue
        (keep if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    if scaled and lr is None:
        raise ValueError("param_groups: the model has muP learning-rate multipliers (mup=True); pass lr")
    for (scale, decayed), params in scaled.items():
        groups.append({"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale})
    for hints, params in hinted.items():
        groups.append({"params": params, "weight_decay": 0.0, **dict(hints)})
    return groups


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, weight_decay, lr)`` (so muP's per-group learning rates apply);
    the fused kernel on CUDA parameters."""
    if lr <= 0:
        raise ValueError(f"lr={lr} must be positive")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0")
    groups = [g for g in param_groups(model, weight_decay, lr) if g["params"]]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=on_cuda or None)


def lr_factor(step: int, max_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Linear warmup over ``w = min(warmup_steps, max_steps)`` steps, reaching the peak at step ``w - 1``,
    then a cosine from the peak down to ``min_lr_ratio`` at the last step. When ``max_steps <=
    warmup_steps`` the warmup is compressed into the run and there is no decay phase, so a short
    run (a test, a smoke check) still trains at a sensible rate instead of dividing by zero.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps={max_steps} must be positive")
    w = min(max(warmup_steps, 0), max_steps)
    if step < w:
        return (step + 1) / w
    decay_steps = max_steps - w
    if decay_steps <= 1:
        return 1.0 if decay_steps == 0 or step == w else min_lr_ratio
    progress = min(max((step - w) / (decay_steps - 1), 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int,
                   min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following ``lr_factor``; its state dict resumes exactly."""
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, max_steps, warmup_steps, min_lr_ratio))
