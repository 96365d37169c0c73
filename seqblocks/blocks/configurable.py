"""``ConfigurableBlock``: a residual block assembled from registry components.

The block looks up its attention / mixer, FFN, norm and position classes by the names in a
``BlockConfig`` and builds each from the config. Two layouts::

    pre-norm  (pre_norm=True):  x = x + attention(attn_norm(x));  x = x + ffn(ffn_norm(x))
    post-norm (pre_norm=False): x = attn_norm(x + attention(x));  x = ffn_norm(x + ffn(x))

Dropout (``config.dropout``) applies to each sublayer output before its residual add. A sublayer whose
component is the "none" mixer / FFN is skipped whole, norm included.

The cache is None during training and populated during generation: a call with ``cache=None`` outside
training (``block.eval()`` or under ``torch.no_grad()``) allocates a cache for a causal mixer, fills it
with this call and returns it, so the next call with that cache continues the sequence. In training
mode with gradients on it returns None and allocates nothing.

Shapes: B batch, T time, D width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from seqblocks.config import BlockConfig
from seqblocks.layers.adapters import call_block_attention, follows_contract
from seqblocks.layers.mixer import build_component
from seqblocks.registry import FFNS, MIXERS, NORMS, POSITIONS

__all__ = ["ConfigurableBlock"]


class ConfigurableBlock(nn.Module):
    """A transformer-style block built from a ``BlockConfig``.

    Args:
        config (BlockConfig): names and sizes of the components.
        device, dtype: where and in what dtype to place the parameters. Default: None.

    The position module is built here when it acts inside attention (``rope``, ``alibi``) and handed
    to the attention; additive positions (``sinusoidal``, ``learned``) are added once to the token
    embeddings by the model, so ``self.position`` is None for them.

    Raises:
        ValueError: a name in the config is not registered (the message lists the valid names).
    """

    def __init__(self, config: BlockConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, BlockConfig):
            raise TypeError(f"ConfigurableBlock expects a BlockConfig, got {type(config).__name__}")
        self.config = config
        attn_cls = MIXERS.get(config.attention)
        ffn_cls = FFNS.get(config.ffn)
        norm_cls = NORMS.get(config.norm)
        position_cls = POSITIONS.get(config.position)

        in_block = getattr(position_cls, "kind", None) != "additive"
        self.position = build_component(position_cls, config) if in_block else None
        self.attention = build_component(attn_cls, config, position=self.position)
        self.ffn = build_component(ffn_cls, config)
        self.attn_norm = None if getattr(self.attention, "is_identity", False) else build_component(norm_cls, config)
        self.ffn_norm = None if getattr(self.ffn, "is_identity", False) else build_component(norm_cls, config)
        self.resid_dropout = nn.Dropout(config.dropout)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: Any = None, *,
                fresh_cache: bool | None = None, **mixer_kwargs: Any) -> tuple[torch.Tensor, Any]:
        """Args:
            x (Tensor): [B, T, D].
            mask (Tensor | None): attention mask, passed to the attention. Default: None (the
                attention's own causal / window masking).
            cache: the attention's inference cache, or None. Default: None.
            fresh_cache (bool | None): with ``cache=None``, whether to allocate a cache (of
                ``max(config.max_seq_len, T)`` positions), fill it with this call and return it. None
                does so outside training (``not self.training`` or gradients off) for a causal mixer
                that keeps a cache; False never does (a model's own eval forward). Default: None.
            **mixer_kwargs: further keyword inputs for the mixer (e.g. ``lengths``).

        Returns:
            (out [B, T, D], cache): the cache updated in place (or the one the attention returned); None
            in training without a cache.
        """
        if x.dim() != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"ConfigurableBlock: x must be [B, T, {self.config.d_model}], got {tuple(x.shape)}")
        if fresh_cache not in (None, True, False):
            raise TypeError(f"ConfigurableBlock: fresh_cache must be None or a bool, got {fresh_cache!r}")
        if cache is None and self._wants_fresh_cache(fresh_cache):
            cache = self.allocate_inference_cache(x.shape[0], max(self.config.max_seq_len, x.shape[1]),
                                                  dtype=x.dtype)
        if self.config.pre_norm:
            return self._pre_norm_forward(x, mask, cache, mixer_kwargs)
        return self._post_norm_forward(x, mask, cache, mixer_kwargs)

    def _wants_fresh_cache(self, fresh_cache: bool | None) -> bool:
        if fresh_cache is False or (fresh_cache is None and self.training and torch.is_grad_enabled()):
            return False
        # A BlockConfig attention class returns its own new cache from cache=None (the registry contract).
        able = (self.attn_norm is not None and follows_contract(self.attention)
                and getattr(self.attention, "causal", False) and hasattr(self.attention, "allocate_inference_cache"))
        if fresh_cache and not able:
            raise ValueError(f"ConfigurableBlock: fresh_cache=True, but {type(self.attention).__name__} keeps no "
                             f"cache this block can allocate (a non-causal mixer, or none)")
        return able

    def _pre_norm_forward(self, x, mask, cache, mixer_kwargs):
        if self.attn_norm is not None:
            h, cache = call_block_attention(self.attention, self.attn_norm(x), cache, mask, mixer_kwargs)
            x = x + self.resid_dropout(h)
        if self.ffn_norm is not None:
            x = x + self.resid_dropout(self.ffn(self.ffn_norm(x)))
        return x, cache

    def _post_norm_forward(self, x, mask, cache, mixer_kwargs):
        if self.attn_norm is not None:
            h, cache = call_block_attention(self.attention, x, cache, mask, mixer_kwargs)
            x = self.attn_norm(x + self.resid_dropout(h))
        if self.ffn_norm is not None:
            x = self.ffn_norm(x + self.resid_dropout(self.ffn(x)))
        return x, cache

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> Any:
        """The attention's inference cache."""
        return self.attention.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
