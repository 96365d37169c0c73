"""Attention mixers, their caches and FlexAttention-style score / mask mods.

Modules: ``mha`` (MHA / GQA / MQA / sliding window), ``chunked`` (Llama-4 chunked local attention),
``sparse`` (top-k sparse attention with a lightning indexer), ``mla``, ``cross_attention``, ``linear_attention``,
``common`` (what they share), ``cache``, ``score_mods``, ``attention_fn`` (a kernel of one's own).
"""

from seqblocks.layers.attention.attention_fn import standard_attention_fn
from seqblocks.layers.attention.cache import (
    CrossAttentionCache,
    KVCache,
    LinearAttentionCache,
    MLACache,
    RollingKVCache,
)
from seqblocks.layers.attention.chunked import ChunkedGQA
from seqblocks.layers.attention.cross_attention import CrossAttention
from seqblocks.layers.attention.linear_attention import LinearAttention
from seqblocks.layers.attention.mha import GQA, MHA, MQA, SlidingWindowAttention
from seqblocks.layers.attention.mla import MLA
from seqblocks.layers.attention.score_mods import (
    additive_bias,
    alibi_score_mod,
    and_masks,
    causal_mask,
    chunked_causal_mask,
    compose,
    document_mask,
    mask_mod_to_boolean_mask,
    mask_mod_to_score_mod,
    or_masks,
    prefix_lm_mask,
    sliding_window_mask,
    soft_cap,
)
from seqblocks.layers.attention.sparse import SparseGQA, SparseKVCache

__all__ = ["MHA", "GQA", "MQA", "MLA", "SlidingWindowAttention", "ChunkedGQA", "SparseGQA", "SparseKVCache",
           "chunked_causal_mask", "CrossAttention", "LinearAttention", "KVCache",
           "RollingKVCache", "MLACache", "LinearAttentionCache", "CrossAttentionCache", "causal_mask",
           "sliding_window_mask", "prefix_lm_mask", "document_mask", "alibi_score_mod", "soft_cap", "additive_bias",
           "compose", "and_masks", "or_masks", "mask_mod_to_score_mod", "mask_mod_to_boolean_mask",
           "standard_attention_fn"]
