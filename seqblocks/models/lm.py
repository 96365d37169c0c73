"""Causal language models: the shared engine and ``LRNNLMHeadModel`` (a hybrid LM over any mixers).

Two front doors, one engine. ``CausalLM`` owns everything a decoder-only language model does around
its layers: token embedding (with an optional additive position encoding at absolute positions),
routing of the optional inputs (``lengths``, ``integration_timesteps``, ``position_ids``, extra mixer
keywords) to exactly the mixers whose ``forward`` names them, the per-layer inference caches, prefill
through ``forward``, ``step``, the (tied, vocabulary-padded) LM head, generation and checkpoints.

- ``LRNNLMHeadModel`` (this file) stacks ``seqblocks.blocks.Block`` s (Add -> Norm -> Mixer, fused
  add+norm, ``residual_in_fp32``) over any registered mixer types, hybrids included.
- ``LanguageModel`` (``config_lm.py``) stacks ``ConfigurableBlock`` s built from one ``BlockConfig`` per
  layer.

Caches: ``allocate_inference_cache`` returns an ``InferenceCaches``, a dict ``{layer_idx: Cache}``
that also holds the model-level ``seqlen_offset`` [B] (tokens consumed per row). ``forward(...,
inference_params=caches)`` is a prefill (or a chunk of one); ``step`` feeds one token. Both update the
caches in place, so a decode step can be captured in a CUDA graph.

Shapes: B batch, T time, D width, V vocabulary.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.blocks import Block
from seqblocks.cache import Cache, capture_safe
from seqblocks.checkpoint import CheckpointMixin, register_model_type
from seqblocks.layers.ffn import GatedMLP
from seqblocks.layers.mixer import forward_parameters
from seqblocks.layers.norm import LayerNorm, RMSNorm, norm_params
from seqblocks.layers.position import LearnedPosition, PositionBase
from seqblocks.ops.add_norm import add_norm
from seqblocks.registry import MIXERS

__all__ = ["CausalLMOutput", "InferenceCaches", "CausalLM", "LRNNLMHeadModel", "build_mixer",
           "resolve_mixer_kwargs", "default_num_heads"]


class CausalLMOutput(NamedTuple):
    """What a language model's ``forward`` / ``step`` return."""

    logits: torch.Tensor  # [B, T, V]


class InferenceCaches(dict):
    """``{layer_idx: Cache}`` plus the model-level token count.

    Attributes:
        seqlen_offset (Tensor): [B] int64, tokens each sequence has consumed (advanced in place).
        max_seqlen (int): the capacity the caches were allocated for.
    """

    def __init__(self, caches: dict[int, Any], seqlen_offset: torch.Tensor, max_seqlen: int) -> None:
        super().__init__(caches)
        self.seqlen_offset = seqlen_offset
        self.max_seqlen = max_seqlen

    @property
    def batch_size(self) -> int:
        return self.seqlen_offset.shape[0]

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every state tensor (the offset and each layer cache's tensor fields)."""
        yield self.seqlen_offset
        for cache in self.values():
            if not isinstance(cache, Cache):
                raise TypeError(f"InferenceCaches: {type(cache).__name__} is not a seqblocks Cache")
            for _, t in cache.tensors():
                yield t

    def reset(self) -> None:
        """Back to an empty prefix, in place."""
        self.seqlen_offset.zero_()
        for cache in self.values():
            cache.reset()


def cache_offset(caches: Any) -> torch.Tensor:
    """The [B] token count of a caches dict (``InferenceCaches`` or a plain ``{layer: Cache}``)."""
    offset = getattr(caches, "seqlen_offset", None)
    if offset is not None:
        return offset
    for cache in caches.values():
        offset = getattr(cache, "seqlen_offset", None)
        if offset is not None:
            return offset
    raise TypeError("caches hold no seqlen_offset; allocate them with model.allocate_inference_cache")


def default_num_heads(d_model: int) -> int:
    """Heads given to attention mixers whose kwargs name none: the largest divisor of ``d_model`` not
    above ``max(1, d_model // 64)`` (head width 64 where d_model allows)."""
    heads = max(1, d_model // 64)
    while d_model % heads:
        heads -= 1
    return heads


_HEAD_ARGS = ("num_heads", "n_heads")


@functools.cache
def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return params


def _mixer_class(name_or_cls: Any) -> type:
    if isinstance(name_or_cls, str):
        return MIXERS.get(name_or_cls)
    if isinstance(name_or_cls, type) and issubclass(name_or_cls, nn.Module):
        return name_or_cls
    raise TypeError(f"a mixer is a registered name or an nn.Module class, got {name_or_cls!r}")


def resolve_mixer_kwargs(mixer_types: Sequence[Any], mixer_kwargs: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per-layer constructor kwargs from ``LRNNLMHeadModel``'s ``mixer_kwargs``.

    Two forms: a dict keyed by mixer type (``{"S5": {...}, "attn": {...}}``; keys case-insensitive, and
    an alias such as "mha" serves "attn" layers), or one dict for all mixers, of which each mixer gets
    the keys its constructor names. Mixing the forms, or a global key no mixer takes, raises
    ``ValueError``.
    """
    n = len(mixer_types)
    if mixer_kwargs is None:
        return [{} for _ in range(n)]
    if not isinstance(mixer_kwargs, dict):
        raise TypeError(f"mixer_kwargs must be a dict or None, got {type(mixer_kwargs).__name__}")
    classes = [_mixer_class(t) for t in mixer_types]
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
        params = _init_params(cls)
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        taken = {k: v for k, v in mixer_kwargs.items() if var_kw or k in params}
        used.update(taken)
        out.append(taken)
    unused = sorted(set(mixer_kwargs) - used)
    if unused:
        names = sorted({getattr(c, "__name__", str(c)) for c in classes})
        raise ValueError(f"mixer_kwargs keys {unused} are accepted by none of the mixers {names}")
    return out


def build_mixer(name_or_cls: Any, d_model: int, *, d_state: int | None = None, layer_idx: int | None = None,
                kwargs: dict[str, Any] | None = None, device=None, dtype=None, causal: bool = True) -> nn.Module:
    """Construct one mixer under the mixer contract: ``cls(d_model, **kwargs)``.

    ``d_state``, ``layer_idx``, ``device`` and ``dtype`` are passed when the constructor names them (and
    ``kwargs`` does not). An attention constructor whose ``num_heads`` has no default (or None) gets
    ``default_num_heads(d_model)`` unless ``kwargs`` gives it. A class constructed from
    a ``BlockConfig`` (first argument ``config``) is built from one assembled from these values.

    Args:
        causal (bool): require a causal mixer (language models). Default: True.

    Raises:
        ValueError: unknown mixer name, a required constructor argument that is missing, or
            ``causal=True`` with a mixer that is not causal.
        TypeError: the constructor rejected the arguments (the message names the mixer and them).
    """
    cls = _mixer_class(name_or_cls)
    name = name_or_cls if isinstance(name_or_cls, str) else cls.__name__
    kw = dict(kwargs or {})
    params = _init_params(cls)
    first = next(iter(params), None)
    if causal and kw.get("causal", True) is False:
        raise ValueError(f"mixer {name!r} (layer {layer_idx}): causal=False is not allowed in a causal model")
    if first == "config":
        module = _build_from_block_config(cls, name, d_model, d_state, kw)
    else:
        for arg, value in (("d_state", d_state), ("layer_idx", layer_idx), ("device", device), ("dtype", dtype)):
            if arg in params and arg not in kw and (value is not None or arg in ("device", "dtype")):
                kw[arg] = value
        for arg in _HEAD_ARGS:
            if arg in params and params[arg].default in (inspect.Parameter.empty, None) and arg not in kw:
                kw[arg] = default_num_heads(d_model)
        if causal and "causal" in params and "causal" not in kw:
            kw["causal"] = True
        missing = [p.name for i, p in enumerate(params.values()) if i > 0 and p.default is inspect.Parameter.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kw]
        if missing:
            raise ValueError(f"mixer {name!r} (layer {layer_idx}) needs constructor arguments {missing}; "
                             f"give them in mixer_kwargs")
        try:
            module = cls(d_model, **kw)
        except TypeError as err:
            raise TypeError(f"could not build mixer {name!r} (layer {layer_idx}) as {cls.__name__}({d_model}, "
                            f"**{kw}): {err}") from err
    if first == "config" or "dtype" not in params or "device" not in params:
        if device is not None or dtype is not None:
            module.to(device=device, dtype=dtype)
    if causal and getattr(module, "causal", True) is False:
        raise ValueError(f"mixer {name!r} (layer {layer_idx}) is not causal; a language model needs causal mixers")
    return module


def _build_from_block_config(cls: type, name: str, d_model: int, d_state: int | None, kw: dict[str, Any]):
    import dataclasses

    from seqblocks.config import BlockConfig
    from seqblocks.layers.mixer import build_component

    fields = {f.name for f in dataclasses.fields(BlockConfig)}
    cfg: dict[str, Any] = {"attention": name if isinstance(name, str) else "mha", "d_model": d_model}
    if d_state is not None:
        cfg["d_state"] = d_state
    extra = {}
    for k, v in kw.items():
        if k in _HEAD_ARGS:
            cfg["n_heads"] = v
        elif k in fields:
            cfg[k] = v
        else:
            extra[k] = v
    cfg.setdefault("n_heads", default_num_heads(d_model))
    cfg["mixer_kwargs"] = {**cfg.get("mixer_kwargs", {}), **extra}
    return build_component(cls, BlockConfig(**cfg))


_RESIDUAL_PROJ_NAMES = ("out_proj", "o_proj", "fc2", "down", "proj_out", "output_proj", "out")


def residual_output_projection(module: nn.Module | None, d_model: int) -> nn.Linear | None:
    """The linear layer that writes ``module``'s output into the residual stream: a child named
    ``out_proj`` / ``o_proj`` / ``fc2`` / ``down`` / ... if there is one, else the last ``nn.Linear``
    (in registration order) whose output width is ``d_model``; None when there is none."""
    if module is None:
        return None
    for name in _RESIDUAL_PROJ_NAMES:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear) and child.out_features == d_model:
            return child
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) and m.out_features == d_model]
    return linears[-1] if linears else None


_INIT_KEYS = {"initializer_range", "rescale_prenorm_residual", "n_residuals_per_layer"}


class CausalLM(nn.Module, CheckpointMixin, library_name="seqblocks", tags=["seqblocks", "causal-lm"]):
    """The engine shared by seqblocks' language models (see the module docstring).

    Subclasses build ``self.layers`` and call ``_build_embedding`` / ``_build_head``; they implement
    ``mixers()`` (the mixer of each layer), ``_backbone(hidden, caches, inputs)`` (layers and final norm)
    and the checkpoint hooks.
    """

    vocab_size: int
    d_model: int
    position: PositionBase | None

    def _build_embedding(self, vocab_size: int, d_model: int, pad_vocab_size_multiple: int,
                         tie_embeddings: bool, position: PositionBase | None, device=None, dtype=None) -> None:
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size={vocab_size!r} must be a positive int")
        if not isinstance(pad_vocab_size_multiple, int) or pad_vocab_size_multiple <= 0:
            raise ValueError(f"pad_vocab_size_multiple={pad_vocab_size_multiple!r} must be a positive int")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.padded_vocab_size = math.ceil(vocab_size / pad_vocab_size_multiple) * pad_vocab_size_multiple
        self.tie_embeddings = tie_embeddings
        self.embedding = nn.Embedding(self.padded_vocab_size, d_model, device=device, dtype=dtype)
        self.position = position

    def _build_head(self, device=None, dtype=None) -> None:
        self.lm_head = nn.Linear(self.d_model, self.padded_vocab_size, bias=False, device=device, dtype=dtype)
        if self.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def mixers(self) -> list[nn.Module]:
        raise NotImplementedError  # abstract: each front door knows where its mixers live

    def _backbone(self, hidden: torch.Tensor, caches: Any, inputs: list[dict[str, Any]]) -> torch.Tensor:
        raise NotImplementedError  # abstract

    # ---------------------------------------------------------------- init

    def _apply_initializer(self, cfg: dict[str, Any] | None, residual_modules: list[list[nn.Module | None]]) -> None:
        """Embedding ~ N(0, initializer_range); each residual output projection scaled once by
        1 / sqrt(n_residuals_per_layer * n_layer) (GPT-2's rescaling), on top of its module's own init."""
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - _INIT_KEYS)
        if unknown:
            raise ValueError(f"initializer_cfg keys {unknown} are unknown; valid keys: {sorted(_INIT_KEYS)}")
        std = cfg.get("initializer_range", 0.02)
        if not std > 0:
            raise ValueError(f"initializer_cfg['initializer_range']={std!r} must be positive")
        n_layer = len(residual_modules)
        per_layer = cfg.get("n_residuals_per_layer")
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, std=std)
            if not self.tie_embeddings:
                nn.init.normal_(self.lm_head.weight, std=std)
            if cfg.get("rescale_prenorm_residual", True) and n_layer:
                for modules in residual_modules:
                    n_res = per_layer if per_layer is not None else max(1, sum(m is not None for m in modules))
                    for module in modules:
                        proj = residual_output_projection(module, self.d_model)
                        if proj is not None:
                            proj.weight.div_(math.sqrt(n_res * n_layer))

    # ---------------------------------------------------------------- routing

    def _route(self, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Per layer, the inputs its mixer's forward names (all of them for a ``**kwargs`` forward)."""
        routes, taken = [], set()
        for mixer in self.mixers():
            names, var_kw = forward_parameters(mixer)
            mine = {k: v for k, v in inputs.items() if var_kw or k in names}
            taken.update(mine)
            routes.append(mine)
        return routes

    def accepts_lengths(self) -> bool:
        """Whether every mixer can prefill a right-padded batch (its forward names ``lengths``)."""
        for mixer in self.mixers():
            names, var_kw = forward_parameters(mixer)
            if not (var_kw or "lengths" in names or getattr(mixer, "is_identity", False)):
                return False
        return True

    # ---------------------------------------------------------------- forward

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                inference_params: dict | None = None, num_last_tokens: int = 0,
                integration_timesteps: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                **mixer_kwargs: Any) -> CausalLMOutput:
        """Logits for every position (or the last ``num_last_tokens``).

        Args:
            input_ids (Tensor): [B, T] int64 token ids in [0, vocab_size).
            position_ids (Tensor | None): [B, T] or [T] absolute positions, for the additive position
                encoding and the mixers that take ``position_ids``. Default: None (cache offset + 0..T-1).
            inference_params (dict | None): caches from ``allocate_inference_cache``; the call then
                prefills / continues them in place. Default: None.
            num_last_tokens (int): if > 0, only the last ``num_last_tokens`` positions. Default: 0.
            integration_timesteps (Tensor | None): [B, T] time deltas for time-varying / event mixers;
                reaches only mixers whose forward names it. Default: None.
            lengths (Tensor | None): [B] valid prefix length of each right-padded row, in [1, T];
                reaches only mixers that take it. With caches, every stateful mixer must take it and
                each row's caches advance by its own length. Default: None.
            **mixer_kwargs: further keyword inputs; each reaches the mixers whose forward names it.

        Returns:
            CausalLMOutput: ``logits`` [B, T or num_last_tokens, vocab_size].

        Raises:
            ValueError / TypeError: malformed inputs, caches too small, or a keyword no mixer takes.
        """
        B, T = self._check_ids(input_ids)
        if not isinstance(num_last_tokens, int) or num_last_tokens < 0:
            raise ValueError(f"num_last_tokens={num_last_tokens!r} must be a non-negative int")
        if lengths is not None:
            lengths = self._check_lengths(lengths, B, T, input_ids.device)
        if integration_timesteps is not None and tuple(integration_timesteps.shape) != (B, T):
            raise ValueError(f"integration_timesteps must have shape [B, T] = [{B}, {T}], "
                             f"got {tuple(integration_timesteps.shape)}")
        if inference_params is not None:
            self._check_caches(inference_params, B, T)
            if lengths is not None and not self.accepts_lengths():
                bad = [type(m).__name__ for m in self.mixers() if "lengths" not in forward_parameters(m)[0]
                       and not forward_parameters(m)[1] and not getattr(m, "is_identity", False)]
                raise ValueError(f"a padded prefill (lengths with caches) needs mixers that take lengths; "
                                 f"{sorted(set(bad))} do not")
        extra = {k: v for k, v in mixer_kwargs.items() if v is not None}
        if extra:
            routes = self._route(extra)
            unused = sorted(set(extra) - set().union(*routes))
            if unused:
                raise TypeError(f"{type(self).__name__}.forward: keyword inputs {unused} are taken by no mixer")
        return self._run(input_ids, inference_params, position_ids, num_last_tokens, integration_timesteps,
                         lengths, extra)

    def step(self, input_ids: torch.Tensor, caches: dict, integration_timesteps: torch.Tensor | None = None,
             **mixer_kwargs: Any) -> CausalLMOutput:
        """Feed one token per row and advance ``caches`` in place (no host synchronisation, so it can
        be captured in a CUDA graph).

        Args:
            input_ids (Tensor): [B, 1] (or [B]) token ids.
            caches (dict): from ``allocate_inference_cache``, after any prefill.
            integration_timesteps (Tensor | None): [B, 1] (or [B]) time delta of this token. Default: None.

        Returns:
            CausalLMOutput: ``logits`` [B, 1, vocab_size].
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[:, None]
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"step expects input_ids of shape [B, 1], got {tuple(input_ids.shape)}")
        if integration_timesteps is not None and integration_timesteps.dim() == 1:
            integration_timesteps = integration_timesteps[:, None]
        extra = {k: v for k, v in mixer_kwargs.items() if v is not None}
        return self._run(input_ids, caches, None, 0, integration_timesteps, None, extra)

    def _run(self, input_ids, caches, position_ids, num_last_tokens, integration_timesteps, lengths, extra):
        T = input_ids.shape[1]
        hidden = self.embedding(input_ids)
        if self.position is not None:
            if position_ids is None:
                start = cache_offset(caches)[:, None] if caches is not None else 0
                positions = start + torch.arange(T, device=input_ids.device)
                positions = positions if caches is not None else positions[None]
            else:
                positions = position_ids
            hidden = self._add_position(hidden, positions)
        inputs = {"lengths": lengths, "integration_timesteps": integration_timesteps, "position_ids": position_ids,
                  **extra}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        hidden = self._backbone(hidden, caches, self._route(inputs))
        if caches is not None and isinstance(caches, InferenceCaches):
            caches.seqlen_offset.add_(lengths if lengths is not None else T)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        logits = F.linear(hidden.to(self.lm_head.weight.dtype), self.lm_head.weight[: self.vocab_size])
        return CausalLMOutput(logits=logits)

    def _add_position(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if isinstance(self.position, LearnedPosition):
            # The table lookup without LearnedPosition.embed's host-side range check, so a decode step
            # stays capturable; forward / generate check the range before calling.
            return hidden + self.position.table(positions).to(hidden.dtype)
        return self.position.embed(hidden, positions)

    # ---------------------------------------------------------------- checks

    def _check_ids(self, input_ids: torch.Tensor) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [B, T] tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {(B, T)}")
        if capture_safe():  # reading the values would synchronise (see seqblocks.cache.capture_safe)
            return B, T
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        return B, T

    @staticmethod
    def _check_lengths(lengths: torch.Tensor, B: int, T: int, device) -> torch.Tensor:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.dtype.is_floating_point:
            raise ValueError(f"lengths must be an integer tensor of shape [{B}], got "
                             f"{getattr(lengths, 'shape', lengths)!r}")
        if int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise ValueError(f"lengths must lie in [1, {T}], got {lengths.tolist()}")
        return lengths.to(device=device, dtype=torch.long)

    def _check_caches(self, caches: Any, B: int, T: int) -> None:
        if not isinstance(caches, dict) or len(caches) != len(self.mixers()):
            raise ValueError(f"inference_params must be the dict from allocate_inference_cache with "
                             f"{len(self.mixers())} layers, got {type(caches).__name__}")
        offset = cache_offset(caches)
        if offset.shape[0] != B:
            raise ValueError(f"caches were allocated for batch size {offset.shape[0]}, input has {B}")
        max_seqlen = getattr(caches, "max_seqlen", None)
        if max_seqlen is not None and int(offset.max()) + T > max_seqlen:
            raise ValueError(f"caches hold at most max_seqlen={max_seqlen} tokens; {int(offset.max())} are "
                             f"cached and {T} more were given")
        if isinstance(self.position, LearnedPosition) and int(offset.max()) + T > self.position.max_seq_len:
            raise ValueError(f"positions up to {int(offset.max()) + T - 1} exceed the learned position "
                             f"table (max_seq_len={self.position.max_seq_len})")

    # ---------------------------------------------------------------- inference

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> InferenceCaches:
        """Preallocated caches for ``batch_size`` sequences of up to ``max_seqlen`` tokens.

        Args:
            batch_size (int): rows.
            max_seqlen (int): the most tokens (prompt + generated) a row will hold.
            dtype (torch.dtype | None): state dtype. Default: None (the parameters' dtype).
            **kwargs: passed to each mixer's ``allocate_inference_cache``.

        Returns:
            InferenceCaches: ``{layer_idx: Cache}`` with a model-level ``seqlen_offset``.
        """
        if not isinstance(batch_size, int) or batch_size <= 0 or not isinstance(max_seqlen, int) or max_seqlen <= 0:
            raise ValueError(f"batch_size={batch_size!r} and max_seqlen={max_seqlen!r} must be positive ints")
        dtype = dtype if dtype is not None else self.embedding.weight.dtype
        caches = {}
        for i, mixer in enumerate(self.mixers()):
            allocate = getattr(mixer, "allocate_inference_cache", None)
            if allocate is None:
                raise TypeError(f"layer {i}: {type(mixer).__name__} has no allocate_inference_cache; it cannot decode")
            caches[i] = allocate(batch_size, max_seqlen, dtype=dtype, **kwargs)
        offset = torch.zeros(batch_size, dtype=torch.long, device=self.embedding.weight.device)
        return InferenceCaches(caches, offset, max_seqlen)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs: Any):
        """``seqblocks.generation.generate(self, input_ids, max_new_tokens, **kwargs)``."""
        from seqblocks.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)


def _class_path(cls: Any) -> str | None:
    if cls is None:
        return None
    if isinstance(cls, functools.partial) or not isinstance(cls, type):
        raise ValueError(f"mlp_cls={cls!r} cannot be saved: give a class (configure it through d_intermediate)")
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(path: str | None) -> type | None:
    """A class from ``module:qualname``; only nn.Module subclasses are accepted."""
    if path is None:
        return None
    module_name, _, qualname = str(path).partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"mlp_cls {path!r} from the checkpoint cannot be imported: {err}") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"mlp_cls {path!r} is not an nn.Module class")
    return obj


@register_model_type
class LRNNLMHeadModel(CausalLM):
    """Hybrid language model over any registered mixers: embedding, a stack of
    Add -> Norm -> Mixer (-> Add -> Norm -> MLP) blocks, final norm, LM head.

    Args:
        d_model (int): model width.
        d_state (int): state width, passed to the mixers whose constructor names ``d_state``.
        n_layer (int): number of blocks.
        vocab_size (int): vocabulary size (logits have this width).
        mixer_types (list[str]): one registered mixer name per layer, case-insensitive: "LRU", "S4",
            "S4D", "S5", "Centaurus", "Mamba", "RGLRU", "S7", "attn", and any other registered mixer
            ("mla", "sliding_window", ...). Attention layers are causal; attention without a head count
            in ``mixer_kwargs`` gets ``default_num_heads(d_model)`` heads.
        d_intermediate (int): MLP hidden width; 0 for no MLP. Default: 0.
        mixer_kwargs (dict | None): constructor kwargs, per mixer type (``{"S5": {...}}``) or one dict
            for all mixers (each takes the keys its constructor names). Default: None.
        mlp_cls (type | None): MLP class, built as ``mlp_cls(d_model, hidden_features=d_intermediate,
            out_features=d_model)`` (arguments it names). Default: None (``GatedMLP``).
        norm_epsilon (float): norm epsilon. Default: 1e-5.
        rms_norm (bool): RMSNorm instead of LayerNorm. Default: True.
        fused_add_norm (bool): add + norm as one op (on CPU too). Default: True.
        residual_in_fp32 (bool): keep the residual stream in fp32. Default: False.
        tie_embeddings (bool): LM head shares the embedding matrix. Default: True.
        pad_vocab_size_multiple (int): embedding rows padded to a multiple of this. Default: 8.
        initializer_cfg (dict | None): ``initializer_range`` (0.02, embedding std),
            ``rescale_prenorm_residual`` (True: divide each residual output projection by
            sqrt(n_residuals_per_layer * n_layer), once), ``n_residuals_per_layer`` (default 1, or 2
            with an MLP). Default: None (those defaults).
        device, dtype: parameter placement. Default: None.

    Raises:
        ValueError: inconsistent sizes, unknown mixer names, bad mixer_kwargs.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        n_layer: int,
        vocab_size: int,
        mixer_types: list,
        d_intermediate: int = 0,
        mixer_kwargs: dict | None = None,
        mlp_cls=None,
        norm_epsilon: float = 1e-5,
        rms_norm: bool = True,
        fused_add_norm: bool = True,
        residual_in_fp32: bool = False,
        tie_embeddings: bool = True,
        pad_vocab_size_multiple: int = 8,
        initializer_cfg: dict | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("n_layer", n_layer)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LRNNLMHeadModel: {name}={value!r} must be a positive int")
        if not isinstance(d_intermediate, int) or d_intermediate < 0:
            raise ValueError(f"LRNNLMHeadModel: d_intermediate={d_intermediate!r} must be a non-negative int")
        if isinstance(mixer_types, str) or not isinstance(mixer_types, Sequence):
            raise TypeError(f"mixer_types must be a list of mixer names, got {mixer_types!r}")
        mixer_types = list(mixer_types)
        if len(mixer_types) != n_layer:
            raise ValueError(f"mixer_types has {len(mixer_types)} entries but n_layer={n_layer}")
        for t in mixer_types:
            if not isinstance(t, str):
                raise TypeError(f"mixer_types entries must be registered names (str), got {t!r}")
            MIXERS.get(t)  # unknown names raise ValueError listing the registered ones
        per_layer = resolve_mixer_kwargs(mixer_types, mixer_kwargs)
        self.config = {
            "d_model": d_model, "d_state": d_state, "n_layer": n_layer, "vocab_size": vocab_size,
            "mixer_types": list(mixer_types), "d_intermediate": d_intermediate,
            "mixer_kwargs": mixer_kwargs, "mlp_cls": mlp_cls, "norm_epsilon": norm_epsilon,
            "rms_norm": rms_norm, "fused_add_norm": fused_add_norm, "residual_in_fp32": residual_in_fp32,
            "tie_embeddings": tie_embeddings, "pad_vocab_size_multiple": pad_vocab_size_multiple,
            "initializer_cfg": initializer_cfg,
        }
        self.n_layer = n_layer
        self.mixer_types = mixer_types
        self.fused_add_norm = fused_add_norm
        self.residual_in_fp32 = residual_in_fp32
        factory = {"device": device, "dtype": dtype}
        self._build_embedding(vocab_size, d_model, pad_vocab_size_multiple, tie_embeddings, None, **factory)

        norm_base = RMSNorm if rms_norm else LayerNorm
        norm_cls = functools.partial(norm_base, eps=norm_epsilon, **factory)
        mlp_factory = None
        if d_intermediate > 0:
            mlp_base = GatedMLP if mlp_cls is None else mlp_cls
            mlp_params = _init_params(mlp_base) if isinstance(mlp_base, type) else {}
            mlp_kw = {k: v for k, v in (("hidden_features", d_intermediate), ("out_features", d_model),
                                         ("device", device), ("dtype", dtype)) if k in mlp_params}
            mlp_factory = functools.partial(mlp_base, **mlp_kw)

        layers = []
        for i, (mtype, kw) in enumerate(zip(mixer_types, per_layer)):
            mixer = build_mixer(mtype, d_model, d_state=d_state, layer_idx=i, kwargs=kw, **factory)
            layers.append(Block(d_model, mixer_cls=lambda _dim, m=mixer: m,
                                mlp_cls=mlp_factory if mlp_factory is not None else nn.Identity,
                                norm_cls=norm_cls, fused_add_norm=fused_add_norm,
                                residual_in_fp32=residual_in_fp32))
        self.layers = nn.ModuleList(layers)
        self.norm_f = norm_cls(d_model)
        self._build_head(**factory)
        if dtype is not None or device is not None:
            # Modules that ignored device / dtype (user MLPs, ...) follow the rest; mixers that took
            # dtype keep the parameter dtypes they chose.
            for layer in self.layers:
                if layer.mlp is not None:
                    layer.mlp.to(**factory)
        self._apply_initializer(initializer_cfg, [[layer.mixer if layer.norm is not None else None, layer.mlp]
                                                  for layer in self.layers])

    def mixers(self) -> list[nn.Module]:
        return [layer.mixer for layer in self.layers]

    def _backbone(self, hidden: torch.Tensor, caches: Any, inputs: list[dict[str, Any]]) -> torch.Tensor:
        residual = None
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            hidden, residual = layer(hidden, residual, inference_params=cache, **inputs[i])
        if self.fused_add_norm:
            weight, bias, eps, is_rms = norm_params(self.norm_f, hidden.dtype)
            return add_norm(hidden, residual, weight, bias, eps, is_rms, residual_in_fp32=self.residual_in_fp32)
        residual = hidden if residual is None else residual + hidden
        if self.residual_in_fp32:
            residual = residual.float()
        return self.norm_f(residual).to(hidden.dtype)

    # ---------------------------------------------------------------- checkpoints

    def checkpoint_config(self) -> dict[str, Any]:
        config = dict(self.config)
        config["mlp_cls"] = _class_path(config["mlp_cls"])
        return config

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> LRNNLMHeadModel:
        config = dict(config)
        valid = set(_init_params(cls)) - {"device", "dtype"}
        unknown = sorted(set(config) - valid)
        missing = sorted(k for k, p in _init_params(cls).items()
                         if p.default is inspect.Parameter.empty and k not in config)
        if unknown or missing:
            raise ValueError(f"LRNNLMHeadModel config: unknown fields {unknown}, missing fields {missing}")
        config["mlp_cls"] = _resolve_class(config.get("mlp_cls"))
        return cls(**config, device=device, dtype=dtype)
