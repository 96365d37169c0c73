"""``convert(src, dst)``: a Hugging Face (or mamba_ssm) model folder to a seqblocks checkpoint, or back.

The direction is read from ``src``'s config.json: a ``model_type`` registered in
``seqblocks.registry.MODELS`` is a seqblocks checkpoint (converted to HF), anything else is imported
(converted to a seqblocks checkpoint). ``to`` overrides the target kind. Tokenizer files travel along.
"""

from __future__ import annotations

from pathlib import Path

import torch

from seqblocks.checkpoint import WEIGHTS_NAME, load_pretrained
from seqblocks.interop._files import as_folder, copy_tokenizer, read_config
from seqblocks.interop.hf import detect_family, from_hf, save_hf
from seqblocks.interop.mamba_ssm import save_mamba_ssm
from seqblocks.registry import MODELS

__all__ = ["convert", "folder_kind", "TARGETS"]

#: What ``convert(..., to=...)`` writes.
TARGETS = ("seqblocks", "hf", "mamba_ssm")


def folder_kind(path: str | Path) -> str:
    """"seqblocks" (a seqblocks checkpoint), "hf" (a supported transformers folder) or "mamba_ssm".

    Raises:
        FileNotFoundError / ValueError: not a model folder, or one of an unsupported family.
    """
    folder = as_folder(path, "convert")
    config = read_config(folder)
    if isinstance(config.get("model_type"), str) and config["model_type"] in MODELS \
            and (folder / WEIGHTS_NAME).is_file() and "architectures" not in config:
        return "seqblocks"
    return "mamba_ssm" if detect_family(config, str(folder / "config.json")) == "mamba_ssm" else "hf"


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, family: str | None = None,
            dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Convert the model folder ``src`` into ``dst``.

    Args:
        src: a seqblocks checkpoint, an HF folder of a supported family, or a mamba_ssm folder.
        dst: the folder to write (created).
        to: "seqblocks", "hf" or "mamba_ssm". Default: None ("hf" for a seqblocks checkpoint, else "seqblocks").
        family: the HF family to write (with ``to="hf"``). Default: None (read from the model).
        dtype: convert the weights to this dtype. Default: None (keep them).
        overwrite: write into a non-empty ``dst``. Default: False.

    Returns:
        Path: ``dst``.

    Raises:
        ValueError: an unknown ``to``, ``dst`` equal to ``src``, a non-empty ``dst`` without
            ``overwrite``, or any reason the model cannot be read or expressed in the target.
    """
    kind = folder_kind(src)
    target = to if to is not None else ("hf" if kind == "seqblocks" else "seqblocks")
    if target not in TARGETS:
        raise ValueError(f"convert: to={to!r}; expected one of {TARGETS}")
    if family is not None and target != "hf":
        raise ValueError(f"convert: family={family!r} applies to to='hf' only (target is {target!r})")
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"convert: the destination {dst} is the source folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ValueError(f"convert: {dst} exists and is not an empty folder (pass overwrite=True / --overwrite)")
    if kind == "seqblocks":
        model = load_pretrained(src, dtype=dtype)
        model.tokenizer_path = str(src)
    else:
        model = from_hf(src, dtype=dtype)
        model.tokenizer_path = str(src)
    dst.mkdir(parents=True, exist_ok=True)
    if target == "seqblocks":
        model.save_pretrained(dst)
        copy_tokenizer(src, dst)
    elif target == "hf":
        save_hf(model, dst, family=family)
    else:
        save_mamba_ssm(model, dst)
    return dst
