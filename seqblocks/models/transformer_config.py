"""``TransformerConfig``: one frozen config for ``TransformerEncoder``, ``TransformerDecoder`` and
``TransformerEncoderDecoder``.

The field names and defaults are those of the JAX transformer libraries' frozen ``TransformerConfig``
(``vocab_size`` required; d_model 512, 8 heads, 6 layers, d_ff 2048, dropout 0.1, max_len 512,
pre-norm, sinusoidal positions, GELU, LayerNorm, standard attention with block 512), so a config
written for one of them builds the same stack here::

    config = TransformerConfig(vocab_size=1000, d_model=256, num_heads=4, num_layers=2, d_ff=512)
    encoder = TransformerEncoder(config)
    decoder = TransformerDecoder(config, cross_attention=False)   # a decoder-only stack
    seq2seq = TransformerEncoderDecoder(config)

How each field maps onto the model arguments is ``TransformerConfig.stack_kwargs``. Values also
take seqblocks' own spellings: ``norm_type`` "layer_norm" / "rms_norm" besides "layer" / "rms",
``pos_emb_type`` "learned", and every ``attention_type`` of ``MHA``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

__all__ = ["TransformerConfig", "POS_EMB_TYPES", "NORM_KINDS"]

POS_EMB_TYPES = ("sinusoidal", "rope", "alibi", "none", "learned")
NORM_KINDS = {"layer": "layer_norm", "rms": "rms_norm", "layer_norm": "layer_norm", "rms_norm": "rms_norm"}


def _attention_types() -> tuple[str, ...]:
    from seqblocks.layers.attention.common import ATTENTION_TYPE_ALIASES
    from seqblocks.layers.attention.mha import ATTENTION_TYPES

    return ATTENTION_TYPES + tuple(ATTENTION_TYPE_ALIASES)


def _positive_int(owner: str, name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name}={value!r} must be a positive int{' or None' if optional else ''}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Hyperparameters of a transformer stack (encoder, decoder or encoder-decoder).

    Args:
        vocab_size (int): vocabulary size (source and target).
        d_model (int): width. Default: 512.
        num_heads (int): query heads. Default: 8.
        num_layers (int): blocks (of each stack of an encoder-decoder). Default: 6.
        d_ff (int): feed-forward width. Default: 2048.
        dropout_rate (float): dropout on the embeddings, attention probabilities and sublayer outputs.
            Default: 0.1.
        max_len (int): longest sequence. Default: 512.
        use_pre_norm (bool): pre-norm blocks (post-norm when False). Default: True.
        pos_emb_type (str): "sinusoidal", "rope", "alibi", "none" (or "learned"). Default: "sinusoidal".
        ff_activation (str): "gelu", "relu", "swiglu", "geglu" (or another ``EncoderBlock`` activation).
            Default: "gelu".
        norm_type (str): "layer" or "rms" (or "layer_norm" / "rms_norm"). Default: "layer".
        pad_token_id (int): the padding token (its embedding row is kept at zero). Default: 0.
        attention_type (str): the attention backend: "standard", "memory_efficient", "flash", "flex",
            "linear", "auto", "lite" (element-wise gated attention; encoders only, it is not causal) or
            "pallas_flash" (an alias of "auto"). Default: "standard".
        attention_block_size (int): key block of "memory_efficient". Default: 512.
        linear_attention_chunk_size (int): chunk of "linear". Default: 64.
        rope_base (float): RoPE base theta. Default: 10000.0.
        rope_max_positions (int | None): longest position RoPE serves. Default: None (max_len).
        num_kv_heads (int | None): key/value heads (GQA / MQA). Default: None (num_heads).
        attention_window (int | None): causal sliding-window size. Default: None.
        kv_cache_max_len (int | None): the length ``allocate_inference_cache`` allocates when none is
            given. Default: None (max_len).

    Raises:
        ValueError: a size that is not a positive int, dropout outside [0, 1), an unknown
            ``pos_emb_type``, ``norm_type``, ``ff_activation`` or ``attention_type`` (the message lists
            the valid ones), ``d_model`` not a multiple of ``num_heads``.
    """

    vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6
    d_ff: int = 2048
    dropout_rate: float = 0.1
    max_len: int = 512
    use_pre_norm: bool = True
    pos_emb_type: str = "sinusoidal"
    ff_activation: str = "gelu"
    norm_type: str = "layer"
    pad_token_id: int = 0
    attention_type: str = "standard"
    attention_block_size: int = 512
    linear_attention_chunk_size: int = 64
    rope_base: float = 10000.0
    rope_max_positions: int | None = None
    num_kv_heads: int | None = None
    attention_window: int | None = None
    kv_cache_max_len: int | None = None

    def __post_init__(self) -> None:
        from seqblocks.blocks.encoder_decoder import FF_ACTIVATIONS

        owner = "TransformerConfig"
        if isinstance(self.attention_type, enum.Enum):  # an enum of backend names, as the JAX configs use
            object.__setattr__(self, "attention_type", self.attention_type.value)
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len", "attention_block_size",
                     "linear_attention_chunk_size"):
            _positive_int(owner, name, getattr(self, name))
        for name in ("rope_max_positions", "num_kv_heads", "attention_window", "kv_cache_max_len"):
            _positive_int(owner, name, getattr(self, name), optional=True)
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) or not (
                0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"{owner}: pad_token_id={self.pad_token_id!r} must be a token id in [0, "
                             f"{self.vocab_size})")
        if not isinstance(self.dropout_rate, int | float) or not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"{owner}: dropout_rate={self.dropout_rate!r} must lie in [0, 1)")
        if not isinstance(self.rope_base, int | float) or not self.rope_base > 0:
            raise ValueError(f"{owner}: rope_base={self.rope_base!r} must be positive")
        if not isinstance(self.use_pre_norm, bool):
            raise ValueError(f"{owner}: use_pre_norm={self.use_pre_norm!r} must be True or False")
        if self.pos_emb_type not in POS_EMB_TYPES:
            raise ValueError(f"{owner}: pos_emb_type={self.pos_emb_type!r}; expected one of {POS_EMB_TYPES}")
        if self.norm_type not in NORM_KINDS:
            raise ValueError(f"{owner}: norm_type={self.norm_type!r}; expected one of {tuple(NORM_KINDS)}")
        if self.ff_activation not in FF_ACTIVATIONS:
            raise ValueError(f"{owner}: ff_activation={self.ff_activation!r}; expected one of {FF_ACTIVATIONS}")
        if self.attention_type not in _attention_types():
            raise ValueError(f"{owner}: attention_type={self.attention_type!r}; seqblocks offers "
                             f"{_attention_types()}")
        if self.d_model % self.num_heads:
            raise ValueError(f"{owner}: d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, as JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        """The config ``to_dict`` wrote.

        Raises:
            ValueError: unknown keys (listing the valid ones) or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"TransformerConfig.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"TransformerConfig: unknown keys {unknown}; valid: {sorted(names)}")
        return cls(**data)

    @property
    def rope_table(self) -> int:
        """The longest position RoPE serves: ``rope_max_positions``, else ``max_len``."""
        return self.rope_max_positions or self.max_len

    def stack_kwargs(self) -> dict[str, Any]:
        """The ``TransformerEncoder`` / ``TransformerDecoder`` arguments this config stands for.

        ``block_kwargs`` are the ``EncoderBlock`` / ``DecoderBlock`` arguments among them.
        """
        return {
            "vocab_size": self.vocab_size, "d_model": self.d_model, "num_layers": self.num_layers,
            "num_heads": self.num_heads, "d_ff": self.d_ff, "position": self.pos_emb_type,
            "max_seq_len": max(self.max_len, self.rope_table), "padding_idx": self.pad_token_id,
            "kv_cache_max_len": self.kv_cache_max_len or self.max_len,
            "block_kwargs": {
                "dropout_rate": float(self.dropout_rate), "pre_norm": self.use_pre_norm,
                "attention_type": self.attention_type, "attention_block_size": self.attention_block_size,
                "linear_attention_chunk_size": self.linear_attention_chunk_size,
                "norm_type": NORM_KINDS[self.norm_type], "ff_activation": self.ff_activation,
                "num_kv_heads": self.num_kv_heads, "attention_window": self.attention_window,
                "rope_base": float(self.rope_base),
            },
        }
