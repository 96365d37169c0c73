"""``fit_regression``: a compact training loop for the real-valued tasks (``seqblocks.tasks.signals``).

The language-model trainer (``seqblocks.train.trainer``) is built around token batches, run
directories and checkpoints; the denoising and forecasting tasks need none of that, only the loop:
batch ``i`` of the task (a pure function of the seed), the task's own loss, AdamW with the trainer's
parameter groups and warmup-cosine schedule, gradient clipping, and the task's held-out metrics before
and after. Same seed, same model: the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from seqblocks.train.optim import make_optimizer, make_scheduler

__all__ = ["RegressionResult", "fit_regression"]


@dataclasses.dataclass
class RegressionResult:
    """What ``fit_regression`` returns.

    Attributes:
        before (dict[str, float]): the task's held-out metrics of the untrained model.
        after (dict[str, float]): the same after training.
        losses (list[float]): the training loss of every step.
    """

    before: dict[str, float]
    after: dict[str, float]
    losses: list[float]


def fit_regression(model: nn.Module, task: Any, *, steps: int = 200, batch_size: int = 16, lr: float = 3e-3,
                   weight_decay: float = 0.0, warmup_steps: int = 10, grad_clip: float = 1.0, seed: int = 0,
                   eval_batch_size: int = 64, log_every: int = 0,
                   log: Callable[[str], None] | None = None) -> RegressionResult:
    """Train ``model`` on a real-valued ``task`` (``Denoising``, ``CoupledOscillators`` or anything with
    their ``batch`` / ``loss`` / ``evaluate`` / ``eval_batches``).

    Args:
        model (nn.Module): the model; trained in place.
        task: the task.
        steps (int): optimizer steps. Default: 200.
        batch_size (int): examples per step. Default: 16.
        lr (float): peak learning rate (AdamW). Default: 3e-3.
        weight_decay (float): AdamW weight decay of the matrices. Default: 0.
        warmup_steps (int): linear warmup, then a cosine to 10% of the peak. Default: 10.
        grad_clip (float): clip the gradient norm to this; 0 turns it off. Default: 1.0.
        seed (int): seed of the data. Default: 0.
        eval_batch_size (int): batch size of the held-out metrics. Default: 64.
        log_every (int): call ``log`` with the loss every N steps; 0 never. Default: 0.
        log (Callable[[str], None] | None): where progress lines go. Default: None.

    Returns:
        RegressionResult

    Raises:
        ValueError: non-positive ``steps`` / ``batch_size`` / ``lr``, negative ``grad_clip``.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"fit_regression: {name}={value!r} must be a positive int")
    if grad_clip < 0:
        raise ValueError(f"fit_regression: grad_clip={grad_clip!r} must be >= 0")
    device = next(model.parameters()).device
    held_out = [b.to(device) for b in task.eval_batches(eval_batch_size, seed)]
    model.eval()
    before = task.evaluate(model, held_out)
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = make_scheduler(optimizer, steps, warmup_steps)
    losses = []
    model.train()
    for step in range(steps):
        batch = task.batch("train", step, batch_size, seed).to(device)
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None and log_every > 0 and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    model.eval()
    after = task.evaluate(model, held_out)
    return RegressionResult(before=before, after=after, losses=losses)
