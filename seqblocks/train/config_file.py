"""A run in one file: TOML (or YAML), sections mapped onto the model config and ``TrainConfig``.

::

    [model]                 # a preset and/or LRNNLMHeadModel arguments (these override the preset's)
    preset = "tiny"
    d_model = 128

    [data]                  # what to train on
    path = "data/"          # prepared shards, or text sources (a string or a list) prepared first
    seq_len = 128
    val_fraction = 0.01     # used when the sources are prepared
    pack_boundaries = false

    [tokenizer]
    name = "char"           # or gpt2, cl100k_base, tiktoken:FILE, a tokenizer .json

    [optim]                 # lr, weight_decay, beta1, beta2, grad_clip
    [schedule]              # steps, warmup_steps, min_lr_ratio
    [train]                 # batch_size, grad_accum, seed, precision, compile, compile_backend, device
    [parallel]              # strategy ("ddp" / "fsdp"); FSDP2: param_dtype, reduce_dtype, reshard_after_forward
    [eval]                  # every, batch_size
    [checkpoint]            # every, keep, format ("auto" / "full" / "sharded")
    [log]                   # every, tensorboard, wandb, peak_flops
    [sample]                # tokens, prompt, temperature

Every key is checked: an unknown section or key, or a value of the wrong type, raises ``ValueError``
naming the dotted field (``optim.lr``), the file and what is expected. Command-line overrides use the
same dotted names (``--optim.lr 3e-4``, ``--model.d_model 256``) and win over the file.

``data.task`` picks one of the embedded tasks instead of your own data (``data.options`` then holds
its options). TOML is read with ``tomllib`` (Python 3.11+) or ``tomli``; YAML needs PyYAML.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any

__all__ = ["RunSpec", "load_run_file", "parse_overrides", "resolve_run", "TRAIN_FIELDS", "DATA_KEYS"]

# section.key -> TrainConfig field
TRAIN_FIELDS = {
    "optim.lr": "lr", "optim.weight_decay": "weight_decay", "optim.beta1": "beta1", "optim.beta2": "beta2",
    "optim.grad_clip": "grad_clip",
    "schedule.steps": "steps", "schedule.warmup_steps": "warmup_steps", "schedule.min_lr_ratio": "min_lr_ratio",
    "train.batch_size": "batch_size", "train.grad_accum": "grad_accum", "train.seed": "seed",
    "train.precision": "precision", "train.compile": "compile", "train.compile_backend": "compile_backend",
    "train.device": "device",
    "parallel.strategy": "parallel", "parallel.param_dtype": "fsdp_param_dtype",
    "parallel.reduce_dtype": "fsdp_reduce_dtype", "parallel.reshard_after_forward": "fsdp_reshard_after_forward",
    "eval.every": "eval_every", "eval.batch_size": "eval_batch_size",
    "checkpoint.every": "ckpt_every", "checkpoint.keep": "keep_checkpoints", "checkpoint.format": "checkpoint_format",
    "log.every": "log_every", "log.tensorboard": "tensorboard", "log.wandb": "wandb", "log.peak_flops": "peak_flops",
    "sample.tokens": "sample_tokens", "sample.prompt": "sample_prompt", "sample.temperature": "sample_temperature",
    "data.pack_boundaries": "pack_boundaries",
}
# data.key -> its type and what it is for
DATA_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "path": ((str, list), "prepared shards, or text sources to prepare"),
    "task": ((str,), "an embedded task instead of your own data"),
    "options": ((dict,), "options of data.task"),
    "seq_len": ((int,), "tokens per row"),
    "mask_boundaries": ((bool,), "no loss across document boundaries"),
    "eval_examples": ((int,), "held-out rows"),
    "val_fraction": ((int, float), "held-out share of documents (prepare)"),
    "text_field": ((str,), "text field of JSONL / table sources (prepare)"),
    "workers": ((int,), "encoding processes (prepare)"),
    "shard_tokens": ((int,), "tokens per shard file (prepare)"),
}
_SECTIONS = sorted({k.split(".")[0] for k in TRAIN_FIELDS} | {"model", "data", "tokenizer"})


@dataclasses.dataclass
class RunSpec:
    """A run file, resolved.

    Attributes:
        model (dict): ``LRNNLMHeadModel`` arguments (the preset's, overridden).
        train (dict): ``TrainConfig`` values (the preset's ``train`` section, overridden); a
            ``TrainConfig`` is built from them after the command line's own flags.
        data (dict): the ``[data]`` section's prepare options (``path``, ``val_fraction``, ...).
        tokenizer (str | None): ``tokenizer.name``.
        source (str): where it came from, for messages.
    """

    model: dict[str, Any]
    train: dict[str, Any]
    data: dict[str, Any]
    tokenizer: str | None
    source: str


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"run file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        from seqblocks.tokenizers import missing_extra

        try:
            import yaml
        except ImportError:
            raise missing_extra("yaml") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"run file {path} is not valid YAML: {err}") from None
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            from seqblocks.tokenizers import missing_extra

            try:
                import tomli as tomllib
            except ImportError:
                raise missing_extra("tomli") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"run file {path} is not valid TOML: {err}") from None
    else:
        raise ValueError(f"run file {path}: expected a .toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ValueError(f"run file {path}: expected sections ([model], [data], ...), got a {type(data).__name__}")
    return data


def _value(text: str) -> Any:
    """A command-line value as TOML would read it: numbers, true / false, lists, quoted strings; else a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError):
            continue
    return text


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["--optim.lr", "3e-4", "--log.tensorboard=true"]`` -> ``{"optim.lr": 0.0003, "log.tensorboard": True}``.

    Raises:
        ValueError: a flag without a value, or a name without a section.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(pairs):
        flag = pairs[i]
        name, sep, value = flag[2:].partition("=")
        if not flag.startswith("--") or "." not in name:
            raise ValueError(f"{flag!r}: overrides look like --section.key VALUE (e.g. --optim.lr 3e-4)")
        if not sep:
            if i + 1 >= len(pairs):
                raise ValueError(f"{flag} needs a value")
            value, i = pairs[i + 1], i + 1
        out[name.replace("-", "_")] = _value(value)
        i += 1
    return out


def is_override(arg: str) -> bool:
    """Whether a command-line word is a dotted override flag (``--optim.lr``, ``--model.d_model=64``)."""
    return arg.startswith("--") and "." in arg[2:].partition("=")[0] and not arg[2:3].isdigit()


def load_run_file(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> RunSpec:
    """Read a run file, apply dotted ``overrides`` and resolve it (see ``resolve_run``)."""
    path = Path(path)
    return resolve_run(_read(path), overrides or {}, f"run file {path}")


def _flatten(data: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if section not in _SECTIONS:
            raise ValueError(f"{source}: unknown section [{section}]; valid sections: {_SECTIONS}")
        if not isinstance(body, dict):
            raise ValueError(f"{source}: [{section}] must be a table of keys, got {body!r}")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def _check_type(field: str, value: Any, accepted: tuple[type, ...], source: str, what: str = "") -> None:
    ok = isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
    if not ok:
        words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
                 dict: "a table"}
        kinds = " or ".join(dict.fromkeys(words[t] for t in accepted if not (t is int and float in accepted)))
        raise ValueError(f"{source}: {field} = {value!r} must be {kinds}{f' ({what})' if what else ''}")


def resolve_run(data: dict[str, Any], overrides: dict[str, Any], source: str = "run") -> RunSpec:
    """Map a run's sections (and dotted overrides) onto the model config and ``TrainConfig`` values.

    Raises:
        ValueError: an unknown section or key, or a value of the wrong type, named by its dotted field;
            the model's own errors are prefixed with ``source``.
    """
    from seqblocks.presets import DEFAULT_PRESET, load_config, model_kwargs
    from seqblocks.train.config import TrainConfig

    flat = _flatten(data, source)
    for key in overrides:
        if key.split(".")[0] not in _SECTIONS:
            raise ValueError(f"--{key}: unknown section {key.split('.')[0]!r}; valid sections: {_SECTIONS}")
    flat.update(overrides)
    hints = typing.get_type_hints(TrainConfig)
    model_keys = {k[6:]: v for k, v in flat.items() if k.startswith("model.")}
    preset = model_keys.pop("preset", None)
    if preset is not None:
        _check_type("model.preset", preset, (str,), source)
    base = load_config(preset or DEFAULT_PRESET)
    model = model_kwargs({**base["model"], **model_keys}, f"{source} [model]") if model_keys else dict(base["model"])
    train = dict(base["train"])
    data_opts: dict[str, Any] = {}
    tokenizer = None
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section == "model":
            continue
        if key in TRAIN_FIELDS:
            field = TRAIN_FIELDS[key]
            accepted = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}[hints[field]]
            _check_type(key, value, accepted, source, f"TrainConfig.{field}")
            train[field] = value
        elif section == "tokenizer":
            if name != "name":
                raise ValueError(f"{source}: unknown key {key}; [tokenizer] has one key, name")
            _check_type(key, value, (str,), source)
            tokenizer = value
        elif section == "data" and name in DATA_KEYS:
            _check_type(key, value, DATA_KEYS[name][0], source, DATA_KEYS[name][1])
            data_opts[name] = value
        else:
            valid = sorted([k.partition(".")[2] for k in TRAIN_FIELDS if k.startswith(section + ".")] +
                           (list(DATA_KEYS) if section == "data" else []))
            raise ValueError(f"{source}: unknown key {key}; valid keys in [{section}]: {valid}")
    if "task" in data_opts:
        if "path" in data_opts:
            raise ValueError(f"{source}: give data.path (your data) or data.task (an embedded task), not both")
        train["task"], train["task_options"] = data_opts.pop("task"), dict(data_opts.pop("options", {}))
    elif "options" in data_opts:
        raise ValueError(f"{source}: data.options are the options of data.task; set data.task too")
    task_keys = ("seq_len", "mask_boundaries", "eval_examples")
    if "path" in data_opts or train.get("task") == "shards":
        seq_len = train.get("task_options", {}).get("seq_len")
        train["task"] = "shards"
        train["task_options"] = {k: v for k, v in {"seq_len": seq_len, **train.get("task_options", {})}.items()
                                 if k in task_keys and v is not None}
    for key in task_keys:
        if key in data_opts:
            train.setdefault("task_options", {})
            train["task_options"] = {**train["task_options"], key: data_opts.pop(key)}
    _check_train_values(train, source)
    return RunSpec(model=model, train=train, data=data_opts, tokenizer=tokenizer, source=source)


def _check_train_values(train: dict[str, Any], source: str) -> None:
    """Build the TrainConfig once (its checks of ranges), naming the dotted field on an error."""
    from seqblocks.train.config import TrainConfig

    probe = {k: v for k, v in train.items() if k != "task_options"}
    try:
        TrainConfig.from_dict({**probe, "task_options": {}})
    except (ValueError, TypeError) as err:
        message = str(err)
        for dotted, field in TRAIN_FIELDS.items():
            if f"TrainConfig.{field}=" in message or f"TrainConfig.{field} " in message:
                message = message.replace(f"TrainConfig.{field}", f"{dotted} (TrainConfig.{field})", 1)
                break
        raise ValueError(f"{source}: {message}") from None
