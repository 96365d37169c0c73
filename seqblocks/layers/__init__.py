"""nn.Modules, one concept per file. Importing this package registers every built-in component."""

from seqblocks.layers.ffn import FFNBase, GatedMLP
from seqblocks.layers.mixer import AttentionBase, IdentityMixer, Mixer
from seqblocks.layers.norm import LayerNorm, RMSNorm
from seqblocks.layers.position import (
    ALiBi,
    LearnedPosition,
    NoPosition,
    PositionBase,
    RotaryEmbedding,
    SinusoidalPosition,
)

__all__ = ["FFNBase", "GatedMLP", "AttentionBase", "IdentityMixer", "Mixer", "LayerNorm", "RMSNorm",
           "ALiBi", "LearnedPosition", "NoPosition", "PositionBase", "RotaryEmbedding", "SinusoidalPosition"]
