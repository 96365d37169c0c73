"""Reading and writing the files of a model folder: config.json, weights (safetensors, sharded
safetensors, or a plain-tensor ``.bin`` read with ``torch.load(weights_only=True)``), tokenizer files.

Nothing here unpickles arbitrary objects or imports anything a file names.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_config", "read_weights", "write_weights", "TOKENIZER_FILES", "tokenizer_files", "copy_tokenizer",
           "load_tokenizer"]

#: Files of a tokenizer (and the generation defaults) that travel with a converted model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN = "pytorch_model.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"


def as_folder(path: str | Path, owner: str) -> Path:
    """``path`` as a local folder, or ``FileNotFoundError`` / ``NotADirectoryError`` naming it."""
    if not isinstance(path, str | Path):
        raise TypeError(f"{owner}: path must be a str or Path, got {type(path).__name__}")
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{owner}: {str(folder)!r} does not exist (a local model folder is expected)")
    if not folder.is_dir():
        raise NotADirectoryError(f"{owner}: {str(folder)!r} is not a folder (a model folder with config.json is "
                                 f"expected)")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict.

    Raises:
        FileNotFoundError: no config.json.
        ValueError: config.json is not a JSON object.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; it is not a model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path} could not be read as plain tensors (torch.load with weights_only=True refused or "
                         f"failed: {type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} must hold a dict of named tensors, got {type(state).__name__}")
    return state


def _shards(folder: Path, index_name: str) -> list[Path]:
    index = folder / index_name
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        files = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index} is not a weight index (a JSON object with a 'weight_map'): {err}") from None
    paths = []
    for name in files:
        if not isinstance(name, str) or Path(name).name != name:
            raise ValueError(f"{index}: shard name {name!r} must be a plain file name in the same folder")
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{index} names the shard {name}, which is not in {folder}")
        paths.append(folder / name)
    return paths


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weights, by name, on the CPU.

    Looks for, in order: model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin,
    pytorch_model.bin.index.json. ``.bin`` files are read with ``torch.load(weights_only=True)``: plain
    tensors only, never a pickled object.

    Raises:
        FileNotFoundError: none of those files, or a shard an index names is missing.
        ValueError: a damaged file, a tensor in two shards.
    """
    if (folder / _SAFETENSORS).is_file():
        return _read_safetensors(folder / _SAFETENSORS)
    if (folder / _SAFETENSORS_INDEX).is_file():
        files, reader = _shards(folder, _SAFETENSORS_INDEX), _read_safetensors
    elif (folder / _BIN).is_file():
        return _read_bin(folder / _BIN)
    elif (folder / _BIN_INDEX).is_file():
        files, reader = _shards(folder, _BIN_INDEX), _read_bin
    else:
        raise FileNotFoundError(f"{folder} holds no weights: expected one of {_SAFETENSORS}, {_SAFETENSORS_INDEX}, "
                                f"{_BIN}, {_BIN_INDEX}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        part = reader(path)
        twice = sorted(set(part) & set(state))
        if twice:
            raise ValueError(f"{path}: tensors {twice[:5]} are also in another shard")
        state.update(part)
    return state


def write_weights(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """``folder/model.safetensors`` (contiguous, unshared copies of ``tensors``)."""
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, str(folder / _SAFETENSORS), metadata={"format": "pt"})


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer / generation files present in ``folder``."""
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy ``src``'s tokenizer files into ``dst``; returns the names copied."""
    names = []
    for path in tokenizer_files(src):
        if path.resolve() != (dst / path.name).resolve():
            shutil.copyfile(path, dst / path.name)
        names.append(path.name)
    return names


def load_tokenizer(folder: Path) -> Any:
    """``folder/tokenizer.json`` as a ``tokenizers.Tokenizer`` when the file and the ``tokenizers``
    package (the ``hf`` extra) are both present; else None."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        import tokenizers
    except ImportError:
        return None
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers package raises a bare Exception for a malformed file
        raise ValueError(f"{path} is not a readable tokenizer file ({err})") from None


def finite_or_none(value: Any) -> float | None:
    """A JSON bound as a float, with infinity (and None) as None. transformers >= 5 writes
    non-finite floats as ``{"__float__": "Infinity"}``."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    value = float(value)
    return None if math.isinf(value) else value
