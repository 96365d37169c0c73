"""The mixer contract that every sequence mixer in seqblocks follows.

A mixer maps ``x`` [B, T, D] to ``y`` [B, T, D]:

- ``forward(x, cache=None, **kwargs) -> y``. Without a cache it is a training / full-sequence pass.
  With a cache it continues the sequence held by the cache: a prefill when T > 1, a decode step when
  T = 1, and in both cases it updates the cache in place so that the next call continues from there.
  Splitting a sequence into any number of cached calls gives the full pass's outputs.
- ``allocate_inference_cache(batch_size, max_seqlen, dtype=None) -> Cache``: a preallocated,
  static-shape cache (see ``seqblocks.cache``).
- ``step(x, cache)``: the T = 1 case of ``forward``.
- ``from_config(config, **kwargs)``: build from a ``BlockConfig`` (for ``ConfigurableBlock``).
- Optional keyword inputs a mixer may accept: ``lengths`` [B] (valid prefix of each padded
  sequence), ``integration_timesteps`` [B, T] (time-varying / event models), ``mask``,
  ``position_ids``. Blocks and models pass each only to mixers whose ``forward`` names it.

Attention built from a ``BlockConfig`` (``AttentionBase`` subclasses) returns ``(y, cache)`` instead of ``y``;
``call_mixer`` accepts both.

Shapes: B batch, T time, D width.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from seqblocks.cache import Cache
from seqblocks.registry import MIXERS

__all__ = ["Mixer", "AttentionBase", "IdentityMixer", "call_mixer", "forward_parameters", "build_component"]


class Mixer(nn.Module):
    """Base class of sequence mixers (see the module docstring for the contract).

    Class attributes:
        is_identity (bool): the mixer is a no-op; blocks then skip its sublayer entirely.
        causal (bool): output t depends only on inputs <= t (tested for every causal mixer).
    """

    is_identity: ClassVar[bool] = False
    causal: bool = True

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> Cache:
        raise TypeError(f"{type(self).__name__} keeps no inference cache")

    def step(self, x: torch.Tensor, cache: Cache, **kwargs: Any) -> torch.Tensor:
        """One decode step: x [B, 1, D] -> y [B, 1, D], advancing ``cache``."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"{type(self).__name__}.step expects x of shape [B, 1, D], got {tuple(x.shape)}")
        return self(x, cache=cache, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs: Any) -> Mixer:
        """Build from a ``BlockConfig``: ``cls(config.d_model, **matching fields, **config.mixer_kwargs)``.

        Config fields are passed when the constructor has a parameter of the same name (``d_state``,
        ``layer_idx``, ...); ``config.mixer_kwargs`` and ``kwargs`` are passed as given and win.
        Subclasses with other argument names override this.
        """
        params = inspect.signature(cls.__init__).parameters
        fields = {k: v for k, v in config.to_dict().items() if k in params and k != "d_model"}
        fields.update(config.mixer_kwargs)
        fields.update({k: v for k, v in kwargs.items() if k in params})
        return cls(config.d_model, **fields)


class AttentionBase(Mixer):
    """Base of attention mixers constructed from a ``BlockConfig``.

    A subclass takes ``(config)`` and implements ``forward(x, mask=None, cache=None) -> (y, cache)``.
    Sets ``config``, ``d_model``, ``n_heads``, ``n_kv_heads``, ``head_dim``, ``causal`` and ``position``
    (the block's rotary / bias position module, or None) for subclasses.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        self.n_heads = config.n_heads
        self.n_kv_heads = config.effective_n_kv_heads
        self.head_dim = config.head_dim
        self.causal = config.causal
        self.position = None

    @classmethod
    def from_config(cls, config, position: nn.Module | None = None, **kwargs: Any) -> AttentionBase:
        module = cls(config)
        if position is not None and getattr(module, "position", None) is None:
            module.position = position
        return module


@MIXERS.register("none")
class IdentityMixer(Mixer):
    """No sequence mixing: y = x exactly; blocks skip the sublayer (no norm, no residual add)."""

    is_identity = True

    def __init__(self, d_model: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.d_model = d_model

    @classmethod
    def from_config(cls, config, **kwargs: Any) -> IdentityMixer:
        return cls(config.d_model)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> Cache:
        return Cache.empty(batch_size, max_seqlen)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, **kwargs: Any) -> torch.Tensor:
        if cache is not None:
            cache.seqlen_offset.add_(x.shape[1])
        return x


MIXERS.register("identity", IdentityMixer, description="alias of 'none': no sequence mixing")


_FORWARD_PARAMS: dict[type, tuple[frozenset[str], bool]] = {}


def _forward_params(cls: type) -> tuple[frozenset[str], bool]:
    # A plain dict rather than functools.cache: torch.compile traces a dict lookup without a warning.
    if cls not in _FORWARD_PARAMS:
        params = inspect.signature(cls.forward).parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        _FORWARD_PARAMS[cls] = (frozenset(params), var_kw)
    return _FORWARD_PARAMS[cls]


def forward_parameters(module: nn.Module) -> tuple[frozenset[str], bool]:
    """(names of ``module.forward``'s parameters, whether it takes ``**kwargs``)."""
    return _forward_params(type(module))


def call_mixer(mixer: nn.Module, x: torch.Tensor, cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Run ``mixer`` on ``x`` and return ``(y, cache)``.

    The cache is passed as ``cache=`` (our contract) or ``inference_params=`` (mamba_ssm style),
    whichever the mixer's forward names. Keyword inputs that are None are dropped; any other keyword
    the mixer's forward does not accept raises ``TypeError`` naming the mixer and what it accepts.
    A mixer returning ``(y, new_cache)`` has its cache passed on; one returning ``y`` keeps ``cache``.
    """
    names, var_kw = forward_parameters(mixer)
    call_kwargs = {k: v for k, v in kwargs.items() if v is not None}
    rejected = [k for k in call_kwargs if k not in names and not var_kw]
    if rejected:
        accepted = sorted(names - {"self", "x", "hidden_states"})
        raise TypeError(f"{type(mixer).__name__}.forward does not accept {rejected}; it accepts {accepted}")
    if cache is not None:
        if "cache" in names:
            call_kwargs["cache"] = cache
        elif "inference_params" in names:
            call_kwargs["inference_params"] = cache
        else:
            raise TypeError(f"{type(mixer).__name__}.forward takes no cache (no 'cache' or 'inference_params')")
    out = mixer(x, **call_kwargs)
    if isinstance(out, tuple):
        y, new_cache = out[0], (out[1] if len(out) > 1 else cache)
        return y, (cache if new_cache is None else new_cache)
    return out, cache


def build_component(cls: Any, config, **kwargs: Any) -> nn.Module:
    """Construct a registry component from a ``BlockConfig``.

    Components with a ``from_config`` classmethod (all of seqblocks' own) are built with it and
    receive ``kwargs``; any other class is called as ``cls(config)``, the registry contract.
    """
    from_config = getattr(cls, "from_config", None)
    if from_config is not None:
        return from_config(config, **kwargs)
    return cls(config)
