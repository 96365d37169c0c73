"""nn.Modules, one concept per file. Importing this package registers every built-in component."""

from seqblocks.layers.attention import MHA, MLA, CrossAttention, SlidingWindowAttention
from seqblocks.layers.ffn import FFNBase, GatedMLP
from seqblocks.layers.mixer import AttentionBase, IdentityMixer, Mixer
from seqblocks.layers.mixers import LRU, RGLRU, S4, S4D, S5, S7, Centaurus, Mamba
from seqblocks.layers.moe import LatentMoEFeedForward, MoEFeedForward, SharedMoEFeedForward
from seqblocks.layers.norm import LayerNorm, RMSNorm
from seqblocks.layers.position import (
    ALiBi,
    LearnedPosition,
    NoPosition,
    PositionBase,
    RotaryEmbedding,
    SinusoidalPosition,
)

__all__ = ["LRU", "S4", "S4D", "S5", "Centaurus",
           "FFNBase", "GatedMLP", "AttentionBase", "IdentityMixer", "Mixer", "LayerNorm", "RMSNorm",
           "ALiBi", "LearnedPosition", "NoPosition", "PositionBase", "RotaryEmbedding", "SinusoidalPosition",
           "Mamba", "RGLRU", "S7", "MHA", "MLA", "CrossAttention", "SlidingWindowAttention",
           "MoEFeedForward", "SharedMoEFeedForward", "LatentMoEFeedForward"]
