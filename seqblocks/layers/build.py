"""The one place that turns names and configs into mixer modules.

Two steps, both explicit:

1. ``mixer_config(name, d_model, d_state=..., kwargs=...)``: the layer's config - the mixer's own
   frozen config dataclass (``Mixer.config_class()``), or a ``BlockConfig`` for the
   attention classes built as ``cls(config)``. Model-level values fill the fields the config has
   (``d_state``, a head count, ``causal``); ``kwargs`` win. An unknown key raises ``ValueError`` naming
   the key, the mixer and its accepted keys.
2. ``build_mixer(name, config, layer_idx=..., device=..., dtype=...)``: the module.

``resolve_mixer_kwargs`` reads the two forms of a hybrid model's ``mixer_kwargs`` (per mixer type, or
one dict for all mixers) into per-layer dicts.

Shapes: D width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from seqblocks.config import BlockConfig, ConfigBase
from seqblocks.layers.mixer import AttentionBase, Mixer, MixerConfig
from seqblocks.registry import MIXERS

__all__ = ["default_num_heads", "mixer_class", "is_block_config_mixer", "accepted_keys", "mixer_config",
           "build_mixer", "resolve_mixer_kwargs"]

_HEAD_FIELDS = ("num_heads", "n_heads")


def default_num_heads(d_model: int) -> int:
    """Heads given to attention mixers whose kwargs name none: the largest divisor of ``d_model`` not
    above ``max(1, d_model // 64)`` (head width 64 where d_model allows)."""
    heads = max(1, d_model // 64)
    while d_model % heads:
        heads -= 1
    return heads


def mixer_class(name_or_cls: Any) -> type:
    """The class registered under ``name_or_cls`` (case-insensitive), or the class itself."""
    if isinstance(name_or_cls, str):
        return MIXERS.get(name_or_cls)
    if isinstance(name_or_cls, type) and issubclass(name_or_cls, nn.Module):
        return name_or_cls
    raise TypeError(f"a mixer is a registered name or an nn.Module class, got {name_or_cls!r}")


def is_block_config_mixer(cls: type) -> bool:
    """Classes of the ``BlockConfig`` convention (``AttentionBase`` subclasses, or any registered class that is not a
    ``Mixer``) are built as ``cls(config)`` from a ``BlockConfig``."""
    return issubclass(cls, AttentionBase) or not issubclass(cls, Mixer)


def accepted_keys(cls: type) -> tuple[str, ...]:
    """The keys a layer of mixer ``cls`` takes in ``mixer_kwargs``."""
    if is_block_config_mixer(cls):
        return (*BlockConfig.field_names(), "num_heads")
    return cls.config_class().field_names()[1:]


def mixer_config(name_or_cls: Any, d_model: int, *, d_state: int | None = None,
                 kwargs: dict[str, Any] | None = None, causal: bool = True) -> ConfigBase:
    """The config of one layer of mixer ``name_or_cls`` with width ``d_model``.

    ``d_state`` fills a ``d_state`` field; a head-count field whose default is None (or that has no
    default) gets ``default_num_heads(d_model)``; ``causal=True`` fills a ``causal`` field. ``kwargs``
    win over all of them.

    Raises:
        ValueError: an unknown mixer name, an unknown key in ``kwargs`` (naming the mixer and its
            accepted keys), or ``causal=True`` with ``causal=False`` in ``kwargs``.
    """
    cls = mixer_class(name_or_cls)
    label = name_or_cls if isinstance(name_or_cls, str) else cls.__name__
    kw = dict(kwargs or {})
    if causal and kw.get("causal", True) is False:
        raise ValueError(f"mixer {label!r}: causal=False is not allowed in a causal model")
    if is_block_config_mixer(cls):
        values: dict[str, Any] = {"attention": label if isinstance(name_or_cls, str) else "mha", "d_model": d_model}
        if d_state is not None:
            values["d_state"] = d_state
        extra = {}
        for key, value in kw.items():
            if key in _HEAD_FIELDS:
                values["n_heads"] = value
            elif key in BlockConfig.field_names():
                values[key] = value
            else:
                extra[key] = value
        values.setdefault("n_heads", default_num_heads(d_model))
        values["mixer_kwargs"] = {**values.get("mixer_kwargs", {}), **extra}
        return BlockConfig(**values)
    config_cls = cls.config_class()
    names = config_cls.field_names()
    unknown = sorted(set(kw) - set(names[1:]))
    if unknown:
        raise ValueError(f"mixer {label!r} ({cls.__name__}): unknown keys {unknown}; accepted keys: "
                         f"{sorted(names[1:])}")
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    values = {names[0]: d_model}
    if d_state is not None and "d_state" in names:
        values["d_state"] = d_state
    for field in _HEAD_FIELDS:
        if field in names and defaults[field] in (None, dataclasses.MISSING):
            values[field] = default_num_heads(d_model)
    if causal and "causal" in names:
        values["causal"] = True
    values.update(kw)
    return config_cls(**values)


def build_mixer(name_or_cls: Any, config: ConfigBase, *, layer_idx: int | None = None, device=None, dtype=None,
                causal: bool = True) -> nn.Module:
    """Construct one mixer from the config ``mixer_config`` made.

    Raises:
        ValueError: ``causal=True`` and the built mixer is not causal.
        TypeError: the config is not the mixer's.
    """
    cls = mixer_class(name_or_cls)
    label = name_or_cls if isinstance(name_or_cls, str) else cls.__name__
    if is_block_config_mixer(cls):
        if not isinstance(config, BlockConfig):
            raise TypeError(f"mixer {label!r} is built from a BlockConfig, got {type(config).__name__}")
        module = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        module.to(device=device, dtype=dtype)
    else:
        if not isinstance(config, MixerConfig):
            raise TypeError(f"mixer {label!r} is built from a {cls.config_class().__name__}, got "
                            f"{type(config).__name__}")
        module = cls.build(config, layer_idx=layer_idx, device=device, dtype=dtype)
    if causal and getattr(module, "causal", True) is False:
        raise ValueError(f"mixer {label!r} (layer {layer_idx}) is not causal; a language model needs causal mixers")
    return module


def resolve_mixer_kwargs(mixer_types: Sequence[Any], mixer_kwargs: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per-layer constructor kwargs from a hybrid model's ``mixer_kwargs``.

    Two forms: a dict keyed by mixer type (``{"S5": {...}, "attn": {...}}``; keys case-insensitive, and
    an alias such as "mha" serves "attn" layers), or one dict for all mixers, of which each mixer gets
    the keys its config has. Mixing the forms, or a global key no mixer takes, raises ``ValueError``.
    """
    n = len(mixer_types)
    if mixer_kwargs is None:
        return [{} for _ in range(n)]
    if not isinstance(mixer_kwargs, dict):
        raise TypeError(f"mixer_kwargs must be a dict or None, got {type(mixer_kwargs).__name__}")
    classes = [mixer_class(t) for t in mixer_types]
    per_type = {k: v for k, v in mixer_kwargs.items() if isinstance(k, str) and k in MIXERS and isinstance(v, dict)}
    if per_type:
        others = sorted(set(mixer_kwargs) - set(per_type))
        if others:
            raise ValueError(f"mixer_kwargs mixes per-type entries {sorted(per_type)} with other keys {others}; "
                             f"use either {{mixer_type: kwargs}} or one kwargs dict for all mixers")
        by_name = {k.strip().lower(): v for k, v in per_type.items()}
        out = []
        for t, cls in zip(mixer_types, classes):
            if isinstance(t, str) and t.strip().lower() in by_name:
                out.append(dict(by_name[t.strip().lower()]))
                continue
            alias = [v for k, v in by_name.items() if MIXERS.get(k) is cls]
            out.append(dict(alias[0]) if alias else {})
        return out
    out = []
    used: set[str] = set()
    for cls in classes:
        keys = set(accepted_keys(cls))
        taken = {k: v for k, v in mixer_kwargs.items() if k in keys}
        used.update(taken)
        out.append(taken)
    unused = sorted(set(mixer_kwargs) - used)
    if unused:
        names = sorted({getattr(c, "__name__", str(c)) for c in classes})
        raise ValueError(f"mixer_kwargs keys {unused} are accepted by none of the mixers {names}")
    return out
