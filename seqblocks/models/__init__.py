"""Models: language models (two front doors over one engine) and the sequence classifier."""

from seqblocks.models.classifier import Classifier
from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig
from seqblocks.models.lm import CausalLM, CausalLMOutput, InferenceCaches, LRNNLMHeadModel
from seqblocks.models.transformer import TransformerDecoder, TransformerEncoder, TransformerEncoderDecoder

__all__ = ["CausalLM", "CausalLMOutput", "Classifier", "InferenceCaches", "LRNNLMHeadModel", "LanguageModel",
           "LanguageModelConfig",
           "TransformerDecoder", "TransformerEncoder", "TransformerEncoderDecoder"]
