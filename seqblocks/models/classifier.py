"""``Classifier``: sequence classification / regression over any mixers (event-ready: time steps per input).

Input features [B, T, input_dim] (or token ids [B, T] with ``vocab_size``) are projected to d_model,
then each layer computes ``x = norm(x + dropout(mixer(x)))`` and may pool time windows of
``pooling_factor`` steps ("stride", "mean", "max"), which shortens the sequence, its ``lengths`` and
its ``integration_timesteps``. A final pooling ("last", "mean", "max") over each row's valid steps
feeds a linear head. ``save_pretrained`` / ``from_pretrained`` save and load it as every seqblocks
model (``config.json`` with the constructor arguments, ``model.safetensors``).

Event streams: ``integration_timesteps[b, t]`` is the time since the previous event. A pooled window
stands for its last event, so its time delta is the **sum** of the deltas in the window (the time
from the previous window's last event) and total time is preserved. Windows are formed with ceil
mode (a trailing partial window is kept) and only valid (un-padded) steps enter a window's pool and
sum; ``lengths`` become ``ceil(lengths / pooling_factor)``.

Shapes: B batch, T time, D width, S pooling stride, F input features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from seqblocks.checkpoint import CheckpointMixin
from seqblocks.layers.adapters import call_any_mixer
from seqblocks.layers.build import build_mixer, mixer_config, resolve_mixer_kwargs
from seqblocks.layers.checks import check_lengths, check_timesteps
from seqblocks.layers.norm import LayerNorm
from seqblocks.registry import MODELS

__all__ = ["Classifier", "pool_windows", "pool_sequence"]

_FINAL = ("last", "mean", "max")
_INTERMEDIATE = ("none", "stride", "mean", "max")


def _valid_mask(lengths: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    return torch.arange(T, device=device)[None] < lengths[:, None]


def pool_windows(x: torch.Tensor, mode: str, stride: int, lengths: torch.Tensor | None = None,
                 integration_timesteps: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Pool windows of ``stride`` steps: x [B, T, D] -> [B, ceil(T / S), D].

    Args:
        x (Tensor): [B, T, D].
        mode (str): "stride" (each window's last valid step), "mean" or "max" over its valid steps.
        stride (int): window length S >= 1.
        lengths (Tensor | None): [B] valid steps per row. Default: None (all).
        integration_timesteps (Tensor | None): [B, T]; summed over each window's valid steps.
            Default: None.

    Returns:
        (x [B, T', D], lengths [B] = ceil(lengths / S) or None, integration_timesteps [B, T'] or None);
        windows past a row's end are zero.
    """
    if mode not in _INTERMEDIATE[1:]:
        raise ValueError(f"intermediate pooling {mode!r} is unknown; expected one of {_INTERMEDIATE[1:]}")
    B, T, D = x.shape
    Tp = math.ceil(T / stride)
    pad = Tp * stride - T
    valid = _valid_mask(lengths, B, T, x.device)
    valid_w = nn.functional.pad(valid, (0, pad)).view(B, Tp, stride)
    xw = nn.functional.pad(x, (0, 0, 0, pad)).view(B, Tp, stride, D)
    count = valid_w.sum(-1)  # [B, T']
    m = valid_w[..., None]
    if mode == "mean":
        out = (xw * m).sum(2) / count.clamp(min=1)[..., None].to(x.dtype)
    elif mode == "max":
        out = xw.masked_fill(~m, float("-inf")).amax(2)
        out = torch.where(count[..., None] > 0, out, torch.zeros_like(out))
    else:  # valid steps form a prefix of each window: the last one is at count - 1
        last = (count - 1).clamp(min=0)
        out = xw.gather(2, last[..., None, None].expand(B, Tp, 1, D)).squeeze(2)
        out = torch.where(count[..., None] > 0, out, torch.zeros_like(out))
    ts = None
    if integration_timesteps is not None:
        tw = nn.functional.pad(integration_timesteps, (0, pad)).view(B, Tp, stride)
        ts = (tw * valid_w.to(tw.dtype)).sum(-1)
    new_lengths = None if lengths is None else (lengths + stride - 1) // stride
    return out, new_lengths, ts


def pool_sequence(x: torch.Tensor, mode: str, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, T, D] -> [B, D]: the last valid step ("last"), or the mean / max over valid steps."""
    if mode not in _FINAL:
        raise ValueError(f"pooling {mode!r} is unknown; expected one of {_FINAL}")
    B, T, _ = x.shape
    if mode == "last":
        idx = (lengths - 1) if lengths is not None else torch.full((B,), T - 1, device=x.device)
        return x[torch.arange(B, device=x.device), idx]
    valid = _valid_mask(lengths, B, T, x.device)[..., None]
    if mode == "mean":
        return (x * valid).sum(1) / valid.sum(1).clamp(min=1).to(x.dtype)
    return x.masked_fill(~valid, float("-inf")).amax(1)


@MODELS.register("Classifier")
class Classifier(nn.Module, CheckpointMixin, library_name="seqblocks", tags=["seqblocks", "classifier"]):
    """Sequence classifier / regressor over a stack of mixers.

    Args:
        input_dim (int | None): input features F (unused with ``vocab_size``). Default: None.
        num_classes (int): classes; 0 for regression. Default: 0.
        output_dim (int): regression outputs when ``num_classes`` is 0. Default: 1.
        d_model (int): width. Default: 128.
        d_state (int): state width, given to mixers whose constructor names it. Default: 64.
        n_layers (int): layers. Default: 4.
        lrnn_cls (str | type | list): a registered mixer name or an nn.Module class, or one per layer.
            Default: "LRU".
        pooling (str): final pooling, "last" / "mean" / "max". Default: "last".
        dropout (float): on each mixer output (and the token embeddings). Default: 0.1.
        intermediate_pooling (str | list[str]): per-layer pooling after the block: "none", "stride",
            "mean", "max". Default: "none".
        pooling_factor (int | list[int]): per-layer window length S. Default: 2.
        vocab_size (int | None): token-id input with an embedding of this size. Default: None.
        embedding_dim (int | None): embedding width (projected to d_model). Default: None (d_model).
        max_position_embeddings (int | None): add learned positions to token embeddings. Default: None.
        padding_idx (int | None): embedding padding index. Default: 0.
        lrnn_params (dict | None): mixer constructor kwargs, per mixer type or one dict for all (as
            ``LRNNLMHeadModel``'s ``mixer_kwargs``). Default: None.
        device, dtype: parameter placement. Default: None.
    """

    def __init__(
        self,
        input_dim: int | None = None,
        num_classes: int = 0,
        output_dim: int = 1,
        d_model: int = 128,
        d_state: int = 64,
        n_layers: int = 4,
        lrnn_cls: Any = "LRU",
        pooling: str = "last",
        dropout: float = 0.1,
        intermediate_pooling: str | Sequence[str] = "none",
        pooling_factor: int | Sequence[int] = 2,
        vocab_size: int | None = None,
        embedding_dim: int | None = None,
        max_position_embeddings: int | None = None,
        padding_idx: int | None = 0,
        lrnn_params: dict | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_args = {
            "input_dim": input_dim, "num_classes": num_classes, "output_dim": output_dim, "d_model": d_model,
            "d_state": d_state, "n_layers": n_layers, "lrnn_cls": lrnn_cls, "pooling": pooling, "dropout": dropout,
            "intermediate_pooling": intermediate_pooling, "pooling_factor": pooling_factor, "vocab_size": vocab_size,
            "embedding_dim": embedding_dim, "max_position_embeddings": max_position_embeddings,
            "padding_idx": padding_idx, "lrnn_params": lrnn_params}
        if n_layers <= 0 or d_model <= 0:
            raise ValueError(f"Classifier: n_layers={n_layers} and d_model={d_model} must be positive")
        if pooling not in _FINAL:
            raise ValueError(f"Classifier: pooling={pooling!r}; expected one of {_FINAL}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Classifier: dropout={dropout} must lie in [0, 1)")
        classes = list(lrnn_cls) if isinstance(lrnn_cls, list | tuple) else [lrnn_cls] * n_layers
        pools = ([intermediate_pooling] * n_layers if isinstance(intermediate_pooling, str)
                 else list(intermediate_pooling))
        factors = [pooling_factor] * n_layers if isinstance(pooling_factor, int) else list(pooling_factor)
        for name, values in (("lrnn_cls", classes), ("intermediate_pooling", pools), ("pooling_factor", factors)):
            if len(values) != n_layers:
                raise ValueError(f"Classifier: {name} has {len(values)} entries, n_layers={n_layers}")
        for p in pools:
            if p not in _INTERMEDIATE:
                raise ValueError(f"Classifier: intermediate_pooling {p!r}; expected one of {_INTERMEDIATE}")
        for f in factors:
            if not isinstance(f, int) or f < 1:
                raise ValueError(f"Classifier: pooling_factor {f!r} must be a positive int")
        params = dict(lrnn_params or {})
        if params.get("d_model", d_model) != d_model:
            raise ValueError(f"Classifier: lrnn_params d_model={params['d_model']} != d_model={d_model}")
        params.pop("d_model", None)
        params_state = params.pop("d_state", d_state) if not _is_per_type(params) else d_state
        factory = {"device": device, "dtype": dtype}

        self.d_model, self.pooling = d_model, pooling
        self.has_embedding = vocab_size is not None
        if self.has_embedding:
            emb_dim = embedding_dim or d_model
            self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=padding_idx, **factory)
            self.position = (nn.Embedding(max_position_embeddings, emb_dim, **factory)
                             if max_position_embeddings else None)
            self.input_proj = nn.Linear(emb_dim, d_model, **factory) if emb_dim != d_model else nn.Identity()
        else:
            if not isinstance(input_dim, int) or input_dim <= 0:
                raise ValueError(f"Classifier: input_dim={input_dim!r} must be a positive int (or give vocab_size)")
            self.embedding = self.position = None
            self.input_proj = nn.Linear(input_dim, d_model, **factory)
        self.input_dropout = nn.Dropout(dropout)
        per_layer = resolve_mixer_kwargs(classes, params if params else None)
        self.mixers = nn.ModuleList(
            build_mixer(c, mixer_config(c, d_model, d_state=params_state, kwargs=kw, causal=False), layer_idx=i,
                        causal=False, **factory)
            for i, (c, kw) in enumerate(zip(classes, per_layer))
        )
        self.norms = nn.ModuleList(LayerNorm(d_model, **factory) for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)
        self.intermediate_pooling, self.pooling_factor = pools, factors
        self.head = nn.Linear(d_model, num_classes if num_classes > 0 else output_dim, **factory)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None,
                integration_timesteps: torch.Tensor | None = None, return_hidden: bool = False,
                ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Args:
            x (Tensor): [B, T, F] features, or [B, T] token ids with ``vocab_size``.
            lengths (Tensor | None): [B] valid steps per row, in [1, T] (pooling needs a step). Default: None.
            integration_timesteps (Tensor | None): [B, T] time since the previous step (events).
                Default: None.
            return_hidden (bool): also return the hidden states. Default: False.

        Returns:
            Tensor: [B, num_classes] logits (or [B, output_dim]); with ``return_hidden``,
            ``(logits, hidden_states)``: the input of each layer (the projected input first), then the
            last layer's output, which the final pooling reads; n_layers + 1 tensors [B, T_i, d_model]
            (T_i shrinks after a layer with intermediate pooling).
        """
        if self.has_embedding:
            if x.dim() != 2 or x.dtype.is_floating_point:
                raise ValueError(f"Classifier with vocab_size expects token ids [B, T], got {x.dtype} {tuple(x.shape)}")
            h = self.embedding(x)
            if self.position is not None:
                h = h + self.position(torch.arange(x.shape[1], device=x.device))[None]
            h = self.input_proj(h)
        else:
            if x.dim() != 3 or x.shape[-1] != self.input_proj.in_features:
                raise ValueError(f"Classifier expects x of shape [B, T, {self.input_proj.in_features}], "
                                 f"got {tuple(x.shape)}")
            h = self.input_proj(x)
        B, T = h.shape[:2]
        check_lengths("Classifier", lengths, B, T)
        check_timesteps("Classifier", integration_timesteps, B, T)
        if lengths is not None:
            if int(lengths.min()) < 1:
                raise ValueError(f"Classifier: every row needs a step to pool (lengths >= 1), got {lengths.tolist()}")
            lengths = lengths.to(device=h.device, dtype=torch.long)
        h = self.input_dropout(h)
        hidden_states = []
        for mixer, norm, mode, stride in zip(self.mixers, self.norms, self.intermediate_pooling, self.pooling_factor):
            hidden_states.append(h)
            declared = getattr(mixer, "inputs", frozenset())
            inputs = {k: v for k, v in (("lengths", lengths), ("integration_timesteps", integration_timesteps))
                      if v is not None and k in declared}
            y = call_any_mixer(mixer, h, None, inputs)
            h = norm(h + self.dropout(y))
            if mode != "none":
                h, lengths, integration_timesteps = pool_windows(h, mode, stride, lengths, integration_timesteps)
        logits = self.head(pool_sequence(h, self.pooling, lengths))
        return (logits, (*hidden_states, h)) if return_hidden else logits

    def checkpoint_config(self) -> dict[str, Any]:
        """The constructor arguments.

        Raises:
            ValueError: a mixer given as a class rather than a registered name (a checkpoint names
                mixers, it never stores or imports code).
        """
        classes = self._init_args["lrnn_cls"]
        for c in classes if isinstance(classes, list | tuple) else [classes]:
            if not isinstance(c, str):
                raise ValueError(f"Classifier: lrnn_cls {c!r} is a class; a checkpoint names mixers by their "
                                 f"registered name (register it with seqblocks.registry.mixer_registry)")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._init_args.items()}

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> Classifier:
        return cls(**config, device=device, dtype=dtype)


def _is_per_type(params: dict[str, Any]) -> bool:
    from seqblocks.registry import MIXERS

    return any(isinstance(k, str) and k in MIXERS and isinstance(v, dict) for k, v in params.items())
