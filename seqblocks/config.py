"""Configs are data: frozen, keyword-only dataclasses that validate themselves and round-trip through JSON.

``BlockConfig`` describes one ``ConfigurableBlock`` (a transformer-style residual block): which
attention / mixer, FFN, norm and position encoding to build, by registry name, and their sizes.
``ConfigBase`` gives every config ``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` and type
checking of its fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, ClassVar, TypeVar

__all__ = ["ConfigBase", "BlockConfig", "MOE_BIAS_MODES"]

C = TypeVar("C", bound="ConfigBase")


def _allowed_types(hint: Any) -> tuple[tuple[type, ...], bool]:
    """Map a field's type hint to (accepted runtime types, whether None is accepted)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        accepted: tuple[type, ...] = ()
        optional = False
        for arg in typing.get_args(hint):
            if arg is type(None):
                optional = True
            else:
                accepted += _allowed_types(arg)[0]
        return accepted, optional
    if origin is not None:  # dict[str, Any], tuple[...], ...
        return (origin,), False
    if hint is Any:
        return (object,), True
    return (hint,), False


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigBase:
    """Base of every seqblocks config: field type checks, exact dict / JSON round-trip."""

    _hints: ClassVar[dict[str, Any] | None] = None

    def __new__(cls, *args: Any, **kwargs: Any):
        # Runs before the dataclass __init__, so a misspelt key gets a ValueError that names the
        # component and the accepted keys instead of Python's bare "unexpected keyword argument".
        names = cls.field_names()
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; accepted keys: {sorted(names)}")
        return super().__new__(cls)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the config's fields, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def _field_hints(cls) -> dict[str, Any]:
        if cls.__dict__.get("_hints") is None:
            cls._hints = typing.get_type_hints(cls)
        return cls._hints

    def __post_init__(self) -> None:
        hints = self._field_hints()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            accepted, optional = _allowed_types(hints[f.name])
            if value is None:
                if not optional:
                    raise ValueError(f"{type(self).__name__}.{f.name} must not be None")
                continue
            # bool is a subclass of int: an int field must not silently take True/False.
            if isinstance(value, bool) and bool not in accepted:
                raise TypeError(f"{type(self).__name__}.{f.name} must be {_names(accepted)}, got bool {value!r}")
            if float in accepted and int not in accepted and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                continue
            if isinstance(value, list) and tuple in accepted and list not in accepted:
                value = tuple(value)  # JSON has no tuples: a tuple field reads back from a list
                object.__setattr__(self, f.name, value)
            if isinstance(value, dict) and dict not in accepted:
                nested = [t for t in accepted if isinstance(t, type) and issubclass(t, ConfigBase)]
                if len(nested) == 1:  # a nested config read back from JSON
                    value = nested[0].from_dict(value)
                    object.__setattr__(self, f.name, value)
            if not isinstance(value, accepted):
                raise TypeError(
                    f"{type(self).__name__}.{f.name} must be {_names(accepted)}, "
                    f"got {type(value).__name__} {value!r}"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}.{f.name} must be finite, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain JSON-compatible Python values."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from ``to_dict`` output. Unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields: {sorted(names)}")
        return cls(**data)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def _names(accepted: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in accepted)


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


#: Where a mixture-of-experts FFN's expert bias acts (``BlockConfig.moe_bias_mode``).
MOE_BIAS_MODES = ("scores", "logits", "corrected")


def _require(condition: bool, field: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"BlockConfig.{field}={value!r} is invalid: expected {expected}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig(ConfigBase):
    """One residual block: components by registry name, and their sizes.

    Args:
        attention (str): mixer registry name ("mha", "gqa", "mla", "sliding_window", "chunked_gqa",
            "sparse_gqa", "mamba", "none", ...).
            Default: "mha".
        ffn (str): FFN registry name ("standard", "relu", "gated", "geglu", "relu2", "gated_relu2", "none",
            and the mixture-of-experts FFNs "moe", "shared_moe", "latent_moe").
            Default: "standard".
        norm (str): norm registry name ("layer_norm", "rms_norm"). Default: "layer_norm".
        position (str): position registry name ("rope", "alibi", "sinusoidal", "learned", "none").
            Rotary and bias positions act inside attention; additive ones ("sinusoidal", "learned") are
            added to the token embeddings by the model. Default: "sinusoidal".
        d_model (int): model width. Default: 512.
        n_heads (int): query heads. Default: 8.
        n_kv_heads (int | None): key/value heads (GQA / MQA); must divide ``n_heads``.
            Default: None (= n_heads).
        head_dim (int | None): width of one head; need not equal d_model // n_heads.
            Default: None (``effective_head_dim`` is then d_model // n_heads).
        d_ff (int): FFN hidden width. Default: 2048.
        bias (bool): biases in the linear layers. Default: True.
        dropout (float): dropout on each sublayer's output (and on attention weights unless
            ``attention_dropout`` is set). Default: 0.0.
        norm_eps (float): epsilon of the norms. Default: 1e-5.
        rope_theta (float): RoPE base. Default: 10000.0.
        max_seq_len (int): longest sequence (learned positions, default cache size). Default: 2048.
        pre_norm (bool): pre-norm layout when True, post-norm otherwise. Default: True.
        causal (bool): causal self-attention. Default: True.
        window_size (int | None): sliding-window size (a query sees itself and window_size - 1
            earlier keys). Default: None (global).
        attention_dropout (float | None): dropout on attention weights. Default: None (= dropout).
        attention_type (str): attention backend ("auto", "standard", "memory_efficient", "flash",
            "flex", "linear"). Default: "auto".
        attention_block_size (int): key block of the memory-efficient backend. Default: 128.
        linear_attention_chunk_size (int): chunk of the linear backend. Default: 64.
        kv_lora_rank (int | None): MLA latent KV width. Default: None.
        q_lora_rank (int | None): MLA query low-rank width (None: full-rank queries). Default: None.
        rope_dim (int | None): MLA decoupled RoPE width. Default: None.
        rotary_dim (int | None): rotary width for partial RoPE. Default: None (= head_dim).
        rope_scaling (float): RoPE context-extension factor (1.0: none). Default: 1.0.
        rope_scaling_type (str): how ``rope_scaling`` acts: "linear" (position interpolation), "ntk"
            or "llama3" (``RotaryEmbedding``). Default: "linear".
        rope_scaling_kwargs (dict): further ``RotaryEmbedding`` arguments of the scaling rule ("llama3":
            ``low_freq_factor``, ``high_freq_factor``, ``original_max_positions``). Default: {}.
        d_state (int): state width of recurrent mixers. Default: 16.
        qk_norm (bool): RMSNorm (learnable weight over head_dim) on every query and key head, before
            RoPE (Qwen3 / Gemma 3). Default: False.
        attention_chunk_size (int | None): Llama-4 chunked local attention ("chunked_gqa"): a query sees
            only the earlier keys of its own chunk of attention_chunk_size positions. Default: None.
        sparse_select_k (int | None): keys each query attends to in "sparse_gqa" (the indexer's top-k).
            Default: None.
        sparse_compress_ratio (int | None): "sparse_gqa"'s compression branch: keys and values mean-pooled
            over blocks of this many positions (with ``window_size`` set, "sparse_gqa" adds a sliding-window
            branch too). Default: None (no compression branch).
        attn_logit_softcapping (float | None): attention-logit soft-cap, ``c * tanh(score / c)``
            (Gemma 2). Default: None.
        mixer_kwargs (dict): extra constructor arguments for the mixer (JSON values). Default: {}.
        mup (bool): muP (maximal update parameterisation, ``docs/mup.md``): softmax attention scores
            scaled by 1 / head_dim instead of 1 / sqrt(head_dim) ("mha", "gqa", "mqa",
            "sliding_window", "mla"; other mixers keep their own scales). In a ``LanguageModel`` it
            also switches on the model-level rules (init, output multiplier, learning-rate groups)
            against ``LanguageModelConfig.mup_base_width``. Default: False.
        n_experts (int | None): routed experts of the MoE FFNs ("moe", "shared_moe", "latent_moe";
            ``docs/moe.md``). Default: None (8).
        top_k_experts (int): experts each token is routed to. Default: 2.
        n_shared_experts (int | None): always-active shared experts. Default: None (0 for "moe", 1 for
            "shared_moe" and "latent_moe").
        moe_latent_size (int | None): "latent_moe": width of the latent space the experts run in.
            Default: None (d_model // 4).
        moe_d_ff (int | None): hidden width of one routed expert. Default: None (= d_ff).
        shared_expert_d_ff (int | None): hidden width of one shared expert. Default: None (= d_ff).
        moe_routed_scaling_factor (float): the routed experts' weighted sum is multiplied by this.
            Default: 1.0.
        moe_n_groups (int): expert groups of group-limited routing (a token picks its experts from its
            ``moe_topk_groups`` best groups); must divide n_experts. Default: 1.
        moe_topk_groups (int): groups each token may pick experts from. Default: 1.
        moe_router (str | None): router scores, "softmax" or "sigmoid". Default: None ("softmax" for
            "moe" / "shared_moe", "sigmoid" for "latent_moe").
        moe_norm_topk (bool): renormalise the top-k weights of a token to sum to 1. Default: True.
        moe_capacity_factor (float | None): in training, each expert takes at most
            ceil(factor * tokens * top_k / n_experts) token assignments and drops the rest (counted);
            None is dropless. Evaluation and decoding are always dropless. Default: None.
        moe_aux_loss_coef (float): weight of the Switch load-balance loss E * sum_i f_i P_i.
            Default: 0.01.
        moe_z_loss_coef (float): weight of the router z-loss mean(logsumexp(logits)^2). Default: 0.001.
        moe_bias_update_rate (float): auxiliary-loss-free balancing: after each optimizer step every
            expert's selection bias moves by this rate towards balance (``update_router_biases``);
            0 leaves the biases at zero. Default: 0.0.
        moe_bias_mode (str): where the expert bias ``b`` (the ``expert_bias`` buffer) acts: "scores"
            (the experts are chosen by scores + b, the weights read the scores: DeepSeek-V3), "logits"
            (chosen by logits + b, weights from the scores) or "corrected" (the scores become scores + b
            for both the choice and the weights, a score correction). All three route alike while b = 0.
            Default: "scores".
    """

    attention: str = "mha"
    ffn: str = "standard"
    norm: str = "layer_norm"
    position: str = "sinusoidal"
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 2048
    bias: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    pre_norm: bool = True
    causal: bool = True
    window_size: int | None = None
    attention_dropout: float | None = None
    attention_type: str = "auto"
    attention_block_size: int = 128
    linear_attention_chunk_size: int = 64
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    rope_dim: int | None = None
    rotary_dim: int | None = None
    rope_scaling: float = 1.0
    rope_scaling_type: str = "linear"
    rope_scaling_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    d_state: int = 16
    qk_norm: bool = False
    attention_chunk_size: int | None = None
    sparse_select_k: int | None = None
    sparse_compress_ratio: int | None = None
    attn_logit_softcapping: float | None = None
    mixer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    mup: bool = False
    n_experts: int | None = None
    top_k_experts: int = 2
    n_shared_experts: int | None = None
    moe_latent_size: int | None = None
    moe_d_ff: int | None = None
    shared_expert_d_ff: int | None = None
    moe_routed_scaling_factor: float = 1.0
    moe_n_groups: int = 1
    moe_topk_groups: int = 1
    moe_router: str | None = None
    moe_norm_topk: bool = True
    moe_capacity_factor: float | None = None
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001
    moe_bias_update_rate: float = 0.0
    moe_bias_mode: str = "scores"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("attention", "ffn", "norm", "position", "attention_type", "rope_scaling_type"):
            _require(bool(getattr(self, name).strip()), name, getattr(self, name), "a non-empty name")
        for name in ("d_model", "n_heads", "d_ff", "max_seq_len", "attention_block_size",
                     "linear_attention_chunk_size", "d_state"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        for name in ("n_kv_heads", "head_dim", "window_size", "kv_lora_rank", "q_lora_rank", "rope_dim",
                     "rotary_dim", "attention_chunk_size", "sparse_select_k", "sparse_compress_ratio"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, value, "a positive integer or None")
        if self.head_dim is None:
            _require(self.d_model % self.n_heads == 0, "d_model", self.d_model,
                     f"a multiple of n_heads={self.n_heads} (or set head_dim explicitly)")
        if self.n_kv_heads is not None:
            _require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
                     f"a divisor of n_heads={self.n_heads}")
        if self.rotary_dim is not None:
            _require(self.rotary_dim <= self.effective_head_dim and self.rotary_dim % 2 == 0, "rotary_dim",
                     self.rotary_dim, f"an even width <= head_dim={self.effective_head_dim}")
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a probability in [0, 1)")
        if self.attention_dropout is not None:
            _require(0.0 <= self.attention_dropout < 1.0, "attention_dropout", self.attention_dropout,
                     "a probability in [0, 1)")
        _require(self.norm_eps > 0, "norm_eps", self.norm_eps, "a positive float")
        _require(self.rope_theta > 0, "rope_theta", self.rope_theta, "a positive float")
        _require(self.rope_scaling > 0, "rope_scaling", self.rope_scaling, "a positive float")
        if self.attn_logit_softcapping is not None:
            _require(self.attn_logit_softcapping > 0, "attn_logit_softcapping", self.attn_logit_softcapping,
                     "a positive float or None")
        self._check_moe()
        for name in ("mixer_kwargs", "rope_scaling_kwargs"):
            value = getattr(self, name)
            _require(all(isinstance(k, str) for k in value), name, value, "a dict with string keys")
            try:
                json.dumps(value)
            except TypeError as err:
                raise ValueError(f"BlockConfig.{name} must hold JSON values: {err}") from None

    def _check_moe(self) -> None:
        for name in ("n_experts", "moe_latent_size", "moe_d_ff", "shared_expert_d_ff"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, value, "a positive integer or None")
        _require(self.n_shared_experts is None or self.n_shared_experts >= 0, "n_shared_experts",
                 self.n_shared_experts, "a non-negative integer or None")
        n_experts = self.n_experts if self.n_experts is not None else 8
        _require(1 <= self.top_k_experts <= n_experts, "top_k_experts", self.top_k_experts,
                 f"an integer in [1, n_experts={n_experts}]")
        _require(self.moe_n_groups >= 1 and n_experts % self.moe_n_groups == 0, "moe_n_groups", self.moe_n_groups,
                 f"a positive divisor of n_experts={n_experts}")
        _require(1 <= self.moe_topk_groups <= self.moe_n_groups, "moe_topk_groups", self.moe_topk_groups,
                 f"an integer in [1, moe_n_groups={self.moe_n_groups}]")
        per_group = n_experts // self.moe_n_groups
        _require(self.top_k_experts <= self.moe_topk_groups * per_group, "top_k_experts", self.top_k_experts,
                 f"at most moe_topk_groups * experts per group = {self.moe_topk_groups * per_group}")
        _require(self.moe_router in (None, "softmax", "sigmoid"), "moe_router", self.moe_router,
                 "'softmax', 'sigmoid' or None")
        _require(self.moe_bias_mode in MOE_BIAS_MODES, "moe_bias_mode", self.moe_bias_mode,
                 f"one of {MOE_BIAS_MODES}")
        _require(self.moe_routed_scaling_factor > 0, "moe_routed_scaling_factor", self.moe_routed_scaling_factor,
                 "a positive float")
        if self.moe_capacity_factor is not None:
            _require(self.moe_capacity_factor > 0, "moe_capacity_factor", self.moe_capacity_factor,
                     "a positive float or None (dropless)")
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_update_rate"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "a non-negative float")

    @property
    def effective_head_dim(self) -> int:
        """Width of one head: ``head_dim``, or ``d_model // n_heads`` when it is None. Derived on every
        read, so ``replace(d_model=...)`` changes it too."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def effective_n_kv_heads(self) -> int:
        """Key/value heads after resolving the None default."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def effective_attention_dropout(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout
