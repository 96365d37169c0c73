"""``Block``: the Add -> Norm -> Mixer residual block (mamba_ssm's layout).

A standard pre-norm block computes ``x = x + mixer(norm(x))``. This block instead receives the
previous block's branch output ``hidden_states`` and the residual stream ``residual`` separately,
and starts with the add::

    residual = hidden_states + residual        # Add
    hidden_states = mixer(norm(residual))      # Norm -> Mixer
    residual = hidden_states + residual        # Add   (only with an MLP)
    hidden_states = mlp(norm2(residual))       # Norm -> MLP

The stream value is the same as pre-norm's, but the add and the following norm are now adjacent, so
they run as one op (``seqblocks.ops.add_norm``), where a kernel can read and write each tensor once. The
last block's ``hidden_states + residual`` is added by the model's final norm.

A decode step of a mixer that can take the add and the norm into its own fused step (``Mamba``'s
``add_norm_step``, with ``Mamba.fold_in_proj`` set) hands them over: with ``fused_add_norm=True`` the
block's first half is then the mixer's launches alone (docs/kernels.md, "Decode step kernels").

Shapes: B batch, T time, D width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seqblocks.layers.adapters import call_any_mixer
from seqblocks.layers.norm import NormBase, is_fusable_norm, norm_params
from seqblocks.ops.add_norm import add_norm

__all__ = ["Block"]


class Block(nn.Module):
    """Residual block Add -> Norm -> Mixer, then (with an MLP) Add -> Norm -> MLP.

    Args:
        dim (int): model width D; every component is constructed as ``cls(dim)``.
        mixer_cls (Callable[[int], nn.Module]): the mixer (attention, a linear RNN, ...). A mixer with
            ``is_identity = True`` (the "none" mixer) is skipped: no add, no norm.
        mlp_cls (Callable[[int], nn.Module]): the MLP, or ``nn.Identity`` for none.
        norm_cls (Callable[[int], nn.Module]): ``nn.LayerNorm``, ``nn.RMSNorm`` or seqblocks'
            ``LayerNorm`` / ``RMSNorm`` (any norm when ``fused_add_norm=False``). Default: nn.LayerNorm.
        fused_add_norm (bool): run add + norm as one op. Works on CPU too (PyTorch path) and gives the
            same numbers as the unfused path. Default: True.
        residual_in_fp32 (bool): keep the residual stream in fp32. Default: False.

    Raises:
        ValueError: ``fused_add_norm=True`` with a norm ``ops.add_norm`` cannot stand in for.
    """

    def __init__(
        self,
        dim: int,
        mixer_cls: Callable[[int], nn.Module],
        mlp_cls: Callable[[int], nn.Module],
        norm_cls: Callable[[int], nn.Module] = nn.LayerNorm,
        fused_add_norm: bool = True,
        residual_in_fp32: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"Block: dim={dim!r} must be a positive int")
        self.dim = dim
        self.fused_add_norm = fused_add_norm
        self.residual_in_fp32 = residual_in_fp32
        self.mixer = mixer_cls(dim)
        self.norm = None if getattr(self.mixer, "is_identity", False) else norm_cls(dim)
        mlp = None if mlp_cls is None or mlp_cls is nn.Identity else mlp_cls(dim)
        self.mlp = None if isinstance(mlp, nn.Identity) else mlp
        self.norm2 = norm_cls(dim) if self.mlp is not None else None
        if fused_add_norm:
            for norm in (self.norm, self.norm2):
                if norm is not None and not is_fusable_norm(norm):
                    raise ValueError(
                        f"Block: fused_add_norm=True needs a LayerNorm or RMSNorm, got {type(norm).__name__}; "
                        f"pass fused_add_norm=False to use it"
                    )

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None = None,
        inference_params: Any = None,
        **mixer_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args:
            hidden_states (Tensor): [B, T, D] the previous block's output (or the embeddings).
            residual (Tensor | None): [B, T, D] the residual stream; None for the first block, which
                then takes ``hidden_states`` as the residual. Default: None.
            inference_params: the mixer's cache (from ``allocate_inference_cache``); the call then
                prefills / steps it. Default: None.
            **mixer_kwargs: optional mixer inputs (``lengths``, ...); one the mixer does not declare in
                ``Mixer.inputs`` raises ``TypeError``.

        Returns:
            (hidden_states [B, T, D], residual [B, T, D]); residual is fp32 under ``residual_in_fp32``.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.dim:
            raise ValueError(f"Block({self.dim}): hidden_states must be [B, T, {self.dim}], "
                             f"got {tuple(hidden_states.shape)}")
        if residual is not None and residual.shape != hidden_states.shape:
            raise ValueError(f"Block: residual shape {tuple(residual.shape)} != hidden_states shape "
                             f"{tuple(hidden_states.shape)}")
        fused_step = self._fused_step(hidden_states, residual, inference_params, mixer_kwargs)
        if fused_step is not None:
            hidden_states, residual = fused_step
        elif self.norm is not None:
            hidden_states, residual = self._add_norm(hidden_states, residual, self.norm)
            hidden_states = call_any_mixer(self.mixer, hidden_states, inference_params, mixer_kwargs)
        if self.mlp is not None:
            hidden_states, residual = self._add_norm(hidden_states, residual, self.norm2)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def _fused_step(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, inference_params: Any,
                    mixer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        # A decode step (one token, a cache, no optional inputs) of a mixer that can take the add and the
        # norm into its own step (``Mamba.add_norm_step``); None: the usual add_norm, then the mixer. The
        # mixer decides whether it computes the same there, and returns None where it would not.
        step = getattr(self.mixer, "add_norm_step", None)
        if (step is None or not self.fused_add_norm or self.norm is None or inference_params is None
                or hidden_states.shape[1] != 1 or any(v is not None for v in mixer_kwargs.values())):
            return None
        return step(hidden_states, residual, self.norm, self.residual_in_fp32, inference_params)

    def _add_norm(self, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                  norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_add_norm:
            weight, bias, eps, is_rms = norm_params(norm, hidden_states.dtype)
            return add_norm(hidden_states, residual, weight, bias, eps, is_rms,
                            residual_in_fp32=self.residual_in_fp32, prenorm=True)
        # The unfused twin: the same math, one step per line.
        residual = hidden_states if residual is None else residual + hidden_states
        if self.residual_in_fp32:
            residual = residual.float()
        normed = norm(residual if isinstance(norm, NormBase) else residual.to(norm.weight.dtype))
        return normed.to(hidden_states.dtype), residual

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> Any:
        """The mixer's inference cache (e.g. a KV cache for attention, a state for a linear RNN)."""
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
