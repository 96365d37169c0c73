"""Chunked local attention (Llama 4): ``ChunkedGQA``, registered as "chunked_gqa".

The sequence is cut into chunks of ``attention_chunk_size`` positions (0..C-1, C..2C-1, ...); a query
attends causally to the keys of its own chunk only, so each chunk is an independent causal attention.
Llama 4 interleaves such layers (with RoPE) with global attention layers without positions (NoPE) -
its "iRoPE" layout, which a model expresses per layer: ``position="none"`` (``ConfigurableBlock``) or no
``rotary_emb_dim`` (``LRNNLMHeadModel``) on the global layers; ``LanguageModelConfig.from_pattern(...,
irope=True)`` does it for a pattern.

Why a window cache is enough: a query at p sees at most the C - 1 keys before it (those of its chunk), so
decoding keeps a ``RollingKVCache`` of C slots and masks the slots of the previous chunk. The layer is
``MHA`` with ``window_size = C`` (the cache, and the rule that a non-finite key poisons at most the C
queries from it on) plus ``chunked_causal_mask(C)`` as a mask mod at token indices, so a full pass and
token-by-token decoding see the same keys. RoPE keeps absolute positions: rotary scores depend only on
the distance q - k, so chunk-local positions (``pos % C``) give the same scores.

Shapes: B batch, T time, D model width.
"""

from __future__ import annotations

from typing import Any

from seqblocks.layers.attention.mha import GQA
from seqblocks.layers.attention.score_mods import and_masks, chunked_causal_mask
from seqblocks.registry import MIXERS

__all__ = ["ChunkedGQA"]


@MIXERS.register("chunked_gqa")
class ChunkedGQA(GQA):
    """Grouped-query attention restricted to causal attention within chunks of ``attention_chunk_size``.

    Args:
        embed_dim (int): model width D.
        num_heads (int): query heads. Required.
        attention_chunk_size (int): chunk length C (``BlockConfig.attention_chunk_size``); a query at
            position p sees the keys at positions ``C * (p // C) .. p``. Required.
        mask_mod (Callable | None): a further mask mod, intersected with the chunk mask. Default: None.
        *args, **kwargs: the other ``MHA`` arguments (``window_size`` excepted: the chunk is the window).

    Raises:
        ValueError: ``attention_chunk_size`` missing or not a positive int; a ``window_size`` given;
            ``causal=False``; ``attention_type="linear"``.
    """

    def __init__(self, embed_dim: int, num_heads: int | None = None, *args: Any,
                 attention_chunk_size: int | None = None, window_size: int | None = None, mask_mod=None,
                 **kwargs: Any) -> None:
        C = attention_chunk_size
        if C is None:
            raise ValueError("ChunkedGQA needs attention_chunk_size (BlockConfig.attention_chunk_size or "
                             "attention_chunk_size=...)")
        if isinstance(C, bool) or not isinstance(C, int) or C <= 0:
            raise ValueError(f"ChunkedGQA: attention_chunk_size={C!r} must be a positive int")
        if window_size is not None:
            raise ValueError(f"ChunkedGQA: window_size={window_size} and attention_chunk_size={C} both given; "
                             f"a chunked layer's window is its chunk")
        if kwargs.get("causal", True) is False:
            raise ValueError("ChunkedGQA is causal; causal=False is not supported")
        chunk = chunked_causal_mask(C)
        super().__init__(embed_dim, num_heads, *args, window_size=C,
                         mask_mod=chunk if mask_mod is None else and_masks(chunk, mask_mod), **kwargs)
        self.attention_chunk_size = C

    @classmethod
    def _config_overrides(cls, config) -> dict[str, Any]:
        return {"attention_chunk_size": config.attention_chunk_size}

    @classmethod
    def _linear_alias(cls, args: tuple, kwargs: dict[str, Any]):
        raise ValueError("ChunkedGQA: attention_type='linear' has no chunks (kernelized attention sees every "
                         "earlier token); use LinearAttention ('linear_attention')")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, attention_chunk_size={self.attention_chunk_size}"
