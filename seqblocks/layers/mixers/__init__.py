"""Linear-RNN / state-space mixers, one per file. Importing this package registers them."""

from seqblocks.layers.mixers._lti import LTIMixer, SSMCache
from seqblocks.layers.mixers.centaurus import Centaurus
from seqblocks.layers.mixers.deltanet import DeltaNet, DeltaNetCache
from seqblocks.layers.mixers.gated_deltanet import GatedDeltaNet
from seqblocks.layers.mixers.gla import GatedLinearAttention, GLACache
from seqblocks.layers.mixers.lru import LRU
from seqblocks.layers.mixers.mamba import Mamba, MambaCache
from seqblocks.layers.mixers.mamba2 import Mamba2, Mamba2Cache, RMSNormGated
from seqblocks.layers.mixers.mamba3 import Mamba3, Mamba3Cache
from seqblocks.layers.mixers.retnet import MultiScaleRetention
from seqblocks.layers.mixers.rglru import RGLRU, RGLRUCache
from seqblocks.layers.mixers.s4 import S4
from seqblocks.layers.mixers.s4d import S4D
from seqblocks.layers.mixers.s5 import S5
from seqblocks.layers.mixers.s7 import S7, S7Cache

__all__ = ["LRU", "S4", "S4D", "S5", "Centaurus", "LTIMixer", "SSMCache",
           "Mamba", "MambaCache", "Mamba2", "Mamba2Cache", "Mamba3", "Mamba3Cache", "RMSNormGated", "RGLRU",
           "RGLRUCache", "S7", "S7Cache", "DeltaNet", "DeltaNetCache", "GatedDeltaNet", "GatedLinearAttention",
           "GLACache", "MultiScaleRetention"]
