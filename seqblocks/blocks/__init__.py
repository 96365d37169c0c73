"""Residual blocks around mixers."""

from seqblocks.blocks.block import Block
from seqblocks.blocks.configurable import ConfigurableBlock

__all__ = ["Block", "ConfigurableBlock"]
