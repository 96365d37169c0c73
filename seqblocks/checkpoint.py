"""Checkpoints: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for seqblocks models.

A checkpoint is a directory (or a Hugging Face Hub repository) holding

- ``config.json``: the model's **full** configuration as JSON (every constructor argument,
  ``mixer_kwargs`` included), a ``model_type`` naming the class and a ``torch_dtype``;
- ``model.safetensors``: the weights. Tied weights are stored once.

A sharded training checkpoint (``seqblocks.train.sharded``) holds ``dcp/`` (the shards every rank
wrote with ``torch.distributed.checkpoint``) instead of ``model.safetensors``; it loads the same way,
the shards read back into full tensors by a reader that unpickles nothing but DCP's own index records.

The directory / Hub plumbing is ``huggingface_hub.ModelHubMixin``'s (so ``push_to_hub`` and Hub ids
work); this module only supplies what the mixin leaves to frameworks: how a model turns into files and
back. Loading never unpickles: weights are read with ``safetensors`` only, and a directory that holds
only a pickle (``pytorch_model.bin``) is refused. Loading is strict: a missing, unexpected or
mis-shaped tensor raises ``ValueError`` naming it, and a corrupted file raises ``ValueError`` naming
the file.

A model class takes part by subclassing ``CheckpointMixin`` and implementing ``checkpoint_config()``
(a JSON-able dict) and the classmethod ``from_checkpoint_config(config, device=None, dtype=None)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqblocks._version import __version__
from seqblocks.checkpoint_dcp import METADATA, SHARDED_DIR
from seqblocks.registry import MODELS

try:
    from huggingface_hub import ModelHubMixin, hf_hub_download

    _HUB_ERROR: ImportError | None = None
except ImportError as err:  # a declared dependency; the package still imports without it
    _HUB_ERROR = err

    class ModelHubMixin:  # type: ignore[no-redef]
        """Stand-in used when huggingface_hub is not installed: checkpoints then raise ImportError."""

        def __init_subclass__(cls, **kwargs: Any) -> None:
            super().__init_subclass__()

    hf_hub_download = None  # type: ignore[assignment]

__all__ = ["CheckpointMixin", "WEIGHTS_NAME", "CONFIG_NAME", "SHARDED_DIR", "load_pretrained",
           "load_checkpoint_weights", "atomic_write_text"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth")


def _require_hub() -> None:
    if _HUB_ERROR is not None:
        raise ImportError(
            f"checkpoints need huggingface_hub ({_HUB_ERROR}); install it with `pip install huggingface_hub`"
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"float32"`` / ``"torch.float32"`` / a dtype -> the dtype; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}; expected a name such as 'float32' or 'bfloat16'")
    return dtype


def _shared_keys(model: nn.Module) -> dict[str, str]:
    """{duplicate key: first key} for state-dict entries that are the same tensor (tied weights)."""
    first: dict[int, str] = {}
    dup: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        ident = id(tensor)
        if ident in first:
            dup[key] = first[ident]
        else:
            first[ident] = key
    return dup


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 of one tensor's name, dtype, shape and bytes (hex)."""
    h = hashlib.sha256(f"{name}|{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
    t = tensor.detach().contiguous().cpu()
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys), the ``seqblocks_version`` left out."""
    canonical = {k: v for k, v in config.items() if k != "seqblocks_version"}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def save_weights(model: nn.Module, path: str | os.PathLike, config: dict[str, Any] | None = None) -> None:
    """Write ``model``'s state dict to a safetensors file, each shared tensor once.

    The metadata records a sha256 of every tensor (``seqblocks_tensors``) and, when ``config`` is
    given, of the config it was saved with (``seqblocks_config``), which ``load_weights`` verifies.
    """
    shared = _shared_keys(model)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in shared}
    metadata = {"format": "pt",
                "seqblocks_tensors": json.dumps({k: tensor_digest(k, v) for k, v in tensors.items()}, sort_keys=True)}
    if config is not None:
        metadata["seqblocks_config"] = config_digest(config)
    if shared:
        metadata["tied"] = json.dumps(shared, sort_keys=True)
    import safetensors.torch

    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def _verify(path: str, state: dict[str, torch.Tensor], metadata: dict[str, str], config: dict[str, Any] | None,
            allow_non_finite: bool) -> None:
    """Check the tensors against the digests written at save time, the config against its digest, and
    that every floating-point tensor is finite (unless ``allow_non_finite``)."""
    digests = metadata.get("seqblocks_tensors")
    if digests is not None:
        try:
            expected = json.loads(digests)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: the tensor digests in its metadata are unreadable (corrupted?)") from None
        changed = sorted(k for k, t in state.items() if k in expected and tensor_digest(k, t) != expected[k])
        extra = sorted(set(state) ^ set(expected))
        if changed or extra:
            raise ValueError(f"{path}: the weights are not the ones that were saved (changed since saving: "
                             f"{changed or extra}); the file is corrupted or was edited")
    if config is not None and "seqblocks_config" in metadata and config_digest(config) != metadata["seqblocks_config"]:
        raise ValueError(f"{path}: config.json was changed after these weights were saved with it; the model it "
                         f"describes is not the one that was trained (restore it, or save the model again)")
    if not allow_non_finite:
        bad = sorted(k for k, t in state.items()
                     if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()))
        if bad:
            raise ValueError(f"{path}: tensors {bad} hold NaN or Inf values; pass allow_non_finite=True to load "
                             f"them anyway")


def load_weights(model: nn.Module, path: str | os.PathLike, device: torch.device | str | None = None, *,
                 config: dict[str, Any] | None = None, allow_non_finite: bool = False) -> None:
    """Load a safetensors file into ``model`` strictly (every key, every shape), never unpickling.

    Files written by seqblocks carry a sha256 of every tensor and of the config: both are verified, so
    a flipped bit, a swapped tensor or an edited ``config.json`` is reported instead of loading a
    different function. Files without them (written elsewhere) load unverified.

    Args:
        config (dict | None): the config the weights are loaded with, checked against the saved digest.
        allow_non_finite (bool): accept NaN / Inf weights. Default: False.

    Raises:
        ValueError: the file is not valid safetensors, fails verification, holds non-finite values,
            or its tensors do not match the model's (missing / unexpected keys, wrong shapes).
    """
    import safetensors
    import safetensors.torch

    path = str(path)
    try:
        state = safetensors.torch.load_file(path, device=str(torch.device(device or "cpu")))
        with safetensors.safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # SafetensorError, OSError on truncated headers, ...
        raise ValueError(f"{path} is not a readable safetensors file (corrupted or truncated?): {err}") from None
    _load_state(model, state, path, metadata, config, allow_non_finite)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str, metadata: dict[str, str],
                config: dict[str, Any] | None, allow_non_finite: bool) -> None:
    """Load ``state`` (read from ``path``) into ``model`` strictly: every key, shape and kind of dtype."""
    shared = _shared_keys(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in shared}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {missing}")
        if unexpected:
            parts.append(f"not in the model: {unexpected}")
        if wrong:
            parts.append(f"shape mismatches: {wrong}")
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: " + "; ".join(parts))
    with torch.no_grad():
        for key, param in expected.items():
            if state[key].dtype.is_floating_point != param.dtype.is_floating_point and not (
                state[key].is_complex() and param.is_complex()
            ):
                raise ValueError(f"checkpoint {path}: {key} has dtype {state[key].dtype}, model {param.dtype}")
    _verify(path, state, metadata, config, allow_non_finite)
    model.load_state_dict(state, strict=False)


def _is_sharded(directory: Path) -> bool:
    return not (directory / WEIGHTS_NAME).is_file() and (directory / SHARDED_DIR / METADATA).is_file()


def load_checkpoint_weights(model: nn.Module, directory: str | os.PathLike, device: torch.device | str | None = None,
                            *, config: dict[str, Any] | None = None, allow_non_finite: bool = False) -> None:
    """Load the weights of a checkpoint directory into ``model``: its ``model.safetensors``
    (``load_weights``), or, in a sharded training checkpoint, the model shards of ``dcp/`` put back
    together (``seqblocks.train.sharded.read_model_state``; never unpickling anything but DCP's index
    records). Strict in both cases: every key, every shape.

    Raises:
        FileNotFoundError: neither is there.
        ValueError: ``load_weights``' errors, or an unreadable sharded checkpoint.
    """
    directory = Path(directory)
    if not _is_sharded(directory):
        if not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{directory} holds neither {WEIGHTS_NAME} nor a sharded checkpoint "
                                    f"({SHARDED_DIR}/)")
        load_weights(model, directory / WEIGHTS_NAME, device, config=config, allow_non_finite=allow_non_finite)
        return
    from seqblocks.checkpoint_dcp import read_model_state

    shared = _shared_keys(model)  # a tied tensor is in the shards under each of its names; keep one
    state = {k: v for k, v in read_model_state(directory).items() if k not in shared}
    _load_state(model, state, str(directory / SHARDED_DIR), {}, None, allow_non_finite)


class CheckpointMixin(ModelHubMixin):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` through ``huggingface_hub.ModelHubMixin``.

    Subclasses implement ``checkpoint_config() -> dict`` (JSON values only) and the classmethod
    ``from_checkpoint_config(config, device=None, dtype=None)``.
    """

    def checkpoint_config(self) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} does not define checkpoint_config()")

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> CheckpointMixin:
        raise TypeError(f"{cls.__name__} does not define from_checkpoint_config()")

    def full_checkpoint_config(self) -> dict[str, Any]:
        """``checkpoint_config()`` plus ``model_type``, ``torch_dtype`` and the library version."""
        config = dict(self.checkpoint_config())
        params = list(self.parameters())  # type: ignore[attr-defined]
        dtype = params[0].dtype if params else torch.get_default_dtype()
        if type(self).__name__ not in MODELS or MODELS.get(type(self).__name__) is not type(self):
            raise ValueError(f"{type(self).__name__} is not in the model registry, so a checkpoint of it could not "
                             f"be loaded; register it with seqblocks.registry.model_registry.register(name)")
        config.update(model_type=type(self).__name__, torch_dtype=dtype_name(dtype), seqblocks_version=__version__)
        try:
            json.dumps(config)
        except TypeError as err:
            raise ValueError(
                f"{type(self).__name__}: the config cannot be written as JSON ({err}); constructor arguments "
                f"such as mixer_kwargs must hold JSON values (numbers, strings, lists, dicts)"
            ) from None
        return config

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> str | None:
        """Write ``config.json``, ``model.safetensors`` and a model card into ``save_directory``.

        Keyword arguments go to ``huggingface_hub.ModelHubMixin.save_pretrained`` (``push_to_hub``,
        ``repo_id``, ...). Returns the commit URL when pushing, else None.
        """
        _require_hub()
        return super().save_pretrained(save_directory, **kwargs)

    def generate_model_card(self, *args: Any, training: dict[str, Any] | None = None, **kwargs: Any):
        """The ``README.md`` that ``save_pretrained`` writes: architecture, layer pattern and parameter
        count read from the model, and ``training`` (what ``seqblocks train`` records; see
        ``seqblocks.model_card.model_card_markdown``) when given through ``model_card_kwargs``."""
        from huggingface_hub import ModelCard

        from seqblocks.model_card import model_card_markdown

        metadata = self._hub_mixin_info.model_card_data.to_yaml()
        body = model_card_markdown(self, self.full_checkpoint_config(), training)  # type: ignore[arg-type]
        return ModelCard(f"---\n{metadata}\n---\n\n{body}")

    def _save_pretrained(self, save_directory: Path) -> None:
        config = self.full_checkpoint_config()
        save_weights(self, Path(save_directory) / WEIGHTS_NAME, config=config)  # type: ignore[arg-type]
        (Path(save_directory) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None, torch_dtype: torch.dtype | str | None = None,
                        allow_non_finite: bool = False, **hub_kwargs: Any):
        """Rebuild a model from a directory written by ``save_pretrained`` or a Hub repository id.

        Args:
            pretrained_model_name_or_path (str | Path): a local directory or a Hub id ("user/name").
            device (torch.device | str | None): where to place the model. Default: None (CPU).
            dtype (torch.dtype | str | None): parameter dtype, a ``torch.dtype`` or its name ("bfloat16");
                "auto" or None keep the dtype it was saved in. Default: None.
            torch_dtype (torch.dtype | str | None): the same, under the name the ``transformers`` API
                uses; give one of the two. Default: None.
            allow_non_finite (bool): load weights that hold NaN / Inf. Default: False.
            **hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``force_download``, ``local_files_only``.

        The config is validated (names, types, finite values, size limits) before any module is built,
        and every constructor's range checks run on the meta device (allocating nothing) before the weights
        are read; the weights are checked against the digests written at save time (tensors and config).

        Raises:
            FileNotFoundError: a local path that does not exist (at once: the Hub is asked only for
                names shaped like a repository id, and never in offline mode), or a directory
                without the files.
            ValueError: unreadable ``config.json`` / weights, a config of another model class, weights
                that do not match the config, a failed integrity check, non-finite weights, or an
                unknown dtype name.
            TypeError: ``dtype`` and ``torch_dtype`` both given, and different.
        """
        _require_hub()
        dtype = _requested_dtype(dtype, torch_dtype)
        unknown = sorted(set(hub_kwargs) - {"revision", "token", "cache_dir", "force_download", "local_files_only"})
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected arguments {unknown}; the model's "
                            f"configuration comes from config.json")
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            _check_local_dir(Path(path))
        else:
            _check_hub_name(path, f"{cls.__name__}.from_pretrained")
        return super().from_pretrained(path, device=device, dtype=dtype, allow_non_finite=allow_non_finite,
                                       **hub_kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: Any, force_download: bool,
                         local_files_only: bool, token: Any, config: dict[str, Any] | None = None,
                         device=None, dtype=None, allow_non_finite: bool = False, **model_kwargs: Any):
        if not isinstance(config, dict):
            raise FileNotFoundError(f"{cls.__name__}.from_pretrained: no {CONFIG_NAME} found for {model_id!r}")
        # The mixin copies config values named like constructor arguments into model_kwargs; anything
        # else there was passed by the caller, which from_pretrained has already refused.
        stray = sorted(k for k, v in model_kwargs.items() if config.get(k, object()) != v)
        if stray:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected arguments {stray}")
        model_type = config.get("model_type")
        if model_class(config, model_id) is not cls:
            raise ValueError(f"{model_id}: config.json describes a {model_type!r}, not a {cls.__name__!r}; "
                             f"load it with seqblocks.checkpoint.load_pretrained or that class")
        params = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype", "seqblocks_version")}
        dtype = dtype if dtype is not None else parse_dtype(config.get("torch_dtype"))
        # Validate everything first: the config's names, types and size limits, then every constructor's
        # range checks on the meta device, which allocates nothing, before weights are fetched or read.
        with torch.device("meta"):
            cls.from_checkpoint_config(params, dtype=dtype)
        if os.path.isdir(model_id) and _is_sharded(Path(model_id)):  # a sharded training checkpoint
            model = cls.from_checkpoint_config(params, device=device, dtype=dtype)
            load_checkpoint_weights(model, model_id, device=device, allow_non_finite=allow_non_finite)
            model.eval()
            return model
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
        else:
            weights = hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision,
                                      cache_dir=cache_dir, force_download=force_download, token=token,
                                      local_files_only=local_files_only)
        model = cls.from_checkpoint_config(params, device=device, dtype=dtype)
        load_weights(model, weights, device=device, config=config, allow_non_finite=allow_non_finite)
        model.eval()
        return model


_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _check_hub_name(path: str, owner: str) -> None:
    """Refuse at once, with ``FileNotFoundError``, a name that is not a local directory and that the Hub
    must not be asked for: one not shaped like a repository id ("name" or "owner/name"), one whose first
    component is a local directory or file (a local path that is missing), or any name in offline mode."""
    first = path.split("/")[0]
    if (os.path.exists(path) or not _REPO_ID.fullmatch(path) or ".." in path or path.endswith((".json", ".safetensors"))
            or ("/" in path and os.path.exists(first))):
        raise FileNotFoundError(f"{owner}: {path!r} is not a checkpoint directory (no such directory)")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{owner}: {path!r} is not a local directory, and the Hub is not asked in offline "
                                f"mode (HF_HUB_OFFLINE is set)")


def _requested_dtype(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``from_pretrained``'s ``dtype`` / ``torch_dtype`` (one name for one thing) -> a dtype or None."""
    values = []
    for keyword, value in (("dtype", dtype), ("torch_dtype", torch_dtype)):
        if value is None or value == "auto":
            continue
        if not isinstance(value, torch.dtype | str):
            raise TypeError(f"from_pretrained: {keyword}={value!r} must be a torch.dtype, a dtype name or 'auto'")
        parsed = parse_dtype(value)
        if not parsed.is_floating_point:
            raise ValueError(f"from_pretrained: {keyword}={value!r} is not a floating-point dtype")
        values.append(parsed)
    if len(values) == 2 and values[0] != values[1]:
        raise TypeError(f"from_pretrained: dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one")
    return values[0] if values else None


def _check_local_dir(path: Path) -> None:
    config = path / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"{path} holds no {CONFIG_NAME}; it is not a seqblocks checkpoint")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON (corrupted?): {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config} must hold a JSON object, got {type(data).__name__}")
    if not (path / WEIGHTS_NAME).is_file() and not _is_sharded(path):
        pickles = [n for n in _PICKLE_NAMES if (path / n).is_file()]
        extra = f" (found {pickles}: seqblocks never unpickles weights)" if pickles else ""
        raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME}{extra}")


def load_pretrained(pretrained_model_name_or_path: str | Path, *, device=None, dtype=None, torch_dtype=None,
                    allow_non_finite: bool = False, **hub_kwargs: Any):
    """Load any seqblocks model from a checkpoint, choosing the class from ``config.json``'s ``model_type``.

    ``device``, ``dtype`` / ``torch_dtype``, ``allow_non_finite`` and ``hub_kwargs`` are
    ``CheckpointMixin.from_pretrained``'s.
    """
    _require_hub()
    dtype = _requested_dtype(dtype, torch_dtype)
    path = str(pretrained_model_name_or_path)
    if os.path.isdir(path):
        _check_local_dir(Path(path))
        config = json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8"))
    else:
        _check_hub_name(path, "load_pretrained")
        config_file = hf_hub_download(repo_id=path, filename=CONFIG_NAME, **hub_kwargs)
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    return model_class(config, path).from_pretrained(path, device=device, dtype=dtype,
                                                     allow_non_finite=allow_non_finite, **hub_kwargs)


def model_class(config: dict[str, Any], source: str) -> type:
    """The class a checkpoint config's ``model_type`` names, found **only** in the model registry
    (``seqblocks.registry.MODELS``: the built-in models and those registered in this process).

    Nothing named in a checkpoint is ever imported: a ``model_type`` that is not a registered name
    (a module path, a class path, anything else) is refused with ``ValueError``.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODELS:
        raise ValueError(f"{source}: config.json names model_type {model_type!r}, which is not a registered "
                         f"seqblocks model; registered: {MODELS.keys()} (checkpoints never import code)")
    return MODELS.get(model_type)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a temporary file, flushed to disk, renamed into place.

    Readers see the old content or the new, never a part. The temporary file is removed when the
    write fails (a full disk, a read-only directory); the original is then untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
