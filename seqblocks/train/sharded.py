"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), read without running
anything a checkpoint names.

A sharded checkpoint directory (``TrainConfig.checkpoint_format``) holds what a full one does, except
that the model and optimizer are not gathered on rank 0: every rank writes its own shards of

    {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}

(``torch.distributed.checkpoint.state_dict.get_state_dict``: FSDP2's DTensor shards, or DDP's replicated
tensors, each written once) into ``dcp/``: one ``__R_0.distcp`` file per rank and a ``.metadata``
index written by rank 0. ``config.json``, the model card, ``train_state.pt`` (scheduler, RNG, data
position, configurations; no weights), ``task.json`` and ``tokenizer.json`` are rank 0's, as in a full
checkpoint. DCP records every tensor's global shape and each shard's offsets, so ``load_sharded``
reads a checkpoint into any number of processes, FSDP2, DDP or one process alike: each rank reads the
pieces its own shards cover (``set_state_dict`` then puts them in place).

``read_model_state`` turns the model part back into ordinary full tensors in one process, without a
process group: ``seqblocks.checkpoint.load_pretrained`` (and ``seqblocks generate`` / ``eval``) load a
sharded checkpoint that way, and ``consolidate_checkpoint`` writes it out as a plain model checkpoint
(``config.json`` + ``model.safetensors``).

Safety. DCP's own reader unpickles ``.metadata`` with ``pickle.load`` (any object, any callable), and
loads every non-tensor entry (the optimizer's ``param_groups``) with ``torch.load(weights_only=False)``:
a crafted checkpoint could run code on load. Here ``.metadata`` is read by an unpickler that builds
only DCP's own metadata records (``Metadata``, ``TensorStorageMetadata``, ``ChunkStorageMetadata``,
``TensorProperties``, ``BytesStorageMetadata``, ``MetadataIndex``, ``StorageMeta``, ``_StorageInfo``),
``torch.Size``, torch dtypes and layouts, and paths; any other global it names is refused with
``ValueError`` before it is looked up. Every file the index points at must be a plain name inside the
checkpoint directory. Non-tensor entries are read with ``torch.load(weights_only=True)`` (plain
values only), and tensors are, in DCP itself.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter

from seqblocks.checkpoint import CONFIG_NAME
from seqblocks.checkpoint_dcp import (
    METADATA,
    SHARDED_DIR,
    is_sharded,
    read_metadata,
    read_model_state,
    safe_planner,
    safe_reader,
    single_process,
)
from seqblocks.train.distributed import DistInfo

__all__ = ["SHARDED_DIR", "is_sharded", "save_sharded", "load_sharded", "read_model_state", "write_model_files",
           "consolidate_checkpoint"]

def _state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(directory: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer,
                 info: DistInfo) -> None:
    """Write the model and optimizer state into ``directory``, each rank its own shards (collective:
    every rank calls it with the same ``directory``).

    Args:
        directory (str | PathLike): the DCP directory (a checkpoint's ``dcp/``); created if missing.
        module (nn.Module): the model (FSDP2-sharded in place, or the module under a DDP wrapper).
        optimizer (torch.optim.Optimizer): its optimizer.
        info (DistInfo): this process's place.
    """
    import torch.distributed.checkpoint as dcp

    Path(directory).mkdir(parents=True, exist_ok=True)
    writer = FileSystemWriter(str(directory), single_file_per_rank=True, sync_files=True)
    with single_process(info.distributed):
        dcp.save(_state(module, optimizer), storage_writer=writer, no_dist=not info.distributed)


def load_sharded(directory: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer,
                 info: DistInfo) -> None:
    """Load a ``save_sharded`` directory into ``module`` and ``optimizer``, on any number of processes
    (collective under torch.distributed): each rank reads the parts of the saved tensors its shards
    cover.

    Raises:
        FileNotFoundError: ``directory`` holds no checkpoint index.
        ValueError: an index or entry that is not DCP's plain data (see the module docstring).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    read_metadata(Path(directory) / METADATA)  # checked here: DCP would wrap the error in its own exception
    state = _state(module, optimizer)
    with single_process(info.distributed):
        dcp.load(state, storage_reader=safe_reader(directory), planner=safe_planner(),
                 no_dist=not info.distributed)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def write_model_files(model: nn.Module, directory: Path, model_config: dict[str, Any], card: dict[str, Any]) -> None:
    """What a sharded checkpoint holds of the model besides its tensors: ``config.json`` as
    ``save_pretrained`` writes it and the model card (a causal LM), or the model config (another kind,
    rebuilt with ``seqblocks.train.models.build_train_model``).

    Args:
        model (nn.Module): an unsharded copy of the model (the meta device will do: no tensor is read).
        directory (Path): the checkpoint directory.
        model_config (dict): the run's model config.
        card (dict): the training facts for the model card.
    """
    if hasattr(model, "full_checkpoint_config"):
        config = model.full_checkpoint_config()
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        model.generate_model_card(training=card).save(str(directory / "README.md"))
        return
    (directory / CONFIG_NAME).write_text(json.dumps(model_config, indent=2, sort_keys=True))


def consolidate_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a sharded checkpoint's model as a plain model checkpoint: ``config.json``,
    ``model.safetensors`` (loadable by ``load_pretrained`` and ``from_pretrained`` anywhere), and the
    checkpoint's model card, ``task.json`` and ``tokenizer.json`` when it has them.

    Args:
        checkpoint (str | PathLike): a sharded checkpoint directory, or a run directory (its latest).
        out_dir (str | PathLike): where to write; created if missing.

    Returns:
        Path: ``out_dir``.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint``.
        ValueError: it is not a sharded checkpoint, or is not readable as one.
    """
    from seqblocks.checkpoint import load_pretrained
    from seqblocks.train.checkpointing import TASK_FILE, TOKENIZER_FILE, resolve_checkpoint
    from seqblocks.train.models import load_train_model, save_train_model

    ckpt = resolve_checkpoint(checkpoint)
    if not is_sharded(ckpt):
        raise ValueError(f"{ckpt} is not a sharded checkpoint (no {SHARDED_DIR}/{METADATA}); it is loadable as it is")
    task = json.loads((ckpt / TASK_FILE).read_text()) if (ckpt / TASK_FILE).is_file() else None
    model = load_train_model(ckpt, task)
    if model is None:
        model = load_pretrained(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_train_model(model, out, json.loads((ckpt / CONFIG_NAME).read_text()), card={})
    for name in ("README.md", TASK_FILE, TOKENIZER_FILE):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, out / name)
    return out
