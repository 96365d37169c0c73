"""``Forecaster``: real-valued sequence models on any mixers, and ``generate_continuous``.

A forecaster maps observations ``x`` [B, T, F] to predictions [B, T, F_out]: an input projection of
the features to ``d_model``, a stack of ``Block`` s (Add -> Norm -> Mixer, optionally -> MLP) over any
registered causal mixers, a final norm and a linear head. Output t predicts sample t + 1 (with
``F_out == F`` the head predicts the increment ``x_{t+1} - x_t``, starting at zero, i.e. at the
"last value" forecast).

Irregular sampling: ``integration_timesteps[:, t]`` is the time from sample t to sample t + 1, the one
output t predicts. Reading sample t, an event-form mixer (S5, Mamba) advances its state over exactly
that interval (``Ā = exp(Λ Δ τ_t)``), so the state is "at" the time of the prediction. Mixers without
an event form (LRU, attention, ...) do not declare the input and never see it.

``generate_continuous(model, x, num_steps)`` (also reached through ``seqblocks.generate``) feeds each
prediction back as the next input: a prefill of the context, then one ``step`` per new sample over
preallocated caches. Running ``forward`` on the context followed by the generated samples gives the
same predictions (teacher forcing == step-by-step; tested).

Shapes: B batch, T time, F features, D width, N new samples.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from seqblocks.blocks import Block
from seqblocks.cache import InferenceCaches
from seqblocks.checkpoint import CheckpointMixin
from seqblocks.layers.build import build_mixer, mixer_config, resolve_mixer_kwargs
from seqblocks.layers.checks import check_allocation
from seqblocks.layers.norm import LayerNorm, RMSNorm, norm_params
from seqblocks.ops.add_norm import add_norm
from seqblocks.registry import MIXERS, MLPS, MODELS

__all__ = ["Forecaster", "generate_continuous"]


@MODELS.register("Forecaster")
class Forecaster(nn.Module, CheckpointMixin, library_name="seqblocks", tags=["seqblocks", "forecaster"]):
    """Real-valued next-sample forecaster over any causal mixers (see the module docstring).

    Args:
        input_dim (int): features F per sample.
        d_model (int): width D. Default: 64.
        n_layer (int): blocks. Default: 2.
        mixer_types (str | Sequence[str]): a registered causal mixer name for every layer, or one per
            layer ("S5", "Mamba", "LRU", "attn", ...). Default: "S5".
        output_dim (int | None): predicted features F_out. Default: None (= input_dim).
        d_state (int): state width for the mixers whose config has ``d_state``. Default: 16.
        d_intermediate (int): hidden width of a gated MLP after each mixer; 0 for none. Default: 0.
        mixer_kwargs (dict | None): mixer config values, per mixer type or one dict for all (as
            ``LRNNLMHeadModel``'s). Default: None.
        predict_increment (bool): with F_out == F, predict ``x_{t+1} - x_t`` and add ``x_t`` (the head
            starts at zero). Default: True.
        rms_norm (bool): RMSNorm instead of LayerNorm. Default: True.
        norm_epsilon (float): norm epsilon. Default: 1e-5.
        device, dtype: parameter placement. Default: None.

    Raises:
        ValueError: non-positive sizes, a mixer list of the wrong length, unknown mixers or keys, a
            non-causal mixer.
    """

    #: ``seqblocks.generate`` dispatches real-valued models to ``generate_continuous``.
    continuous_outputs = True

    def __init__(self, input_dim: int, d_model: int = 64, n_layer: int = 2, mixer_types: str | Sequence[str] = "S5",
                 output_dim: int | None = None, d_state: int = 16, d_intermediate: int = 0,
                 mixer_kwargs: dict | None = None, predict_increment: bool = True, rms_norm: bool = True,
                 norm_epsilon: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        output_dim = input_dim if output_dim is None else output_dim
        for name, value in (("input_dim", input_dim), ("d_model", d_model), ("n_layer", n_layer),
                            ("output_dim", output_dim), ("d_state", d_state)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Forecaster: {name} must be a positive int, got {value!r}")
        if not isinstance(d_intermediate, int) or d_intermediate < 0:
            raise ValueError(f"Forecaster: d_intermediate must be an int >= 0, got {d_intermediate!r}")
        types = [mixer_types] * n_layer if isinstance(mixer_types, str) else list(mixer_types)
        if len(types) != n_layer or not all(isinstance(t, str) for t in types):
            raise ValueError(f"Forecaster: mixer_types must be a mixer name or {n_layer} names (n_layer), got "
                             f"{mixer_types!r}")
        for t in types:
            if t not in MIXERS:
                raise ValueError(f"Forecaster: unknown mixer {t!r}; registered: {MIXERS.keys()}")
        self.input_dim, self.output_dim, self.d_model, self.n_layer = input_dim, output_dim, d_model, n_layer
        self.mixer_types, self.d_state, self.d_intermediate = types, d_state, d_intermediate
        self.mixer_kwargs = dict(mixer_kwargs) if mixer_kwargs is not None else None
        self.predict_increment = bool(predict_increment) and output_dim == input_dim
        self._increment_arg = bool(predict_increment)
        self.rms_norm, self.norm_epsilon = bool(rms_norm), float(norm_epsilon)
        kw = {"device": device, "dtype": dtype}
        norm_cls = functools.partial(RMSNorm if rms_norm else LayerNorm, eps=norm_epsilon, **kw)
        mlp_cls = (functools.partial(MLPS.get("gated_mlp"), hidden_features=d_intermediate, out_features=d_model, **kw)
                   if d_intermediate > 0 else nn.Identity)

        def block(i: int, name: str, extra: dict[str, Any]) -> Block:
            config = mixer_config(name, d_model, d_state=d_state, kwargs=extra, causal=True)
            mixer = build_mixer(name, config, layer_idx=i, causal=True, **kw)
            return Block(d_model, mixer_cls=lambda _dim: mixer, mlp_cls=mlp_cls, norm_cls=norm_cls)

        self.in_proj = nn.Linear(input_dim, d_model, **kw)
        per_layer = resolve_mixer_kwargs(types, self.mixer_kwargs)
        self.layers = nn.ModuleList(block(i, t, extra) for i, (t, extra) in enumerate(zip(types, per_layer)))
        self.norm_f = norm_cls(d_model)
        self.head = nn.Linear(d_model, output_dim, **kw)
        if self.predict_increment:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def mixers(self) -> list[nn.Module]:
        return [layer.mixer for layer in self.layers]

    def event_form(self) -> bool:
        """Whether some mixer takes ``integration_timesteps`` (S5, Mamba)."""
        return any("integration_timesteps" in getattr(m, "inputs", frozenset()) for m in self.mixers())

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, integration_timesteps: torch.Tensor | None = None,
                inference_params: InferenceCaches | None = None) -> torch.Tensor:
        """Predict the next sample at every position.

        Args:
            x (Tensor): [B, T, F] observations, any float dtype.
            integration_timesteps (Tensor | None): [B, T] non-negative time from each sample to the next
                (the one predicted there); reaches only the mixers that declare it. Default: None
                (regular sampling, every interval 1).
            inference_params (InferenceCaches | None): caches from ``allocate_inference_cache``; the call
                then continues them in place (a prefill). Default: None.

        Returns:
            Tensor: [B, T, F_out] in x's dtype; row t predicts sample t + 1.

        Raises:
            ValueError / TypeError: x or integration_timesteps of the wrong shape or dtype, caches of
                another batch size or too small.
        """
        B, T = self._check(x, integration_timesteps)
        if inference_params is not None:
            self._check_caches(inference_params, B, T)
        return self._run(x, integration_timesteps, inference_params)

    def step(self, x: torch.Tensor, caches: InferenceCaches,
             integration_timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one sample per row, [B, 1, F] (or [B, F]), and advance ``caches`` in place.

        Args:
            integration_timesteps (Tensor | None): [B, 1] (or [B]) the time to the sample predicted.
                Default: None.

        Returns:
            Tensor: [B, 1, F_out], the prediction of the next sample.
        """
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            x = x[:, None]
        if isinstance(integration_timesteps, torch.Tensor) and integration_timesteps.dim() == 1:
            integration_timesteps = integration_timesteps[:, None]
        B, T = self._check(x, integration_timesteps)
        if T != 1:
            raise ValueError(f"Forecaster.step feeds one sample per row, [B, 1, F]; got {tuple(x.shape)}")
        self._check_caches(caches, B, 1)
        return self._run(x, integration_timesteps, caches)

    def _run(self, x: torch.Tensor, ts: torch.Tensor | None, caches: InferenceCaches | None) -> torch.Tensor:
        w = self.in_proj.weight
        u = x.to(w.dtype)
        hidden = self.in_proj(u)  # [B, T, D]
        residual = None
        for i, layer in enumerate(self.layers):
            inputs = {"integration_timesteps": ts} if ts is not None and _takes_timesteps(layer.mixer) else {}
            cache = caches[i] if caches is not None else None
            hidden, residual = layer(hidden, residual, inference_params=cache, **inputs)
        weight, bias, eps, is_rms = norm_params(self.norm_f, hidden.dtype)
        hidden = add_norm(hidden, residual, weight, bias, eps, is_rms)
        y = self.head(hidden.to(self.head.weight.dtype))  # [B, T, F_out]
        if self.predict_increment:
            y = y + u
        if caches is not None:
            caches.seqlen_offset.add_(x.shape[1])
        return y.to(x.dtype)

    def _check(self, x: Any, ts: Any) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"Forecaster expects real-valued samples (a floating-point tensor), got {got}")
        if x.dim() != 3 or x.shape[-1] != self.input_dim or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"Forecaster expects x of shape [B, T, F={self.input_dim}] with B, T >= 1, "
                             f"got {tuple(x.shape)}")
        B, T = x.shape[:2]
        if ts is not None:
            if not isinstance(ts, torch.Tensor) or not ts.is_floating_point():
                raise TypeError(f"Forecaster: integration_timesteps must be a floating-point tensor, got "
                                f"{ts.dtype if isinstance(ts, torch.Tensor) else type(ts).__name__}")
            if tuple(ts.shape) != (B, T):
                raise ValueError(f"Forecaster: integration_timesteps must have shape [B, T] = [{B}, {T}], got "
                                 f"{tuple(ts.shape)}")
            if bool((ts < 0).any()) or not bool(torch.isfinite(ts).all()):
                raise ValueError("Forecaster: integration_timesteps must be finite and non-negative")
        return B, T

    # ---------------------------------------------------------------- inference

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> InferenceCaches:
        """Preallocated caches for ``batch_size`` rows of up to ``max_seqlen`` samples."""
        check_allocation("Forecaster", batch_size, max_seqlen, dtype)
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        caches = {i: m.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
                  for i, m in enumerate(self.mixers())}
        offset = torch.zeros(batch_size, dtype=torch.long, device=self.in_proj.weight.device)
        return InferenceCaches(caches, offset, max_seqlen)

    def _check_caches(self, caches: Any, B: int, T: int) -> None:
        if not isinstance(caches, InferenceCaches) or sorted(caches) != list(range(self.n_layer)):
            raise TypeError(f"Forecaster: caches must be the InferenceCaches of allocate_inference_cache, got "
                            f"{type(caches).__name__}")
        if caches.batch_size != B:
            raise ValueError(f"Forecaster: caches were allocated for batch size {caches.batch_size}, input has {B}")
        used = int(caches.seqlen_offset.max())
        if used + T > caches.max_seqlen:
            raise ValueError(f"Forecaster: caches hold at most max_seqlen={caches.max_seqlen} samples; {used} are "
                             f"cached and {T} more were given")

    # ---------------------------------------------------------------- checkpoints

    def checkpoint_config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "d_model": self.d_model, "n_layer": self.n_layer,
                "mixer_types": list(self.mixer_types), "output_dim": self.output_dim, "d_state": self.d_state,
                "d_intermediate": self.d_intermediate, "mixer_kwargs": self.mixer_kwargs,
                "predict_increment": self._increment_arg, "rms_norm": self.rms_norm,
                "norm_epsilon": self.norm_epsilon}

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> Forecaster:
        known = {"input_dim", "d_model", "n_layer", "mixer_types", "output_dim", "d_state", "d_intermediate",
                 "mixer_kwargs", "predict_increment", "rms_norm", "norm_epsilon"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Forecaster: unknown config keys {unknown}; expected {sorted(known)}")
        if "input_dim" not in config:
            raise ValueError("Forecaster: the config has no input_dim")
        return cls(**config, device=device, dtype=dtype)


def _takes_timesteps(mixer: nn.Module) -> bool:
    return "integration_timesteps" in getattr(mixer, "inputs", frozenset())


@torch.no_grad()
def generate_continuous(model: Any, x: torch.Tensor, num_steps: int,
                        integration_timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """Autoregressive real-valued generation: each prediction is fed back as the next input.

    Args:
        model: a ``Forecaster`` (anything with its ``forward`` / ``step`` / ``allocate_inference_cache``),
            with output features == input features.
        x (Tensor): [B, F] one seed sample, or [B, T, F] a context.
        num_steps (int): N samples to generate.
        integration_timesteps (Tensor | None): the time from each fed sample to the next: [B] or [B, 1]
            (one interval, used at every position), or [B, T + N - 1] (per position: the T context
            samples, then the N - 1 generated samples that are fed back). Default: None (regular).

    Returns:
        Tensor: [B, N, F] in x's dtype: sample T (the first prediction) to sample T + N - 1.

    Raises:
        ValueError / TypeError: bad shapes, a non-positive ``num_steps``, or a model whose outputs cannot
            be fed back (output features != input features).
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps <= 0:
        raise ValueError(f"generate_continuous: num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"generate_continuous: x must be [B, F] or [B, T, F], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if getattr(model, "output_dim", None) != getattr(model, "input_dim", None):
        raise ValueError(f"generate_continuous: the model predicts {model.output_dim} features from "
                         f"{model.input_dim}; feeding outputs back needs them equal")
    if x.dim() == 2:
        x = x[:, None]
    B, T, _ = x.shape
    total = T + num_steps - 1  # positions fed to the model
    ts = integration_timesteps
    if ts is not None:
        if not isinstance(ts, torch.Tensor):
            raise TypeError(f"generate_continuous: integration_timesteps must be a tensor, got {type(ts).__name__}")
        if ts.dim() == 1:
            ts = ts[:, None]
        if ts.dim() != 2 or ts.shape[0] != B or ts.shape[1] not in (1, total):
            raise ValueError(f"generate_continuous: integration_timesteps must be [B], [B, 1] or [B, T + N - 1] = "
                             f"[{B}, {total}], got {tuple(integration_timesteps.shape)}")
        ts = ts.expand(B, total).to(device=x.device)
    was_training = model.training
    model.eval()
    try:
        caches = model.allocate_inference_cache(B, total)
        y = model(x, integration_timesteps=None if ts is None else ts[:, :T].contiguous(),
                  inference_params=caches)[:, -1:]  # [B, 1, F]
        out = [y]
        for k in range(1, num_steps):
            step_ts = None if ts is None else ts[:, T + k - 1:T + k].contiguous()
            y = model.step(y, caches, integration_timesteps=step_ts)
            out.append(y)
    finally:
        model.train(was_training)
    return torch.cat(out, 1)
