"""Residual blocks around mixers."""

from seqblocks.blocks.block import Block
from seqblocks.blocks.configurable import ConfigurableBlock
from seqblocks.blocks.encoder_decoder import DecoderBlock, EncoderBlock

__all__ = ["Block", "ConfigurableBlock", "DecoderBlock", "EncoderBlock"]
