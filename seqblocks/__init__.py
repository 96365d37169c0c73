"""seqblocks: sequence-model building blocks for PyTorch.

Linear-RNN / state-space and attention mixers under one contract, the residual blocks around them,
hybrid language models, and Triton kernels for the hot paths.
"""

from seqblocks.blocks import Block, ConfigurableBlock
from seqblocks.cache import Cache
from seqblocks.config import BlockConfig
from seqblocks.layers import (
    ALiBi,
    AttentionBase,
    FFNBase,
    GatedMLP,
    IdentityMixer,
    LayerNorm,
    LearnedPosition,
    Mixer,
    NoPosition,
    PositionBase,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPosition,
)
from seqblocks.registry import (
    Registry,
    attention_registry,
    ffn_registry,
    mixer_registry,
    norm_registry,
    position_registry,
)

__version__ = "0.1.0"

__all__ = [
    "ALiBi",
    "AttentionBase",
    "Block",
    "BlockConfig",
    "Cache",
    "ConfigurableBlock",
    "FFNBase",
    "GatedMLP",
    "IdentityMixer",
    "LayerNorm",
    "LearnedPosition",
    "Mixer",
    "NoPosition",
    "PositionBase",
    "RMSNorm",
    "Registry",
    "RotaryEmbedding",
    "SinusoidalPosition",
    "attention_registry",
    "ffn_registry",
    "mixer_registry",
    "norm_registry",
    "position_registry",
]
