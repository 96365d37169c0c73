"""The one mixer contract, and each mixer's config.

A mixer is an ``nn.Module`` subclass of ``Mixer`` that maps ``x`` [B, T, D] to ``y`` [B, T, D]:

- ``forward(x, cache=None, *, <declared inputs>) -> y``. Without a cache: a full-sequence pass. With
  a cache: continue the sequence the cache holds (a prefill when T > 1, a decode step when T = 1),
  updating the cache **in place**, so splitting a sequence into cached calls gives the full pass's
  outputs. In-place (rather than returning a new state) keeps every cache a static buffer that a
  CUDA graph can capture.
- ``inputs``: class data naming the optional keyword inputs ``forward`` consumes, a subset of
  ``MIXER_INPUTS`` (``lengths`` [B], ``integration_timesteps`` [B, T], ``position_ids``, ``mask``,
  ``cu_seqlens``). Blocks and models route each input to exactly the mixers that declare it; giving a
  mixer one it does not declare raises ``TypeError``. One exception: ``cu_seqlens`` (documents packed
  in a batch of one) reaches every mixer that declares ``lengths`` too; ``run_mixer`` unpacks the
  documents into a right-padded batch for those that do not run packed input natively
  (``seqblocks.layers.packing``).
- ``allocate_inference_cache(batch_size, max_seqlen, dtype=None) -> Cache``: a preallocated,
  static-shape cache (``seqblocks.cache``).
- ``step(x, cache)``: the T = 1 case of ``forward``.

Configs. Every mixer has a frozen, keyword-only config dataclass, ``cls.config_class()``, whose fields
are the constructor's arguments with the constructor's defaults (placement - ``device``, ``dtype``,
``layer_idx`` - excluded). It is derived once from the constructor, so the constructor signature (the
one the documented arguments spell) stays the single source of every default and the two cannot drift.
``cls.build(config)`` constructs the mixer from it; an unknown key raises ``ValueError`` naming it,
the mixer and the accepted keys.

A user's own mixer plugs in with one registration and no change to library code::

    @mixer_registry.register("my_mixer")
    class MyMixer(Mixer):
        inputs = frozenset({"lengths"})
        def __init__(self, d_model: int, d_state: int = 16, layer_idx=None, device=None, dtype=None): ...
        def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None): ...
        def forward(self, x, cache=None, *, lengths=None): ...

Adapters for other calling conventions live in one place, ``seqblocks.layers.adapters``.

Context parallelism (``seqblocks.parallel``). Under ``with context_parallel(group):`` each rank holds
one time chunk ``x`` [B, T_local, D] of every row and a mixer returns the local chunk of the
full-sequence outputs. A mixer whose class sets ``context_parallel = "native"`` does that itself
(exchanging what crosses chunk boundaries: attention's keys and values, a scan's states). Every other
mixer is served by ``run_mixer``'s fallback, ``run_gathered``: the chunks are gathered into the whole
sequence (``gather_time``), the mixer runs on it as one process would (``using_context_parallel(None)``
inside), and the rank keeps its own chunk of the outputs. Exact for every mixer, differentiable (the
gather's backward returns each rank its chunk's cotangent), but memory and compute O(T) per rank.
Per-token inputs (``integration_timesteps``, ``position_ids``, a [B, T_local] bool key-padding
``mask``) are gathered with ``x``; ``lengths`` [B] and ``cu_seqlens`` describe the whole sequence and
are the same on every rank. A cache under context parallelism raises ``ValueError``: decoding runs
outside it.

Shapes: B batch, T time, D width.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from seqblocks.cache import Cache
from seqblocks.config import BlockConfig, ConfigBase
from seqblocks.layers.checks import check_allocation, check_cache, check_input, check_lengths, check_positive
from seqblocks.layers.packing import run_unpacked
from seqblocks.ops._backend import prefer_backend
from seqblocks.parallel.attention import gather_token_masks
from seqblocks.parallel.context import (
    ContextParallel,
    current_context_parallel,
    gather_time,
    local_chunk,
    using_context_parallel,
)
from seqblocks.registry import MIXERS

#: Every optional keyword input a mixer may declare in ``Mixer.inputs``.
MIXER_INPUTS = frozenset({"lengths", "integration_timesteps", "position_ids", "mask", "cu_seqlens"})

#: Constructor arguments that place a module rather than configure it; never config fields.
PLACEMENT_ARGS = ("device", "dtype", "layer_idx")

__all__ = ["honours_fast_path",
           "MIXER_INPUTS", "PLACEMENT_ARGS", "MixerConfig", "Mixer", "AttentionBase", "IdentityMixer",
           "run_mixer", "run_gathered", "active_context_parallel", "accepted_inputs", "build_component",
           "mixer_config_class"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixerConfig(ConfigBase):
    """Base of the per-mixer configs derived by ``mixer_config_class``."""

    mixer_class: ClassVar[type | None] = None

    @property
    def width_field(self) -> str:
        """The field holding the model width (the constructor's first argument)."""
        return self.field_names()[0]


_CONFIG_CLASSES: dict[type, type[MixerConfig]] = {}


def _constructor_parameters(cls: type) -> list[inspect.Parameter]:
    """The named parameters of ``cls.__init__``; through ``*args`` / ``**kwargs`` the parameters of
    the base class the constructor forwards them to (a subclass's own defaults win)."""
    chain: list[list[inspect.Parameter]] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if not (isinstance(klass, type) and issubclass(klass, Mixer)) or klass in (Mixer, AttentionBase):
            raise TypeError(f"{cls.__name__}: the constructor forwards *args / **kwargs past every mixer class; "
                            f"give it named arguments so its config can be derived")
        params = list(inspect.signature(init).parameters.values())[1:]
        chain.append([p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)])
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            break
    merged: dict[str, inspect.Parameter] = {}
    for params in reversed(chain):  # the most basic first, so the field order follows it
        for p in params:
            merged[p.name] = p
    return list(merged.values())


def mixer_config_class(cls: type) -> type[MixerConfig]:
    """The frozen config dataclass of mixer class ``cls`` (built once, then cached).

    Fields: the constructor's arguments except ``PLACEMENT_ARGS``, with their annotated types (``Any``
    where unannotated) and defaults; arguments without a default are required fields.
    """
    if cls in _CONFIG_CLASSES:
        return _CONFIG_CLASSES[cls]
    params = _constructor_parameters(cls)
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None:
            try:
                hints.update(typing.get_type_hints(init))
            except Exception:  # an annotation that does not resolve: that argument is typed Any
                hints.update({k: Any for k in getattr(init, "__annotations__", {})})
    fields = []
    for p in params:
        if p.name in PLACEMENT_ARGS:
            continue
        hint = hints.get(p.name, Any)
        if p.default is inspect.Parameter.empty:
            fields.append((p.name, hint))
        elif isinstance(p.default, list | dict | set):
            fields.append((p.name, hint, dataclasses.field(default_factory=lambda v=p.default: type(v)(v))))
        else:
            fields.append((p.name, hint, dataclasses.field(default=p.default)))
    doc = f"Config of ``{cls.__name__}``: its constructor's arguments (see its docstring), as data."
    config_cls = dataclasses.make_dataclass(f"{cls.__name__}Config", fields, bases=(MixerConfig,), frozen=True,
                                            kw_only=True, namespace={"__doc__": doc, "mixer_class": cls})
    config_cls.__module__ = cls.__module__
    _CONFIG_CLASSES[cls] = config_cls
    return config_cls


def honours_fast_path(forward: Callable) -> Callable:
    """Decorate a mixer's ``forward`` so that ``use_fast_path=False`` runs every op of the call on its
    PyTorch path (``ops._backend.prefer_backend("torch")``); with True the ops pick their kernels as
    usual (Triton on CUDA). Both paths compute the same function (tested per op)."""

    @functools.wraps(forward)
    def wrapper(self, *args: Any, **kwargs: Any):
        if getattr(self, "use_fast_path", True):
            return forward(self, *args, **kwargs)
        with prefer_backend("torch"):
            return forward(self, *args, **kwargs)

    return wrapper


def _narrow(dtype: torch.dtype) -> bool:
    """A real floating-point dtype narrower than fp32 (bf16, fp16, fp8)."""
    return dtype.is_floating_point and dtype.itemsize < 4


class Mixer(nn.Module):
    """Base class of sequence mixers (see the module docstring for the contract).

    Class attributes:
        inputs (frozenset[str]): the optional keyword inputs ``forward`` consumes.
        is_identity (bool): the mixer is a no-op; blocks then skip its sublayer entirely.
        causal (bool): output t depends only on inputs <= t (tested for every causal mixer).
        keep_in_fp32 (tuple[str, ...]): the precision-critical parameters (poles, step sizes, decay
            logits), by attribute path ("A_log", "dt_proj.bias"). A cast of the module to a
            floating-point dtype narrower than fp32 (``.to(torch.bfloat16)``, ``.half()``,
            ``.bfloat16()``) leaves them fp32, as ``_keep_in_fp32_modules`` does in transformers; a
            cast to float64 still reaches them; built with such a dtype (``dtype=torch.bfloat16``, a
            bf16 checkpoint) they are created fp32. Names the instance does not have are skipped.
        context_parallel (str | None): "native" when ``forward`` runs under ``context_parallel`` on
            this rank's time chunk itself (see the module docstring); None: ``run_mixer`` serves the
            mixer with the full-sequence fallback. A subclass that changes ``forward`` sets its own.
    """

    inputs: ClassVar[frozenset[str]] = frozenset()
    is_identity: ClassVar[bool] = False
    causal: bool = True
    # None: the contract call. A bool (S4 built with ``transposed=``): the seed convention, where forward
    # takes [B, D, T] when True ([B, T, D] when False) and returns ``(y, state)``; ``run_mixer`` adapts.
    transposed: bool | None = None
    keep_in_fp32: ClassVar[tuple[str, ...]] = ()
    context_parallel: ClassVar[str | None] = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Construction with a narrow dtype (dtype=torch.bfloat16, or a checkpoint loaded as bf16) gives
        # the declared parameters fp32 storage from the start, so their init and loaded values are exact.
        if self.keep_in_fp32 and isinstance(value, nn.Module | nn.Parameter):
            # a name already registered is being replaced (FSDP2 installs its gathered parameters so, at the
            # dtype of its mixed-precision policy): kept as given, or the replacement would leave FSDP's graph
            if (isinstance(value, nn.Parameter) and name in self.keep_in_fp32 and _narrow(value.dtype)
                    and name not in self._parameters):
                value = nn.Parameter(value.data.float(), requires_grad=value.requires_grad)
            elif not isinstance(value, nn.Parameter):
                for path in self.keep_in_fp32:
                    if path.startswith(name + "."):
                        owner, _, attr = path[len(name) + 1:].rpartition(".")
                        try:
                            param = (value.get_submodule(owner) if owner else value)._parameters.get(attr)
                        except AttributeError:
                            continue
                        if param is not None and _narrow(param.dtype):
                            param.data = param.data.float()
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to / half / bfloat16 all go through _apply with one function for every tensor, so the
        # declared parameters are kept by undoing a narrowing cast from their fp32 (or wider) values.
        kept = {}
        for path in self.keep_in_fp32:
            owner, _, attr = path.rpartition(".")
            try:
                module = self.get_submodule(owner) if owner else self
            except AttributeError:  # an optional submodule this instance does not have
                continue
            param = module._parameters.get(attr)
            if param is not None and param.dtype in (torch.float32, torch.float64):
                kept[path] = (module, attr, param.data)
        super()._apply(fn, recurse)
        for module, attr, old in kept.values():
            param = module._parameters[attr]
            if _narrow(param.dtype):
                param.data = old.to(device=param.device, dtype=torch.float32)
        return self

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bad = sorted(set(cls.inputs) - MIXER_INPUTS)
        if bad:
            raise TypeError(f"{cls.__name__}.inputs names {bad}, which are not mixer inputs; "
                            f"known inputs: {sorted(MIXER_INPUTS)}")

    @classmethod
    def config_class(cls) -> type[MixerConfig]:
        """This mixer's config dataclass (``mixer_config_class(cls)``)."""
        return mixer_config_class(cls)

    @classmethod
    def build(cls, config: MixerConfig, *, layer_idx: int | None = None, device=None, dtype=None) -> Mixer:
        """Construct from this mixer's own config; placement arguments the constructor names are passed."""
        if not isinstance(config, cls.config_class()):
            raise TypeError(f"{cls.__name__}.build expects a {cls.config_class().__name__}, got "
                            f"{type(config).__name__}")
        names = {p.name for p in _constructor_parameters(cls)}
        placement = {k: v for k, v in (("layer_idx", layer_idx), ("device", device), ("dtype", dtype))
                     if k in names and (v is not None or k != "layer_idx")}
        kwargs = {name: getattr(config, name) for name in config.field_names()}
        module = cls(**kwargs, **placement)
        if "device" not in names or "dtype" not in names:
            module.to(device=device, dtype=dtype)
        return module

    @classmethod
    def from_config(cls, config: BlockConfig, **kwargs: Any) -> Mixer:
        """Build from a ``BlockConfig`` (``ConfigurableBlock``): the block's fields this mixer's config
        also has (``d_state``, ``bias``, ...), then ``config.mixer_kwargs``, then ``kwargs``; the width
        argument gets ``config.d_model``. Subclasses whose arguments are named otherwise override this."""
        config_cls = cls.config_class()
        names = config_cls.field_names()
        block = config.to_dict()
        for k in _SOFTMAX_ATTENTION_FIELDS:  # options of the softmax attention mixers, never forwarded by name
            if block.get(k) not in (None, False):
                raise ValueError(f"{cls.__name__}: BlockConfig.{k}={block[k]!r} applies to the softmax attention "
                                 f"mixers only; set this mixer's own options through mixer_kwargs")
        values = {k: block[k] for k in names[1:]
                  if k in block and k != "mixer_kwargs" and k not in _SOFTMAX_ATTENTION_FIELDS}
        values.update(config.mixer_kwargs)
        values.update({k: v for k, v in kwargs.items() if k in names})
        layer_idx = values.pop("layer_idx", None)
        values[names[0]] = config.d_model
        return cls.build(config_cls.from_dict(values), layer_idx=layer_idx)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> Cache:
        raise TypeError(f"{type(self).__name__} keeps no inference cache")

    def step(self, x: torch.Tensor, cache: Cache, **inputs: Any) -> torch.Tensor:
        """One decode step: x [B, 1, D] -> y [B, 1, D], advancing ``cache``."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"{type(self).__name__}.step expects x of shape [B, 1, D], got {tuple(x.shape)}")
        return run_mixer(self, x, cache, inputs)


#: BlockConfig fields that configure softmax attention (``MHA`` and its kin). ``Mixer.from_config`` never
#: passes them to another mixer's config, where a field of the same name can mean something else
#: (DeltaNet's ``qk_norm`` is "l2" / "sum").
_SOFTMAX_ATTENTION_FIELDS = ("qk_norm", "attention_chunk_size", "sparse_select_k", "sparse_compress_ratio",
                             "attn_logit_softcapping")


class AttentionBase(Mixer):
    """Base of attention mixers constructed from a ``BlockConfig``: built as ``cls(config)`` from one,
    called as ``forward(x, mask=None, cache=None) -> (y, cache)``.

    ``ConfigurableBlock`` and the language models adapt this convention to the mixer contract
    (``seqblocks.layers.adapters``). Sets ``config``, ``d_model``, ``n_heads``, ``n_kv_heads``,
    ``head_dim``, ``causal`` and ``position`` (the block's rotary / bias position module, or None).
    """

    inputs = frozenset({"mask"})

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        self.n_heads = config.n_heads
        self.n_kv_heads = config.effective_n_kv_heads
        self.head_dim = config.effective_head_dim
        self.causal = config.causal
        self.position = None

    @classmethod
    def config_class(cls) -> type[BlockConfig]:  # type: ignore[override]
        return BlockConfig

    @classmethod
    def from_config(cls, config: BlockConfig, position: nn.Module | None = None, **kwargs: Any) -> AttentionBase:
        module = cls(config)
        if position is not None and getattr(module, "position", None) is None:
            module.position = position
        return module


@MIXERS.register("none")
class IdentityMixer(Mixer):
    """No sequence mixing: y = x exactly; blocks skip the sublayer (no norm, no residual add)."""

    inputs = MIXER_INPUTS
    is_identity = True

    def __init__(self, d_model: int | None = None) -> None:
        super().__init__()
        if d_model is not None:
            check_positive("IdentityMixer", d_model=d_model)
        self.d_model = d_model

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> Cache:
        check_allocation("IdentityMixer", batch_size, max_seqlen, dtype)
        return Cache.empty(batch_size, max_seqlen)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, **inputs: Any) -> torch.Tensor:
        width = self.d_model if self.d_model is not None else (x.shape[-1] if isinstance(x, torch.Tensor) else 0)
        check_input("IdentityMixer", x, width)
        check_lengths("IdentityMixer", inputs.get("lengths"), x.shape[0], x.shape[1])
        if cache is not None:
            check_cache("IdentityMixer", cache, Cache, x.shape[0])
            lengths = inputs.get("lengths")
            cache.seqlen_offset.add_(x.shape[1] if lengths is None else lengths.to(cache.seqlen_offset))
        return x


MIXERS.register("identity", IdentityMixer, description="alias of 'none': no sequence mixing")


def accepted_inputs(mixer: Any) -> frozenset[str]:
    """The optional inputs ``run_mixer`` can give ``mixer``: those it declares in ``Mixer.inputs``, and
    ``cu_seqlens`` for every mixer that declares ``lengths`` (served by ``layers.packing.run_unpacked``)."""
    declared = frozenset(getattr(mixer, "inputs", frozenset()))
    return declared | {"cu_seqlens"} if "lengths" in declared else declared


def active_context_parallel(owner: str, cache: Any = None) -> ContextParallel | None:
    """The context-parallel group of more than one rank this call runs under, or None.

    Raises:
        ValueError: a cache given under context parallelism (no decoding across ranks).
    """
    cp = current_context_parallel()
    if cp is None or cp.world_size == 1:
        return None
    if cache is not None:
        raise ValueError(f"{owner}: a cache under context parallelism (context_parallel over {cp.world_size} "
                         f"ranks): decoding does not split a sequence across ranks; run cached calls outside "
                         f"the context_parallel block")
    return cp


def _gather_input(owner: str, name: str, value: Any, cp: ContextParallel) -> Any:
    """One mixer input of this rank's chunk as the whole sequence's (``run_gathered``)."""
    if name in ("lengths", "cu_seqlens"):
        return value  # they describe the whole sequence, the same on every rank
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a tensor, got {type(value).__name__}")
    if name == "mask":
        if value.dim() != 2 or value.dtype != torch.bool:
            raise ValueError(f"{owner}: under context parallelism a mask must be this rank's [B, T_local] bool "
                             f"key-padding chunk; got {value.dtype} {tuple(value.shape)} (a full [Tq, Tk] mask "
                             f"does not split along time)")
        return gather_token_masks(value, cp=cp)[0]
    return gather_time(value, dim=value.dim() - 1, cp=cp)  # integration_timesteps [B, T], position_ids [(B,) T]


def run_gathered(owner: str, x: torch.Tensor, inputs: dict[str, Any],
                 call: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor],
                 cp: ContextParallel) -> torch.Tensor:
    """The context-parallel fallback: ``call(x_full, inputs_full)`` on the whole sequence, gathered from
    every rank's chunk ``x`` [B, T_local, D], run as one process would (no group active inside), and
    this rank's chunk of its result [B, T_local, D].

    Exact and differentiable for any ``call`` (the gather's backward sums each chunk's cotangent over
    the ranks; every rank holds the same parameters); memory and compute O(T) per rank. Per-token
    inputs are gathered with ``x`` (see the module docstring); ``lengths`` and ``cu_seqlens`` pass as
    they are.

    Raises:
        ValueError: a mask other than a [B, T_local] bool key-padding chunk.
    """
    full = {k: _gather_input(owner, k, v, cp) for k, v in inputs.items()}
    x_full = gather_time(x, dim=1, cp=cp)
    with using_context_parallel(None):
        y = call(x_full, full)
    return local_chunk(y, dim=1, cp=cp)


def run_mixer(mixer: Mixer, x: torch.Tensor, cache: Any = None, inputs: dict[str, Any] | None = None) -> torch.Tensor:
    """``mixer(x, cache, **inputs)`` under the contract: inputs that are None are dropped, and one the
    mixer does not declare in ``inputs`` raises ``TypeError`` naming the mixer and what it declares.
    ``cu_seqlens`` given to a mixer that declares ``lengths`` but not ``cu_seqlens`` runs the documents
    as a right-padded batch (``seqblocks.layers.packing.run_unpacked``).

    Under context parallelism (``seqblocks.parallel.context_parallel``) a mixer whose class sets
    ``context_parallel = "native"`` is called on this rank's chunk; any other runs through
    ``run_gathered`` (the whole sequence on every rank, this rank's chunk kept). A cache there raises
    ``ValueError``."""
    given = {k: v for k, v in (inputs or {}).items() if v is not None}
    cp = active_context_parallel(type(mixer).__name__, cache)
    if cp is not None and getattr(mixer, "context_parallel", None) != "native":
        rejected = sorted(set(given) - accepted_inputs(mixer))
        if rejected:
            raise TypeError(f"{type(mixer).__name__} does not take the inputs {rejected}; it takes "
                            f"{sorted(mixer.inputs)}")
        return run_gathered(type(mixer).__name__, x, given, lambda full, inputs: run_mixer(mixer, full, None, inputs),
                            cp)
    if "cu_seqlens" in given and "cu_seqlens" not in mixer.inputs and "lengths" in mixer.inputs:
        return run_unpacked(mixer, x, cache, given, run_mixer)
    rejected = sorted(set(given) - accepted_inputs(mixer))
    if rejected:
        raise TypeError(f"{type(mixer).__name__} does not take the inputs {rejected}; it takes "
                        f"{sorted(mixer.inputs)}")
    if mixer.transposed is None:
        return mixer(x, **given) if cache is None else mixer(x, cache, **given)
    # A mixer built in the seed convention: feed its layout and keep y of its (y, state).
    u = x.transpose(1, 2) if mixer.transposed else x
    y, _ = mixer(u, **given) if cache is None else mixer(u, cache, **given)
    return y.transpose(1, 2) if mixer.transposed else y


def build_component(cls: Any, config: BlockConfig, **kwargs: Any) -> nn.Module:
    """Construct a registry component (norm, FFN, position, mixer) from a ``BlockConfig``.

    Components with a ``from_config`` classmethod (all of seqblocks' own) are built with it and
    receive ``kwargs``; any other class is called as ``cls(config)``, the registry contract.
    """
    from_config = getattr(cls, "from_config", None)
    if from_config is not None:
        return from_config(config, **kwargs)
    return cls(config)
