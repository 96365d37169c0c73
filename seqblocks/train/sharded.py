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

import contextlib
import io
import json
import os
import pathlib
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from seqblocks.checkpoint import CONFIG_NAME, SHARDED_DIR
from seqblocks.train.distributed import DistInfo

__all__ = ["SHARDED_DIR", "is_sharded", "save_sharded", "load_sharded", "read_model_state", "write_model_files",
           "consolidate_checkpoint", "SafeFileSystemReader", "SafeLoadPlanner"]

METADATA = ".metadata"
# The globals a DCP .metadata pickle may name: DCP's records, and the torch / pathlib values inside them.
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_METADATA_MODULE, name) for name in ("Metadata", "MetadataIndex", "TensorStorageMetadata",
                                          "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                          "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"),
}
# Paths (StorageMeta.checkpoint_id) are kept as pure paths: nothing touches the file system.
_PATHS = {"PosixPath": pathlib.PurePosixPath, "PurePosixPath": pathlib.PurePosixPath,
          "WindowsPath": pathlib.PureWindowsPath, "PureWindowsPath": pathlib.PureWindowsPath}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, building DCP's metadata records and nothing else."""

    def __init__(self, file, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "pathlib" and name in _PATHS:
            return _PATHS[name]
        raise ValueError(f"{self.source} names {module}.{name}, which is not part of a checkpoint's metadata; "
                         f"refusing to load it (a sharded checkpoint's index may only hold DCP's own records)")


def _read_metadata(path: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle, str(path)).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {path.parent} is not a complete sharded checkpoint") from None
    except ValueError:  # a name refused above
        raise
    except Exception as err:  # UnpicklingError, EOFError, ... from a corrupted or truncated file
        raise ValueError(f"{path} is not a readable checkpoint index (corrupted or truncated?): "
                         f"{type(err).__name__}: {err}") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{path} holds a {type(metadata).__name__}, not a checkpoint index")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"{path} points at {name!r}; every file of a sharded checkpoint must be a plain file "
                             f"name inside {path.parent}")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` with a restricted ``.metadata`` unpickler (see the module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        name = METADATA if rank is None else f"__{rank}{METADATA}"
        metadata = _read_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        if hasattr(self, "load_id"):
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor entries read as plain values only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            plain = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn!r} is not a plain value (numbers, "
                             f"strings, lists, dicts, tensors); refusing to load it: {err}") from None
        # Re-serialised from the plain value just read, so the parent's unrestricted load sees only it.
        buffer = io.BytesIO()
        torch.save(plain, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)


@contextlib.contextmanager
def _alone(distributed: bool) -> Iterator[None]:
    """Silences DCP's warning that it runs in one process: here that is asked for, not assumed."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def is_sharded(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` is a directory holding a sharded (DCP) model and optimizer."""
    return (Path(checkpoint) / SHARDED_DIR / METADATA).is_file()


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
    with _alone(info.distributed):
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

    _read_metadata(Path(directory) / METADATA)  # checked here: DCP would wrap the error in its own exception
    state = _state(module, optimizer)
    with _alone(info.distributed):
        dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)), planner=SafeLoadPlanner(),
                 no_dist=not info.distributed)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_model_state(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model tensors of a sharded checkpoint, on the CPU, in this process alone (no process
    group): the shards of every rank put together.

    Args:
        checkpoint (str | PathLike): a checkpoint directory holding ``dcp/``.

    Returns:
        dict: the model's state dict (names as ``model.state_dict()`` has them).

    Raises:
        FileNotFoundError: no sharded checkpoint there.
        ValueError: an index that is not DCP's plain data, or one holding no model.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(checkpoint) / SHARDED_DIR
    metadata = _read_metadata(directory / METADATA)
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"{directory} holds no model tensors (keys 'model.*'); it is not a seqblocks training "
                         f"checkpoint")
    with _alone(False):
        dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)), planner=SafeLoadPlanner(), no_dist=True)
    return {key[len("model."):]: value for key, value in state.items()}


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
