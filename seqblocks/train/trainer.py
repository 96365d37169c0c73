"""The training loop: one function, ``train``, for a single process, DDP and FSDP2 alike.

Data is a pure function of (seed, step): optimizer step ``s`` uses the task's ``s``-th global batch of
``batch_size`` rows, cut into ``grad_accum`` micro-batches, each cut into ``world_size`` equal slices,
one per rank. So a resumed run continues with exactly the batches it would have seen, and N processes
see exactly the global batch one process would. The loss of a step is the sum of the per-token
cross-entropies of the global batch divided by its number of scored tokens; each rank backpropagates
its share scaled by ``world_size`` (DDP and FSDP average gradients over ranks), so the gradient is the
same whatever the world size and accumulation.

Context parallelism (``context_parallel = N``, a causal LM): ranks ``[i * N, (i + 1) * N)`` form group i
(``torch.distributed.new_group``; the world itself when N is the world size). The rows of a micro-batch
are split over the ``world_size / N`` groups, and each rank of a group takes its time chunk of the same
rows, inputs and their (already shifted) targets alike: rank ``i * N + c`` holds tokens
``[c * T / N, (c + 1) * T / N)`` (T must be divisible by N, else ``ValueError``). The forward runs under
``seqblocks.parallel.context_parallel(group)``. The loss needs nothing new: each rank's summed token
loss over its chunk, scaled by ``world_size`` / the global batch's scored tokens, and averaged over all
ranks by DDP / FSDP (parameters are replicated over the group too), is the global mean over every
rank's tokens; the logged loss is the all-reduced sum of the ranks' summed losses over that count.
Evaluation runs under the group as well (``evaluate`` splits each held-out batch along time).

The run directory has one owner for the whole run (``seqblocks.train.rundir``): rank 0 locks it,
refuses to start over a previous run unless told to resume or overwrite, and turns a full disk or a
read-only directory into one clear error that leaves the last complete checkpoint intact.

Shapes: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.models.mtp import mtp_loss
from seqblocks.parallel.context import context_parallel, current_context_parallel
from seqblocks.tasks import IGNORE_INDEX, Batch, Task, get_task
from seqblocks.train.checkpointing import (
    CHECKPOINT_DIR,
    TASK_FILE,
    TOKENIZER_FILE,
    TRAIN_STATE,
    atomic_write_text,
    latest_checkpoint,
    load_train_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from seqblocks.train.config import TrainConfig
from seqblocks.train.distributed import DistInfo, barrier, broadcast_object, init_distributed, reshard, wrap_model
from seqblocks.train.logging import RunLogger, active_params, memory_gib, mfu, peak_flops
from seqblocks.train.metrics import read_metrics, rewrite_metrics
from seqblocks.train.models import (
    activation_checkpointing,
    build_train_model,
    forward_logits,
    kind_of_model,
    model_kind,
    save_train_model,
)
from seqblocks.train.optim import make_optimizer, make_scheduler
from seqblocks.train.rundir import LOSS_PLOT, METRICS_FILE, RUN_CONFIG, RunDirectory

__all__ = ["TrainResult", "train", "evaluate", "autocast_context", "context_parallel_chunk", "METRICS_FILE",
           "LOSS_PLOT"]


@dataclasses.dataclass
class TrainResult:
    """What ``train`` hands back.

    Attributes:
        model (nn.Module): the trained, unwrapped model (on rank 0 under FSDP: an unsharded CPU copy).
        task (Task): the task it was trained on.
        metrics (dict): the final evaluation (``loss``, ``ppl``, ``acc``) and the last training loss.
        checkpoint (Path | None): the last checkpoint written (rank 0), or the one resumed from when
            none was written; None otherwise.
        step (int): optimizer steps completed.
        config (TrainConfig | None): the configuration the run followed (a resumed run's is the
            checkpoint's). Default: None.
        already_complete (bool): a resumed run had already done every step of its schedule, so nothing
            was trained; ``metrics`` are then its last logged ones. Default: False.
    """

    model: nn.Module
    task: Task
    metrics: dict[str, float]
    checkpoint: Path | None
    step: int
    config: TrainConfig | None = None
    already_complete: bool = False


def resolved_precision(device: torch.device, precision: str) -> str:
    """"bf16" or "fp32": what ``precision`` ("auto" included) means on ``device``."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision`` "bf16" (or "auto" on a CUDA device with bf16), else nothing."""
    if resolved_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over scored positions, in fp32 (logits may be bf16 under autocast)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _mtp_loss_sum(out: Any, targets: torch.Tensor, module: nn.Module) -> torch.Tensor | float:
    """The model's MTP loss (``mtp_lambda`` times the mean over depths) scaled by this micro-batch's
    scored tokens, so that after the step's division by the token count it weighs like the main loss;
    0 for a model without MTP. The logged ``loss`` stays the main next-token cross-entropy."""
    mtp_logits = getattr(out, "mtp_logits", None)
    if not mtp_logits:
        return 0.0
    scored = (targets != IGNORE_INDEX).sum()
    return mtp_loss(mtp_logits, targets, module.config.mtp_lambda, IGNORE_INDEX) * scored


def _target_bytes(table: torch.Tensor | None, targets: torch.Tensor) -> int:
    """UTF-8 bytes of the scored targets (``Task.token_bytes`` table); 0 without a table."""
    if table is None:
        return 0
    scored = targets[targets != IGNORE_INDEX]
    return int(table.to(scored.device)[scored.clamp(0, table.numel() - 1)].sum())


def bits_per_byte(nats: float, nbytes: int) -> float:
    """Bits per UTF-8 byte of text scored with ``nats`` summed cross-entropy over ``nbytes`` bytes:
    nats per token * tokens / bytes / ln 2 (a tokenizer-independent measure)."""
    return nats / max(nbytes, 1) / math.log(2)
def _aux_loss_sum(out: Any, targets: torch.Tensor) -> torch.Tensor | float:
    """The MoE layers' weighted balance / z-losses (``CausalLMOutput.aux_loss``) scaled by this
    micro-batch's scored tokens like ``_mtp_loss_sum``; 0 without MoE layers."""
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        return 0.0
    return aux * (targets != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch_size: int = 64, device: torch.device | str = "cpu",
             precision: str = "fp32", seed: int = 0, pack_boundaries: bool = False,
             max_batches: int = 0) -> dict[str, float]:
    """Loss, perplexity and accuracy of ``model`` on ``task``'s held-out split.

    Args:
        model (nn.Module): a causal LM (input ids [B, T] to an output with ``.logits`` [B, T, V]), an
            encoder-decoder, a classifier or an image classifier (images to [B, C] logits;
            ``seqblocks.train.models``).
        task (Task): the task; its ``eval_batches`` is the held-out set.
        batch_size (int): rows per forward. Default: 64.
        device (torch.device | str): where to run. Default: "cpu".
        precision (str): "fp32", "bf16" or "auto". Default: "fp32".
        seed (int): the task seed (synthetic tasks draw their held-out set from it). Default: 0.
        pack_boundaries (bool): pass the document boundaries of ``shards`` batches to the model (the
            chars task's ``pack_documents`` rows always pass theirs). Default: False.
        max_batches (int): score only the first N batches of the held-out set; 0: all. Default: 0.

    Returns:
        dict: ``loss`` (mean cross-entropy per scored token), ``ppl`` (exp(loss)), ``acc`` (argmax
        accuracy per scored token), ``seq_acc`` (rows with every scored token right), ``tokens``; and
        ``bpb`` (bits per UTF-8 byte) for a text task (``Task.token_bytes``).

    Under ``seqblocks.parallel.context_parallel`` (a causal LM) every rank of the group scores its time
    chunk of each batch (``context_parallel_chunk``) and the sums are all-reduced over the group, so each
    rank returns the whole batch's metrics.
    """
    device = torch.device(device)
    cp = current_context_parallel()
    cp = cp if cp is not None and cp.world_size > 1 else None
    was_training = model.training
    model.eval()
    kind, table = kind_of_model(model), task.token_bytes()
    total, correct, count, rows_right, rows, nbytes = 0.0, 0, 0, 0, 0, 0
    try:
        batches = task.eval_batches(batch_size, seed)
        for batch in batches[:max_batches] if max_batches > 0 else batches:
            batch = batch.to(device)
            if cp is not None:
                batch = context_parallel_chunk(batch, cp.rank, cp.world_size)
            with autocast_context(device, precision):
                logits = forward_logits(model, batch, kind, _boundaries(batch, pack_boundaries))[1]
            width = task.num_classes if kind in ("classifier", "image_classifier") else getattr(
                task, "target_vocab_size", task.vocab_size)
            logits = logits[..., :width].float()
            nbytes += _target_bytes(table, batch.targets)
            scored = batch.targets != IGNORE_INDEX
            total += float(_loss_sum(logits, batch.targets))
            right = (logits.argmax(-1) == batch.targets) & scored
            correct += int(right.sum())
            count += int(scored.sum())
            if cp is None:
                rows_right += int(((right | ~scored).all(dim=1)).sum())
            else:  # a row is right when every chunk of it is: count the wrong tokens per row over the group
                wrong = (~(right | ~scored)).sum(dim=1)
                torch.distributed.all_reduce(wrong, group=cp.group)
                rows_right += int((wrong == 0).sum())
            rows += batch.input_ids.shape[0]
    finally:
        model.train(was_training)
    if cp is not None:
        sums = torch.tensor([total, correct, count, nbytes], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums, group=cp.group)
        total, correct, count, nbytes = float(sums[0]), int(sums[1]), int(sums[2]), int(sums[3])
    loss = total / max(count, 1)
    result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": correct / max(count, 1),
              "seq_acc": rows_right / max(rows, 1), "tokens": count}
    if table is not None:
        result["bpb"] = bits_per_byte(total, nbytes)
    return result


def _boundaries(batch: Batch, pack_boundaries: bool) -> bool:
    """Whether the model gets ``batch``'s document boundaries: a ``shards`` batch's with
    ``pack_boundaries``, other packed rows' (the chars task's ``pack_documents``) always."""
    from seqblocks.tasks.shards import PackedBatch

    return pack_boundaries or not isinstance(batch, PackedBatch)


def _check_pack_boundaries(module: nn.Module, task: Task, config: TrainConfig) -> None:
    import inspect

    from seqblocks.tasks.shards import PackedBatch

    if not config.pack_boundaries:
        return
    if not isinstance(task.batch("train", 0, 1, config.seed), PackedBatch):
        raise ValueError(f"TrainConfig.pack_boundaries: task {config.task!r} has no document boundaries to pass "
                         f"(a task of packed rows, such as 'shards', has)")
    if "cu_seqlens" not in inspect.signature(module.forward).parameters:
        raise ValueError(f"TrainConfig.pack_boundaries: the forward of {type(module).__name__} takes no cu_seqlens=; "
                         f"leave pack_boundaries off (the loss is still masked across documents)")


def context_parallel_chunk(batch: Batch, rank: int, size: int) -> Batch:
    """Time chunk ``rank`` of ``size`` of a batch's rows: tokens ``[rank * T / size, (rank + 1) * T / size)``
    of the inputs, their targets (already the next tokens) and document ids.

    Raises:
        ValueError: T not divisible by ``size``.
    """
    T = batch.input_ids.shape[1]
    if T % size:
        raise ValueError(f"context_parallel={size}: rows of {T} tokens do not split into {size} equal time chunks; "
                         f"use a sequence length divisible by {size}")
    n = T // size
    here = slice(rank * n, (rank + 1) * n)
    return dataclasses.replace(batch, input_ids=batch.input_ids[:, here], targets=batch.targets[:, here],
                               document_ids=None if batch.document_ids is None else batch.document_ids[:, here])


def _context_parallel_group(config: TrainConfig, info: DistInfo, kind: str):
    """A context manager that runs a forward under this rank's context-parallel group (nothing when
    ``config.context_parallel`` is 1). Every rank creates every group, in the same order.

    Raises:
        ValueError: a world size that is not a multiple of the group size, a model other than a causal LM.
    """
    size = config.context_parallel
    if size == 1:
        return contextlib.nullcontext
    if info.world_size % size:
        raise ValueError(f"TrainConfig.context_parallel={size} needs a world size that is a multiple of it (torchrun "
                         f"--nproc_per_node); this run has {info.world_size} process(es)")
    if kind != "causal_lm":
        raise ValueError(f"TrainConfig.context_parallel={size}: context parallelism trains a causal LM; this run's "
                         f"model is a {kind!r}")
    if config.pack_boundaries:
        raise ValueError("TrainConfig.context_parallel: packed document boundaries (pack_boundaries) do not split "
                         "along time; leave pack_boundaries off (the loss is still masked across documents)")
    group = None  # the whole world
    if size < info.world_size:
        groups = [torch.distributed.new_group(list(range(i * size, (i + 1) * size)))
                  for i in range(info.world_size // size)]
        group = groups[info.rank // size]
    return lambda: context_parallel(group, attention=config.context_parallel_attention)


def _micro_batches(task: Task, step: int, config: TrainConfig, info: DistInfo) -> tuple[list[Batch], int]:
    """This rank's micro-batches of optimizer step ``step`` and the global batch's scored-token count
    (with context parallelism, this rank's time chunk of its group's rows)."""
    full = task.batch("train", step, config.batch_size, config.seed)
    if config.seq_len_warmup:
        from seqblocks.train.curriculum import curriculum_batch

        full = curriculum_batch(full, step, config.seq_len_warmup, config.seq_len_start)
    micro = config.batch_size // config.grad_accum
    cp = config.context_parallel
    per_rank = micro // (info.world_size // cp)
    row = info.rank // cp  # the data-parallel replica (context-parallel group) this rank belongs to
    parts = [full[m * micro + row * per_rank: m * micro + (row + 1) * per_rank]
             for m in range(config.grad_accum)]
    if cp > 1:
        parts = [context_parallel_chunk(part, info.rank % cp, cp) for part in parts]
    return parts, full.num_targets


def _write_checkpoint(run: RunDirectory | None, step: int, info: DistInfo, module: nn.Module,
                      saver: nn.Module | None, optimizer, scheduler, config: TrainConfig, model_config: dict,
                      task: Task, extra: dict[str, Any], card: dict[str, Any]) -> Path | None:
    """Collect the full state on every rank (collective under FSDP) and write it from the owner (rank 0);
    or, for sharded checkpoints, let every rank write its shards (``_write_sharded_checkpoint``).

    ``card`` describes the training run for the checkpoint's model card (``README.md``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    if config.sharded_checkpoints(info.world_size):
        return _write_sharded_checkpoint(run, step, info, module, saver, optimizer, scheduler, config, model_config,
                                         task, extra, card)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim_state = get_optimizer_state_dict(module, optimizer, options=options)
    model_state = get_model_state_dict(module, options=options) if config.parallel == "fsdp" and \
        info.distributed else None
    path = None
    if run is not None:
        target = module
        if model_state is not None:
            saver.load_state_dict(model_state)
            target = saver

        def write(tmp: Path) -> None:
            save_train_model(target, tmp, model_config, card)
            _write_train_files(tmp, {"optimizer": optim_state, "checkpoint_format": "full"}, step, info,
                               scheduler, config, model_config, task, extra)

        with run.writing(run.path / CHECKPOINT_DIR / f"step_{step:07d}"):
            path = save_checkpoint(run.path, step, write, keep=config.keep_checkpoints)
    barrier(info)
    return path


def _write_train_files(tmp: Path, state: dict[str, Any], step: int, info: DistInfo, scheduler, config: TrainConfig,
                       model_config: dict, task: Task, extra: dict[str, Any]) -> None:
    """``train_state.pt`` (``state`` plus the scheduler, RNG, data position and configurations),
    ``task.json`` and the tokenizer, into the checkpoint being written (rank 0)."""
    state = {**state, "step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(),
             "data": {"next_step": step, "seed": config.seed}, "train_config": config.to_dict(),
             "model_config": model_config, "world_size": info.world_size, **extra}
    # Through a Python file, so that a full disk surfaces as the OSError it is (torch's own
    # file writer reports it only as "unexpected pos").
    with open(tmp / TRAIN_STATE, "wb") as handle:
        torch.save(state, handle)
    (tmp / TASK_FILE).write_text(json.dumps({"name": config.task, "options": task.config()}, indent=2))
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER_FILE)


def _write_sharded_checkpoint(run: RunDirectory | None, step: int, info: DistInfo, module: nn.Module,
                              describer: nn.Module | None, optimizer, scheduler, config: TrainConfig,
                              model_config: dict, task: Task, extra: dict[str, Any],
                              card: dict[str, Any]) -> Path | None:
    """A sharded checkpoint (``seqblocks.train.sharded``): rank 0 opens the temporary checkpoint directory
    and sends its name to every rank, every rank writes its shards of the model and optimizer into
    ``dcp/`` there, then rank 0 adds the other files and renames the directory into place (the same
    atomic ``save_checkpoint`` as a full checkpoint). ``describer``: an unsharded (meta-device) copy
    of the model on rank 0, for ``config.json`` and the model card."""
    from seqblocks.checkpoint import SHARDED_DIR
    from seqblocks.train.sharded import save_sharded, write_model_files

    path = None
    if run is None:
        tmp = broadcast_object(None, info)
        if tmp is None:
            raise RuntimeError(f"rank 0 could not open checkpoint step_{step:07d}; see its error")
        save_sharded(Path(tmp) / SHARDED_DIR, module, optimizer, info)
    else:
        sent = False

        def write(tmp: Path) -> None:
            nonlocal sent
            broadcast_object(str(tmp), info)
            sent = True
            save_sharded(tmp / SHARDED_DIR, module, optimizer, info)
            write_model_files(describer if describer is not None else module, tmp, model_config, card)
            _write_train_files(tmp, {"checkpoint_format": "sharded"}, step, info, scheduler, config, model_config,
                               task, extra)

        try:
            with run.writing(run.path / CHECKPOINT_DIR / f"step_{step:07d}"):
                path = save_checkpoint(run.path, step, write, keep=config.keep_checkpoints)
        except BaseException:
            if not sent:  # the other ranks wait for a directory to write into: let them stop too
                broadcast_object(None, info)
            raise
    barrier(info)
    return path


def _is_rank_zero() -> bool:
    """Rank 0 of the process group, or of the one torchrun describes before it is joined."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def train(model_config: dict[str, Any], config: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          overwrite: bool = False, force_unlock: bool = False, steps: int | None = None,
          stop_after: int | None = None, progress: bool = True,
          log: Callable[[str], None] | None = None,
          step_hook: Callable[[int], None] | None = None) -> TrainResult:
    """Train a model on a task: a causal LM (``LRNNLMHeadModel``), an encoder-decoder, a classifier or an
    image classifier (a ``VisionTransformer``), as the model config's ``"model"`` key (or an image
    model's ``"model_type"``) says (``seqblocks.train.models``).

    The run owns ``out_dir`` while it trains (see ``seqblocks.train.rundir``): rank 0 holds its lock,
    and a directory holding a previous run is refused unless ``resume`` or ``overwrite`` says what to
    do with it.

    Args:
        model_config (dict): the model's keyword arguments (the sizes a task fixes are set from the
            task, ``Task.model_fields``: the vocabulary, or an image task's classes and image size), with
            ``"model"`` naming its kind (default "causal_lm"; an image model's ``"model_type"`` names it).
        config (TrainConfig): the run.
        out_dir (str | Path): run directory: ``metrics.jsonl``, ``loss.png``, ``run.json``, ``checkpoints/``.
        resume (bool): continue from the latest checkpoint in ``out_dir``; the model and training
            configuration then come from the checkpoint and the arguments given here are ignored
            (except ``steps``). A run that has done every step of its schedule is not trained again:
            the result says ``already_complete``. Default: False.
        overwrite (bool): a fresh run deletes the previous run in ``out_dir`` (its checkpoints,
            metrics, ``run.json`` and plot; nothing else). Default: False.
        force_unlock (bool): take ``out_dir``'s lock even when its owner looks alive (a lock from
            another host, a hung process). Default: False.
        steps (int | None): the schedule's length instead of ``config.steps`` (of the checkpoint's,
            with ``resume``: a larger number continues a finished run, the cosine then spanning the
            new length from the step reached). Default: None.
        stop_after (int | None): stop (with a checkpoint) once this many steps of the schedule are done,
            to split a run across jobs; the schedule still spans ``config.steps``. Default: None.
        progress (bool): show a tqdm progress bar (rank 0). Default: True.
        log (Callable[[str], None] | None): where rank 0's messages go. Default: None (stderr).
        step_hook (Callable[[int], None] | None): called on every rank after each optimizer step with
            the number of steps done (the command line re-checks its CPU thread count there).
            Default: None.

    Raises:
        FileNotFoundError: ``resume`` with no checkpoint in ``out_dir``.
        RunDirectoryError (a ValueError): ``out_dir`` is locked by a live run, or holds a previous run
            and neither ``resume`` nor ``overwrite`` is given.
        RunDirectoryWriteError (an OSError): a write failed for want of space or permission; the last
            complete checkpoint is intact and named in the message.
        ValueError: ``resume`` with ``overwrite``, ``steps`` fewer than a resumed run has done, a batch
            size that does not split over processes and accumulation steps, and the errors of the
            task and model configs.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in the directory and --overwrite deletes it; give one")
    out_dir = Path(out_dir)
    owner = _is_rank_zero()
    say = (log or (lambda msg: print(msg, file=sys.stderr))) if owner else (lambda msg: None)
    with contextlib.ExitStack() as stack:
        run = None
        if owner:
            run = stack.enter_context(RunDirectory(out_dir, force_unlock=force_unlock, log=say))
            run.prepare(resume=resume, overwrite=overwrite)
        return _train(model_config, config, out_dir, run, say, resume=resume, steps=steps, stop_after=stop_after,
                      progress=progress, step_hook=step_hook)


def _last_metrics(metrics_path: Path, step: int) -> dict[str, float]:
    """The last training loss and evaluation logged up to ``step``, as ``TrainResult.metrics`` holds them."""
    rows = read_metrics(metrics_path, step)
    metrics = {}
    train_rows = [r for r in rows if r.get("type") == "train"]
    if train_rows:
        metrics["train_loss"] = train_rows[-1]["loss"]
    evals = [r for r in rows if r.get("type") == "eval"]
    if evals:
        metrics.update({f"val_{k}": v for k, v in evals[-1].items() if k not in ("type", "step")})
    return metrics


def _train(model_config: dict[str, Any], config: TrainConfig, out_dir: Path, run: RunDirectory | None,
           say: Callable[[str], None], *, resume: bool, steps: int | None, stop_after: int | None,
           progress: bool, step_hook: Callable[[int], None] | None = None) -> TrainResult:
    """The run itself, in a directory ``run`` owns (``run`` is None on ranks other than 0)."""
    state, ckpt, extended_from = None, None, None
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: {str(out_dir)!r} holds no checkpoint to resume from; start a fresh "
                                    f"run without --resume (with --overwrite to replace what the directory holds)")
        state = load_train_state(ckpt)
        config = TrainConfig.from_dict(state["train_config"])
        model_config = state["model_config"]
    if steps is not None and steps != config.steps:
        if state is not None and steps < state["step"]:
            raise ValueError(f"--steps {steps} is fewer than the {state['step']} steps the run in run directory "
                             f"{out_dir} has already done")
        extended_from = config.steps if state is not None else None
        config = dataclasses.replace(config, steps=steps)
    if state is not None and state["step"] >= config.steps:
        say(f"the run in run directory {out_dir} is complete ({state['step']} of {config.steps} steps, {ckpt}); "
            f"nothing to do (--resume --steps N with N > {state['step']} continues it)")
        task = get_task(config.task, **config.task_options)
        module = build_train_model(model_config, task)
        from seqblocks.checkpoint import load_checkpoint_weights

        load_checkpoint_weights(module, ckpt)
        return TrainResult(model=module, task=task, metrics=_last_metrics(out_dir / METRICS_FILE, state["step"]),
                           checkpoint=ckpt, step=state["step"], config=config, already_complete=True)
    info = init_distributed(config.device)
    micro = config.batch_size // config.grad_accum
    replicas = info.world_size // config.context_parallel if info.world_size % config.context_parallel == 0 else 0
    if replicas and micro % replicas:
        groups = f" ({replicas} context-parallel groups)" if config.context_parallel > 1 else ""
        raise ValueError(f"batch_size={config.batch_size} / grad_accum={config.grad_accum} = {micro} rows per "
                         f"micro-batch do not split over {replicas} processes{groups}")
    task = get_task(config.task, **config.task_options)
    model_config = {**model_config, **task.model_fields()}

    torch.manual_seed(config.seed)
    kind = model_kind(model_config)
    in_group = _context_parallel_group(config, info, kind)
    module = build_train_model(model_config, task)
    sharded_resume = state is not None and state.get("checkpoint_format") == "sharded"
    if state is not None and not sharded_resume:  # a sharded one is read after wrapping, into the shards
        from seqblocks.checkpoint import WEIGHTS_NAME, load_weights

        load_weights(module, ckpt / WEIGHTS_NAME)
    _check_pack_boundaries(module, task, config)
    module.to(info.device)
    module.train()
    if config.activation_checkpointing:
        activation_checkpointing(module, config.activation_checkpointing)
    fsdp = config.parallel == "fsdp" and info.distributed
    sharded = config.sharded_checkpoints(info.world_size)
    saver = None  # rank 0's unsharded copy of an FSDP model: the full checkpoints' weights, the result
    if fsdp and info.is_main:
        with torch.random.fork_rng(devices=[]), torch.device("meta" if sharded else "cpu"):
            saver = build_train_model(model_config, task)  # sharded: only described (config, card)
    if config.parallel == "fsdp" and not info.distributed and config.fsdp_param_dtype != "fp32":
        say(f"one process: FSDP2 and fsdp_param_dtype={config.fsdp_param_dtype!r} do not apply (the model trains "
            f"unwrapped; --precision bf16 is autocast)")
    wrapped = wrap_model(module, info, config.parallel,
                         **({"param_dtype": config.fsdp_param_dtype, "reduce_dtype": config.fsdp_reduce_dtype,
                             "reshard_after_forward": config.fsdp_reshard_after_forward} if fsdp else {}))
    runner = torch.compile(wrapped, backend=config.compile_backend) if config.compile else wrapped
    optimizer = make_optimizer(module, config.lr, config.weight_decay, (config.beta1, config.beta2))
    scheduler = make_scheduler(optimizer, config.steps, config.warmup_steps, config.min_lr_ratio)
    start, tokens_seen, elapsed = 0, 0, 0.0
    if state is not None:
        if sharded_resume:  # every rank reads what its shards cover, whatever the world size that wrote them
            from seqblocks.checkpoint import SHARDED_DIR
            from seqblocks.train.sharded import load_sharded

            load_sharded(ckpt / SHARDED_DIR, module, optimizer, info)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(module, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed_s"]
        if extended_from is not None:
            # The saved learning rates follow the old schedule; restart them on the new one at this step.
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
            say(f"extending the schedule from {extended_from} to {config.steps} steps: the learning rate follows "
                f"the {config.steps}-step cosine from step {start} (now {scheduler.get_last_lr()[0]:.2e})")
        say(f"resumed from {ckpt} at step {start}")

    metrics_path = out_dir / METRICS_FILE
    if run is not None:
        with run.writing(out_dir / RUN_CONFIG):
            atomic_write_text(out_dir / RUN_CONFIG, json.dumps({"model": model_config, "train": config.to_dict(),
                                                                "task": task.config()}, indent=2))
        # A resumed run keeps the rows up to its checkpoint; later ones (and a torn last line left by a
        # killed writer) belong to steps it is about to redo.
        history = read_metrics(metrics_path, start) if resume else []
        with run.writing(metrics_path):
            rewrite_metrics(metrics_path, history)
    barrier(info)
    n_params = sum(p.numel() for p in module.parameters())
    n_active, peak = active_params(module), peak_flops(info.device, config.peak_flops)
    say(f"task {config.task} (vocab {task.vocab_size}, seq_len {task.seq_len}), {n_params / 1e6:.2f}M parameters, "
        f"{config.steps} steps of {config.batch_size} x {task.seq_len} tokens on {info.device}"
        f"{f' x {info.world_size} processes ({config.parallel})' if info.distributed else ''}")

    end = config.steps if stop_after is None else max(start, min(config.steps, stop_after))
    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)
    ddp = isinstance(wrapped, nn.parallel.DistributedDataParallel)
    # Throughput counts training steps only (evaluation and checkpoint time excluded).
    window_loss, window_steps, window_tokens, window_time, rate_ema = 0.0, 0, 0, 0.0, None
    table = task.token_bytes()  # bits per byte of a text task
    window_nats, window_bytes = 0.0, 0
    last_ckpt, final_eval, loss_value, done, completed = ckpt, {}, float("nan"), start, False
    logger = None
    evals: dict[int, dict[str, float]] = {}

    def log_row(row: dict[str, Any]) -> None:
        if logger is not None:
            with run.writing(metrics_path):
                logger.write(row)

    def checkpoint(step: int) -> Path | None:
        extra = {"tokens_seen": tokens_seen, "elapsed_s": elapsed}
        # What the model card says about the training (seqblocks.model_card).
        card = {"task": config.task, "task_description": getattr(task, "description", ""),
                "task_options": task.config(), "is_language": task.is_language, "step": step, "steps": config.steps,
                "batch_size": config.batch_size, "seq_len": task.seq_len, "tokens": tokens_seen, "lr": config.lr,
                "seed": config.seed, "precision": resolved_precision(info.device, config.precision),
                "world_size": info.world_size, "eval": evals.get(step)}
        return _write_checkpoint(run, step, info, module, saver, optimizer, scheduler, config, model_config,
                                 task, extra, card)

    def run_eval(step: int) -> dict[str, float]:
        with in_group():
            result = evaluate(module, task, config.eval_batch_size, info.device, config.precision, config.seed,
                              config.pack_boundaries, max_batches=config.eval_steps)
        if fsdp:
            reshard(module)
        log_row({"type": "eval", "step": step, **result})
        bpb = f", bpb {result['bpb']:.4f}" if "bpb" in result else ""
        say(f"step {step}: val loss {result['loss']:.4f}{bpb}, ppl {result['ppl']:.2f}, acc {result['acc']:.3f}")
        evals[step] = result
        return result

    def plot(step: int) -> bool | str:
        """Redraw loss.png from metrics.jsonl (the run's owner, rank 0): after each evaluation or
        checkpoint, and at the end."""
        if run is None:
            return True
        from seqblocks.train.plot import plot_loss_curve
        from seqblocks.train.rundir import RunDirectoryWriteError

        title = f"{out_dir.name}: {config.task}, {n_params / 1e6:.2f}M parameters, step {step:,} of {config.steps:,}"
        try:
            with run.writing(out_dir / LOSS_PLOT):
                return plot_loss_curve(metrics_path, out_dir / LOSS_PLOT, title=title)
        except RunDirectoryWriteError as err:  # the run itself is saved; only its picture is missing
            return f"plot skipped: {err}"
        except Exception as err:  # a plot must never end (or mask the error of) a run
            return f"plot skipped: {type(err).__name__}: {err}"

    try:
        if run is not None:
            with run.writing(metrics_path):
                logger = RunLogger(out_dir, tensorboard=config.tensorboard, wandb=config.wandb, start_step=start,
                                   config={"model": model_config, "train": config.to_dict()})
        for step in range(start, end):
            t0 = time.perf_counter()
            parts, count = _micro_batches(task, step, config, info)
            lr = scheduler.get_last_lr()[0]
            step_loss = torch.zeros((), device=info.device)
            step_bytes = torch.zeros((), dtype=torch.long, device=info.device)
            for m, part in enumerate(parts):
                part = part.to(info.device)
                step_bytes += _target_bytes(table, part.targets)
                sync = contextlib.nullcontext() if not ddp or m == len(parts) - 1 else wrapped.no_sync()
                with sync, in_group():
                    with autocast_context(info.device, config.precision):
                        out, logits = forward_logits(runner, part, kind, _boundaries(part, config.pack_boundaries))
                    loss = _loss_sum(logits, part.targets)
                    objective = loss + _mtp_loss_sum(out, part.targets, module) + _aux_loss_sum(out, part.targets)
                    (objective * (info.world_size / max(count, 1))).backward()
                step_loss += loss.detach()
            max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            update_biases = getattr(module, "update_router_biases", None)
            if update_biases is not None:  # MoE: auxiliary-loss-free balancing after the step
                update_biases()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if info.distributed:
                torch.distributed.all_reduce(step_loss)
                if table is not None:
                    torch.distributed.all_reduce(step_bytes)
            loss_value = float(step_loss) / max(count, 1)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {step + 1}: the loss is {loss_value}; lower the learning rate "
                                         f"(lr={config.lr}) or check the model")
            dt = time.perf_counter() - t0
            done = step + 1
            step_tokens = config.batch_size * task.seq_len
            tokens_seen += step_tokens
            elapsed += dt
            window_loss += loss_value
            window_nats += float(step_loss)
            window_bytes += int(step_bytes)
            window_steps += 1
            window_tokens += step_tokens
            window_time += dt
            rate_ema = step_tokens / dt if rate_ema is None else 0.9 * rate_ema + 0.1 * step_tokens / dt
            if bar is not None:
                rate = rate_ema
                util = mfu(n_active, rate, peak)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}", tokens=_short(tokens_seen),
                                **({"mfu": f"{util:.1%}"} if util is not None else {}),
                                mem=f"{memory_gib(info.device):.2f}G", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
            if done % config.log_every == 0 or done == end:
                rate = window_tokens / max(window_time, 1e-9)
                row = {"type": "train", "step": done, "loss": window_loss / window_steps, "lr": lr,
                       "grad_norm": float(grad_norm), "tokens": tokens_seen, "tokens_per_s": rate,
                       "elapsed_s": elapsed, "cpu_threads": torch.get_num_threads(),
                       "memory_gib": memory_gib(info.device)}
                util = mfu(n_active, rate, peak)
                if util is not None:
                    row["mfu"] = util
                if table is not None:
                    row["bpb"] = bits_per_byte(window_nats, window_bytes)
                log_row(row)
                window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
                window_nats, window_bytes = 0.0, 0
            is_last = done == end
            evaluated = (config.eval_every and done % config.eval_every == 0) or done == config.steps
            if evaluated:
                final_eval = run_eval(done)
            saved = (config.ckpt_every and done % config.ckpt_every == 0) or is_last
            if saved:
                last_ckpt = checkpoint(done)
            if (evaluated or saved) and not is_last:
                plot(done)
            if step_hook is not None:
                step_hook(done)
        completed = True
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        # Also when the run ends early (Ctrl-C, a diverged loss): the plot shows it up to there.
        if run is not None:
            plotted = plot(done)
            if plotted is True:
                say(f"loss curve{'' if completed else ' so far'}: {out_dir / LOSS_PLOT}")
            elif completed:
                say(plotted)
    if fsdp and sharded:  # the result on rank 0 is the whole model, gathered once here
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if info.is_main:
            with torch.random.fork_rng(devices=[]):
                saver = build_train_model(model_config, task)
            saver.load_state_dict(full)
    result_model = saver if saver is not None else module
    metrics = {"train_loss": loss_value, **{f"val_{k}": v for k, v in final_eval.items()}}
    return TrainResult(model=result_model, task=task, metrics=metrics, checkpoint=last_ckpt, step=end, config=config)


def _short(n: int) -> str:
    """1234567 -> "1.23M": the tokens seen, in the progress bar."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
