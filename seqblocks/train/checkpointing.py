"""Training checkpoints, written atomically.

A run directory holds ``checkpoints/step_NNNNNNN/`` directories and a ``checkpoints/latest`` file
naming the newest complete one. Each checkpoint directory is a loadable model checkpoint
(``config.json`` + ``model.safetensors``, see ``seqblocks.checkpoint``) plus

- ``train_state.pt``: optimizer and scheduler state, RNG states, the data position (the next step;
  batches are a pure function of the step) and the run's configuration;
- ``task.json``: the task name and options; ``tokenizer.json`` for language tasks.

A checkpoint is first written into a hidden temporary directory, flushed to disk, and only then
renamed into place with ``os.replace`` (atomic on POSIX); ``latest`` is replaced the same way after.
A crash at any moment therefore leaves ``latest`` naming a complete checkpoint, and
``load_train_state`` never sees a half-written one. Every temporary name starts with a dot and
holds ``.tmp-`` (``is_temporary``); a failed write removes its own, and the owner of the run
directory removes any a killed process left (``seqblocks.train.rundir``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from seqblocks.checkpoint import atomic_write_text

__all__ = ["CHECKPOINT_DIR", "TRAIN_STATE", "TASK_FILE", "TOKENIZER_FILE", "save_checkpoint", "resolve_checkpoint",
           "latest_checkpoint", "load_train_state", "rng_state", "set_rng_state", "atomic_write_text", "is_temporary"]

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
TRAIN_STATE = "train_state.pt"
TASK_FILE = "task.json"
TOKENIZER_FILE = "tokenizer.json"


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may draw from (python, torch CPU, CUDA when present)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for file in sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of the temporary names the atomic writes here use."""
    return name.startswith(".") and ".tmp-" in name


def save_checkpoint(run_dir: str | os.PathLike, step: int, write_files: Callable[[Path], None],
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically and prune old ones.

    Args:
        run_dir (str | PathLike): the run directory.
        step (int): completed optimizer steps; names the checkpoint ``step_{step:07d}``.
        write_files (Callable[[Path], None]): writes every file of the checkpoint into the directory
            it is given (a temporary one).
        keep (int): how many checkpoints to keep, newest first; 0 keeps all. Default: 2.

    Returns:
        Path: the checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():  # left by an interrupted save
        if is_temporary(stale.name):
            _remove(stale)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        write_files(tmp)
        _fsync_tree(tmp)
        final = root / name
        if final.exists():  # re-saving a step (after a resume): move the old copy out of the way first
            old = root / f".tmp-old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name + "\n")
    if keep > 0:
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None if it has none."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from either itself or a run directory (its latest checkpoint).

    Raises:
        FileNotFoundError: ``path`` is neither, with what was looked for.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint directory (no config.json) nor a run "
                            f"directory with {CHECKPOINT_DIR}/{LATEST}")


def load_train_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``train_state.pt`` of a checkpoint (tensors and plain values only; nothing is unpickled)."""
    path = Path(checkpoint) / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: {str(checkpoint)!r} is not a training checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
