"""``LanguageModel``: a causal language model from one ``BlockConfig`` per layer.

The second front door to the engine of ``lm.py``: the same embedding, caches, ``step``, generation
and checkpoints as ``LRNNLMHeadModel``, with ``ConfigurableBlock`` s as layers. Any registered mixer
name can stand in a block's ``attention`` field, so hybrids are per-layer configs::

    config = LanguageModelConfig.tiny_llama(vocab_size=256)             # RoPE, GQA, SwiGLU, RMSNorm
    config = LanguageModelConfig.tiny_gpt2(vocab_size=256)              # learned positions, MHA, GELU
    config = LanguageModelConfig.from_pattern(["mamba", "mha"], vocab_size=256, d_model=64)

Additive position encodings (``sinusoidal``, ``learned``) are added once to the token embeddings, at
absolute positions (the cache offset while decoding); rotary / bias encodings act inside attention.

Shapes: B batch, T time, D width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from seqblocks.blocks import ConfigurableBlock
from seqblocks.config import BlockConfig, ConfigBase
from seqblocks.layers.attention.common import AttentionCore
from seqblocks.layers.mixer import build_component
from seqblocks.models.engine import CausalLM
from seqblocks.models.init import InitConfig
from seqblocks.models.mtp import check_mtp_fields
from seqblocks.models.mup import MupSpec
from seqblocks.registry import MODELS, NORMS, POSITIONS

__all__ = ["LanguageModelConfig", "LanguageModel"]


def _bad(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"LanguageModelConfig.{field}={value!r} is invalid: expected {expected}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LanguageModelConfig(ConfigBase):
    """A causal LM: vocabulary, one ``BlockConfig`` per layer, and the embedding / head options.

    Args:
        vocab_size (int): vocabulary size.
        blocks (tuple[BlockConfig, ...]): one config per layer (a list is accepted); all share
            ``d_model`` and are causal; at most one additive position encoding among them.
        tie_embeddings (bool): LM head shares the embedding matrix. Default: True.
        pad_vocab_size_multiple (int): embedding rows padded to a multiple of this. Default: 1.
        final_norm (bool): a norm (the last block's kind) before the head. Default: True.
        embedding_dropout (float): dropout on the embeddings. Default: 0.0.
        embedding_scale (float | None): multiply the token embeddings by this before the first layer
            (Gemma / RecurrentGemma: sqrt(d_model)). Default: None (no scale).
        initializer_range (float): std of the embedding init. Default: 0.02.
        rescale_residual (bool): divide each residual output projection by sqrt(2 * n_layers) (by
            sqrt(n_layers) for blocks with one sublayer), once. Default: True.
        final_logit_softcapping (float | None): soft-cap of the logits, ``c * tanh(logits / c)``
            (Gemma 2). Default: None.
        mtp_n_predict (int): multi-token prediction depths (``seqblocks.models.mtp``), each a block of
            the last layer's kind; 0 disables MTP. Default: 0.
        mtp_lambda (float): weight of the MTP loss the trainer adds. Default: 0.1.
        mup_base_width (int | None): muP's base width; needs ``BlockConfig.mup=True``
            in every block. With ``mup`` on, hidden linears are initialised with std initializer_range /
            sqrt(width_mult), their Adam learning rate is divided by width_mult (through
            ``seqblocks.train.make_optimizer``) and the logits are multiplied by 1 / width_mult, where
            width_mult = d_model / mup_base_width (``docs/mup.md``). Default: None (the model's own
            d_model when the blocks ask for ``mup``: width_mult 1).
    """

    vocab_size: int
    blocks: tuple[BlockConfig, ...]
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 1
    final_norm: bool = True
    embedding_dropout: float = 0.0
    embedding_scale: float | None = None
    initializer_range: float = 0.02
    rescale_residual: bool = True
    final_logit_softcapping: float | None = None
    mtp_n_predict: int = 0
    mtp_lambda: float = 0.1
    mup_base_width: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        super().__post_init__()
        if self.vocab_size <= 0:
            raise _bad("vocab_size", self.vocab_size, "a positive integer")
        if self.pad_vocab_size_multiple <= 0:
            raise _bad("pad_vocab_size_multiple", self.pad_vocab_size_multiple, "a positive integer")
        if not self.blocks or not all(isinstance(b, BlockConfig) for b in self.blocks):
            raise _bad("blocks", self.blocks, "a non-empty sequence of BlockConfig")
        widths = sorted({b.d_model for b in self.blocks})
        if len(widths) != 1:
            raise _bad("blocks", f"d_model values {widths}", "one d_model shared by every block")
        acausal = [i for i, b in enumerate(self.blocks) if not b.causal]
        if acausal:
            raise _bad("blocks", f"causal=False in layers {acausal}", "causal blocks in a language model")
        additive = {b.position for b in self.blocks if _is_additive(b.position)}
        if len(additive) > 1:
            raise _bad("blocks", f"positions {sorted(additive)}", "at most one additive position encoding")
        if not 0.0 <= self.embedding_dropout < 1.0:
            raise _bad("embedding_dropout", self.embedding_dropout, "a probability in [0, 1)")
        if self.embedding_scale is not None and not self.embedding_scale > 0:
            raise _bad("embedding_scale", self.embedding_scale, "a positive float or None")
        if not self.initializer_range > 0:
            raise _bad("initializer_range", self.initializer_range, "a positive float")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise _bad("final_logit_softcapping", self.final_logit_softcapping, "a positive float or None")
        check_mtp_fields("LanguageModelConfig", self.mtp_n_predict, self.mtp_lambda)
        mup_layers = [i for i, b in enumerate(self.blocks) if b.mup]
        if mup_layers and len(mup_layers) != len(self.blocks):
            raise _bad("blocks", f"mup=True in layers {mup_layers} only", "the same BlockConfig.mup in every block")
        if self.mup_base_width is not None:
            if self.mup_base_width <= 0:
                raise _bad("mup_base_width", self.mup_base_width, "a positive integer or None")
            if not mup_layers:
                raise _bad("mup_base_width", self.mup_base_width, "blocks with BlockConfig.mup=True (or None)")

    @property
    def d_model(self) -> int:
        return self.blocks[0].d_model

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def mup(self) -> bool:
        """Whether the model is muP-parameterised (its blocks have ``mup=True``)."""
        return self.blocks[0].mup

    @property
    def width_mult(self) -> float:
        """muP's width multiplier d_model / mup_base_width (1.0 without muP or without a base width)."""
        if not self.mup or self.mup_base_width is None:
            return 1.0
        return self.d_model / self.mup_base_width

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LanguageModelConfig:
        if not isinstance(data, dict):
            raise TypeError(f"LanguageModelConfig.from_dict expects a dict, got {type(data).__name__}")
        data = dict(data)
        blocks = data.get("blocks")
        if isinstance(blocks, list | tuple):
            data["blocks"] = tuple(b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b) for b in blocks)
        return super().from_dict(data)

    @classmethod
    def tiny_llama(cls, vocab_size: int = 256, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                   n_kv_heads: int | None = 2, d_ff: int | None = None, max_seq_len: int = 2048,
                   **kwargs: Any) -> LanguageModelConfig:
        """Llama-style: RoPE, grouped-query attention ("gqa", or "mha" when n_kv_heads is None or
        n_heads), SwiGLU FFN, RMSNorm, no biases, untied head. ``kwargs`` override LanguageModelConfig
        or BlockConfig fields."""
        model_kwargs, block_kwargs = _split_kwargs({"tie_embeddings": False, **kwargs})
        grouped = n_kv_heads is not None and n_kv_heads != n_heads
        block = BlockConfig(attention="gqa" if grouped else "mha", ffn="gated", norm="rms_norm", position="rope",
                            d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                            d_ff=d_ff if d_ff is not None else 8 * d_model // 3, bias=False,
                            max_seq_len=max_seq_len, **block_kwargs)
        return cls(vocab_size=vocab_size, blocks=(block,) * n_layers, **model_kwargs)

    @classmethod
    def tiny_gpt2(cls, vocab_size: int = 256, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                  max_seq_len: int = 256, **kwargs: Any) -> LanguageModelConfig:
        """GPT-2-style: learned absolute positions, multi-head attention, GELU FFN (4x), LayerNorm,
        biases, tied head. ``kwargs`` override LanguageModelConfig or BlockConfig fields."""
        model_kwargs, block_kwargs = _split_kwargs(kwargs)
        block = BlockConfig(attention="mha", ffn="standard", norm="layer_norm", position="learned",
                            d_model=d_model, n_heads=n_heads, d_ff=4 * d_model, bias=True,
                            max_seq_len=max_seq_len, **block_kwargs)
        return cls(vocab_size=vocab_size, blocks=(block,) * n_layers, **model_kwargs)

    @classmethod
    def from_pattern(cls, pattern: Sequence[str], vocab_size: int = 256, *, d_model: int = 64, irope: bool = False,
                     **kwargs: Any) -> LanguageModelConfig:
        """One layer per mixer name in ``pattern`` (e.g. ["mamba", "mamba", "mha"]), every other block
        field shared (defaults: gated FFN of 2 * d_model, RMSNorm, RoPE, no biases). ``kwargs``
        override LanguageModelConfig or BlockConfig fields (``qk_norm``, ``attention_chunk_size``,
        ``sparse_select_k``, ``attn_logit_softcapping``, ``final_logit_softcapping``, ...).

        ``irope=True`` is Llama 4's iRoPE layout: the "chunked_gqa" layers keep the shared position
        encoding and every other layer gets ``position="none"`` (NoPE on the global layers).
        Default: False."""
        if not isinstance(irope, bool):
            raise TypeError(f"from_pattern: irope must be a bool, got {irope!r}")
        model_kwargs, block_kwargs = _split_kwargs(kwargs)
        defaults = {"ffn": "gated", "norm": "rms_norm", "position": "rope", "d_ff": 2 * d_model, "bias": False,
                    "n_heads": max(1, d_model // 32)}
        defaults.update(block_kwargs)
        nope = {**defaults, "position": "none"}
        blocks = tuple(BlockConfig(attention=name, d_model=d_model,
                                   **(nope if irope and name.strip().lower() != "chunked_gqa" else defaults))
                       for name in pattern)
        return cls(vocab_size=vocab_size, blocks=blocks, **model_kwargs)


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LanguageModelConfig fields, BlockConfig fields) of a preset's keyword arguments."""
    model_fields = {f.name for f in dataclasses.fields(LanguageModelConfig)} - {"blocks", "vocab_size"}
    return ({k: v for k, v in kwargs.items() if k in model_fields},
            {k: v for k, v in kwargs.items() if k not in model_fields})


def _is_additive(position: str) -> bool:
    return getattr(POSITIONS.get(position), "kind", None) == "additive"


@MODELS.register("LanguageModel")
class LanguageModel(CausalLM):
    """A causal language model of ``ConfigurableBlock`` s, one per ``BlockConfig``.

    Args:
        config (LanguageModelConfig): the model.
        device, dtype: parameter placement. Default: None.

    ``forward`` / ``step`` / ``allocate_inference_cache`` / ``generate`` / ``save_pretrained`` /
    ``from_pretrained`` are the engine's (see ``CausalLM``).
    """

    def __init__(self, config: LanguageModelConfig, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(config, LanguageModelConfig):
            raise TypeError(f"LanguageModel expects a LanguageModelConfig, got {type(config).__name__}")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        additive = [b for b in config.blocks if _is_additive(b.position)]
        position = build_component(POSITIONS.get(additive[0].position), additive[0]) if additive else None
        self._build_embedding(config.vocab_size, config.d_model, config.pad_vocab_size_multiple,
                              config.tie_embeddings, position, **factory)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(ConfigurableBlock(b, **factory) for b in config.blocks)
        last = config.blocks[-1]
        self.norm_f = build_component(NORMS.get(last.norm), last) if config.final_norm else None
        self._build_head(**factory)
        self._build_mtp(config.mtp_n_predict, lambda: ConfigurableBlock(last, **factory), last.norm_eps, **factory)
        for module in (self.position, self.norm_f):
            if module is not None:
                module.to(**factory)
        mup = None
        if config.mup:
            # Softmax attention and the FFNs get the muP init; other mixers keep their own fan-in init.
            init = [m for layer in self.layers for m in (layer.attention, layer.ffn)
                    if m is layer.ffn or isinstance(m, AttentionCore)]
            mup = MupSpec(config.width_mult, tuple(init), tuple(self.layers))
        self._apply_initializer(
            InitConfig(initializer_range=config.initializer_range, rescale_prenorm_residual=config.rescale_residual),
            [[layer.attention if layer.attn_norm is not None else None,
              layer.ffn if layer.ffn_norm is not None else None] for layer in self.layers],
            mup,
        )

    def mixers(self) -> list[nn.Module]:
        return [layer.attention for layer in self.layers]

    def _backbone(self, hidden: torch.Tensor, caches: Any, inputs: list[dict[str, Any]],
                  hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.config.embedding_scale is not None:
            hidden = hidden * self.config.embedding_scale
        hidden = self.embedding_dropout(hidden)
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(hidden)
            hidden, _ = layer(hidden, cache=None if caches is None else caches[i], fresh_cache=False, **inputs[i])
        hidden = hidden if self.norm_f is None else self.norm_f(hidden)
        if hidden_states is not None:
            hidden_states.append(hidden)
        return hidden

    def checkpoint_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> LanguageModel:
        return cls(LanguageModelConfig.from_dict(config), device=device, dtype=dtype)
