"""Reading sharded (``torch.distributed.checkpoint``) checkpoints without running anything they name.

``seqblocks.train.sharded`` writes and resumes them (its docstring has the layout and the safety rules);
this module holds what a process needs only to *read* one - the restricted ``.metadata`` unpickler, the
reader and planner that use it, and ``read_model_state`` - at the layer of ``seqblocks.checkpoint``, so
``load_pretrained`` reads a sharded checkpoint without importing the trainer.

Safety. DCP's own reader unpickles ``.metadata`` with ``pickle.load`` (any object, any callable), and
loads every non-tensor entry with ``torch.load(weights_only=False)``. Here ``.metadata`` is read by an
unpickler that builds only DCP's own metadata records, ``torch.Size``, torch dtypes and layouts, and
paths; any other global it names is refused with ``ValueError`` before it is looked up. Every file the
index points at must be a plain name inside the checkpoint directory. Non-tensor entries are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["SHARDED_DIR", "METADATA", "is_sharded", "read_metadata", "read_model_state", "single_process",
           "safe_reader", "safe_planner"]

SHARDED_DIR = "dcp"  # a sharded training checkpoint's model and optimizer (seqblocks.train.sharded)
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


def read_metadata(path: Path):
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


_CLASSES: list = []


def _reader_classes() -> tuple[type, type]:
    """The reader and planner classes, defined on first use: they subclass DCP's, and importing
    ``torch.distributed.checkpoint`` costs about a second, which ``import seqblocks`` should not pay."""
    if _CLASSES:
        return _CLASSES[0]
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeFileSystemReader(FileSystemReader):
        """DCP's ``FileSystemReader`` with a restricted ``.metadata`` unpickler (see the module docstring)."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            name = METADATA if rank is None else f"__{rank}{METADATA}"
            metadata = read_metadata(Path(self.path) / name)
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

    _CLASSES.append((SafeFileSystemReader, SafeLoadPlanner))
    return _CLASSES[0]


def safe_reader(path: str | os.PathLike):
    """DCP's ``FileSystemReader`` for ``path`` with the restricted ``.metadata`` unpickler."""
    return _reader_classes()[0](str(path))


def safe_planner():
    """DCP's default load planner, reading non-tensor entries as plain values only."""
    return _reader_classes()[1]()


@contextlib.contextmanager
def single_process(distributed: bool) -> Iterator[None]:
    """Silences DCP's warning that it runs in one process: here that is asked for, not assumed."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def is_sharded(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` is a directory holding a sharded (DCP) model and optimizer."""
    return (Path(checkpoint) / SHARDED_DIR / METADATA).is_file()


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
    metadata = read_metadata(directory / METADATA)
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"{directory} holds no model tensors (keys 'model.*'); it is not a seqblocks training "
                         f"checkpoint")
    with single_process(False):
        dcp.load(state, storage_reader=safe_reader(directory), planner=safe_planner(), no_dist=True)
    return {key[len("model."):]: value for key, value in state.items()}
