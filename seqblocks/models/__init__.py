"""Models: language models (two front doors over one engine), the sequence classifier, the
transformer encoder / decoder / encoder-decoder and the Vision Transformer."""

from seqblocks.cache import InferenceCaches
from seqblocks.models.classifier import Classifier
from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig
from seqblocks.models.engine import CausalLM, CausalLMOutput
from seqblocks.models.init import InitConfig
from seqblocks.models.lrnn_lm import LRNNLMHeadModel, LRNNModel
from seqblocks.models.model_config import LayerConfig, ModelConfig
from seqblocks.models.transformer import TransformerDecoder, TransformerEncoder, TransformerEncoderDecoder
from seqblocks.models.transformer_config import TransformerConfig
from seqblocks.models.vit import PatchEmbedding, VisionTransformer, VisionTransformerConfig

__all__ = ["CausalLM", "CausalLMOutput", "Classifier", "InferenceCaches", "InitConfig", "LRNNLMHeadModel", "LRNNModel",
           "LanguageModel", "LanguageModelConfig", "LayerConfig", "ModelConfig",
           "TransformerDecoder", "TransformerEncoder", "TransformerEncoderDecoder", "TransformerConfig",
           "PatchEmbedding", "VisionTransformer", "VisionTransformerConfig"]
