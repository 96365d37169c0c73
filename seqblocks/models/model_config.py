"""``ModelConfig``: the hybrid language model as data.

``LRNNLMHeadModel(d_model, d_state, n_layer, vocab_size, mixer_types, ...)`` keeps the hybrid-LM
constructor and builds one of these (``ModelConfig.from_args``); ``LRNNLMHeadModel.from_config``
takes one directly. Each layer is a ``LayerConfig``: a registered mixer name and that mixer's own
config (``Mixer.config_class()``, or a ``BlockConfig`` for attention classes built as
``cls(config)``), so the whole model round-trips through JSON exactly::

    config = ModelConfig.from_args(d_model=64, d_state=8, n_layer=2, vocab_size=100,
                                   mixer_types=["mamba", "attn"], mixer_kwargs={"attn": {"num_heads": 4}})
    assert ModelConfig.from_json(config.to_json()) == config
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from seqblocks.config import BlockConfig, ConfigBase
from seqblocks.layers.build import is_block_config_mixer, mixer_class, mixer_config, resolve_mixer_kwargs
from seqblocks.models.init import InitConfig
from seqblocks.models.mtp import check_mtp_fields
from seqblocks.registry import FFNS, MIXERS, MLPS

__all__ = ["LayerConfig", "ModelConfig", "ARGUMENT_FIELDS", "SIZE_LIMITS"]

#: The largest sizes a config may ask for. A larger one is refused, naming the field, before any
#: module is built or memory allocated (a checkpoint's config.json cannot make loading allocate
#: gigabytes or spend minutes building layers). "mixer" bounds every size-like integer field of a
#: layer's mixer config (``d_*``, ``n_*``, ``num_*``, ``*_dim``, ``*_size``, ``*_rank``, ``*heads``).
SIZE_LIMITS = {"n_layer": 4096, "d_model": 1 << 17, "vocab_size": 1 << 23, "d_intermediate": 1 << 20,
               "mixer": 1 << 20}
_SIZE_FIELD = re.compile(r"^(d_|n_|num_)|(_dim|_size|_rank|heads)$")

#: ``LRNNLMHeadModel``'s constructor arguments, as a config file or an older checkpoint spells them.
ARGUMENT_FIELDS = ("d_model", "d_state", "n_layer", "vocab_size", "mixer_types", "d_intermediate", "mixer_kwargs",
                   "mlp_cls", "norm_epsilon", "rms_norm", "fused_add_norm", "residual_in_fp32", "tie_embeddings",
                   "pad_vocab_size_multiple", "initializer_cfg", "final_logit_softcapping",
                   "mtp_n_predict", "mtp_lambda", "moe", "moe_layers")


def _layer_config_class(mixer: str) -> type[ConfigBase]:
    cls = mixer_class(mixer)
    return BlockConfig if is_block_config_mixer(cls) else cls.config_class()


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerConfig(ConfigBase):
    """One layer's mixer.

    Args:
        mixer (str): a registered mixer name.
        mixer_config (ConfigBase): that mixer's config (a dict is read with the mixer's config class).
    """

    mixer: str
    mixer_config: ConfigBase

    def __post_init__(self) -> None:
        if not isinstance(self.mixer, str):
            raise TypeError(f"LayerConfig.mixer must be a registered mixer name, got {self.mixer!r}")
        MIXERS.get(self.mixer)  # an unknown name raises ValueError listing the registered ones
        expected = _layer_config_class(self.mixer)
        if isinstance(self.mixer_config, dict):
            object.__setattr__(self, "mixer_config", expected.from_dict(self.mixer_config))
        super().__post_init__()
        if type(self.mixer_config) is not expected:
            raise TypeError(f"LayerConfig: mixer {self.mixer!r} is configured by a {expected.__name__}, got "
                            f"{type(self.mixer_config).__name__}")

    def check_sizes(self, where: str) -> None:
        """Refuse a size-like integer field above ``SIZE_LIMITS["mixer"]``."""
        limit = SIZE_LIMITS["mixer"]
        for name in self.mixer_config.field_names():
            value = getattr(self.mixer_config, name)
            if _SIZE_FIELD.search(name) and isinstance(value, int) and not isinstance(value, bool) and value > limit:
                raise ValueError(f"{where}: mixer {self.mixer!r} field {name}={value} exceeds the size limit {limit}")

    @property
    def d_model(self) -> int:
        """The width the mixer config holds (its first field)."""
        if isinstance(self.mixer_config, BlockConfig):
            return self.mixer_config.d_model
        return getattr(self.mixer_config, self.mixer_config.width_field)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(ConfigBase):
    """A hybrid language model: embedding, one ``LayerConfig`` per block, final norm, LM head.

    Args:
        d_model (int): model width.
        vocab_size (int): vocabulary size (logits have this width).
        layers (tuple[LayerConfig, ...]): one per block (dicts and lists are read from JSON).
        d_intermediate (int): MLP hidden width; 0 for no MLP. Default: 0.
        mlp (str): MLP registry name (``seqblocks.registry.MLPS``). Default: "gated_mlp".
        norm_epsilon (float): norm epsilon. Default: 1e-5.
        rms_norm (bool): RMSNorm instead of LayerNorm. Default: True.
        fused_add_norm (bool): add + norm as one op. Default: True.
        residual_in_fp32 (bool): keep the residual stream in fp32. Default: False.
        tie_embeddings (bool): LM head shares the embedding matrix. Default: True.
        pad_vocab_size_multiple (int): embedding rows padded to a multiple of this. Default: 8.
        initializer (InitConfig): weight initialisation. Default: InitConfig().
        final_logit_softcapping (float | None): soft-cap of the logits, ``c * tanh(logits / c)``
            (Gemma 2). Default: None.
        mtp_n_predict (int): multi-token prediction depths (``seqblocks.models.mtp``), each a block of
            the last layer's kind; 0 disables MTP. Default: 0.
        mtp_lambda (float): weight of the MTP loss the trainer adds. Default: 0.1.
        moe (BlockConfig | None): the FFN of the MoE layers, a ``BlockConfig`` whose ``ffn`` is a
            registry FFN ("moe", "shared_moe", "latent_moe"; ``docs/moe.md``) with its MoE fields; its
            d_model must be the model's. ``from_args`` also takes a dict of BlockConfig fields (ffn
            defaults to "moe", d_ff to d_intermediate or 4 * d_model, bias to False). Default: None.
        moe_layers (tuple[int, ...] | None): the layers whose MLP is ``moe``; the others keep the dense
            MLP (d_intermediate) or none. Default: None (every layer, when ``moe`` is set).

    Derived (properties, never stored): ``n_layer``, ``mixer_types``, ``padded_vocab_size``.
    """

    d_model: int
    vocab_size: int
    layers: tuple[LayerConfig, ...]
    d_intermediate: int = 0
    mlp: str = "gated_mlp"
    norm_epsilon: float = 1e-5
    rms_norm: bool = True
    fused_add_norm: bool = True
    residual_in_fp32: bool = False
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 8
    initializer: InitConfig = dataclasses.field(default_factory=InitConfig)
    final_logit_softcapping: float | None = None
    mtp_n_predict: int = 0
    mtp_lambda: float = 0.1
    moe: BlockConfig | None = None
    moe_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, list | tuple):
            layers = tuple(LayerConfig.from_dict(x) if isinstance(x, dict) else x for x in self.layers)
            object.__setattr__(self, "layers", layers)
        super().__post_init__()
        for name in ("d_model", "vocab_size", "pad_vocab_size_multiple"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} must be a positive integer")
        if self.d_intermediate < 0:
            raise ValueError(f"ModelConfig.d_intermediate={self.d_intermediate!r} must be >= 0")
        if not self.layers or not all(isinstance(x, LayerConfig) for x in self.layers):
            raise ValueError("ModelConfig.layers must be a non-empty sequence of LayerConfig")
        sizes = {"n_layer": self.n_layer, "d_model": self.d_model, "vocab_size": self.vocab_size,
                 "d_intermediate": self.d_intermediate}
        for name, value in sizes.items():
            if value > SIZE_LIMITS[name]:
                raise ValueError(f"ModelConfig.{name}={value} exceeds the size limit {SIZE_LIMITS[name]}")
        for i, layer in enumerate(self.layers):
            layer.check_sizes(f"ModelConfig.layers[{i}]")
        widths = {i: x.d_model for i, x in enumerate(self.layers) if x.d_model != self.d_model}
        if widths:
            raise ValueError(f"ModelConfig: layers {sorted(widths)} have widths {sorted(set(widths.values()))}, "
                             f"not d_model={self.d_model}")
        MLPS.get(self.mlp)
        if not self.norm_epsilon > 0:
            raise ValueError(f"ModelConfig.norm_epsilon={self.norm_epsilon!r} must be positive")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise ValueError(f"ModelConfig.final_logit_softcapping={self.final_logit_softcapping!r} must be "
                             f"positive or None")
        check_mtp_fields("ModelConfig", self.mtp_n_predict, self.mtp_lambda)
        self._check_moe()

    def _check_moe(self) -> None:
        if self.moe is None:
            if self.moe_layers is not None:
                raise ValueError(f"ModelConfig.moe_layers={list(self.moe_layers)} needs ModelConfig.moe (the MoE FFN)")
            return
        if self.moe.d_model != self.d_model:
            raise ValueError(f"ModelConfig.moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")
        FFNS.get(self.moe.ffn)
        limit = SIZE_LIMITS["mixer"]
        for name in ("d_ff", "n_experts", "moe_d_ff", "shared_expert_d_ff", "moe_latent_size", "n_shared_experts"):
            value = getattr(self.moe, name)
            if value is not None and value > limit:
                raise ValueError(f"ModelConfig.moe.{name}={value} exceeds the size limit {limit}")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not isinstance(i, int) or not 0 <= i < self.n_layer]
            if bad or len(set(self.moe_layers)) != len(self.moe_layers):
                raise ValueError(f"ModelConfig.moe_layers={list(self.moe_layers)} must be distinct layer indices in "
                                 f"[0, n_layer={self.n_layer})")

    def layer_has_moe(self, i: int) -> bool:
        """Whether layer ``i``'s MLP is the ``moe`` FFN."""
        return self.moe is not None and (self.moe_layers is None or i in self.moe_layers)

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def mixer_types(self) -> tuple[str, ...]:
        return tuple(x.mixer for x in self.layers)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_size_multiple) * self.pad_vocab_size_multiple

    @classmethod
    def from_data(cls, data: Any, source: str = "model config") -> ModelConfig:
        """A config from JSON data in either spelling: ``to_dict`` output (it has ``layers``), or the
        constructor arguments (``d_model, n_layer, vocab_size, mixer_types, ...``; ``d_state`` may be
        left out, and the mixers then keep their own defaults). An ``mlp_cls`` there is a registered
        MLP's name or its "module:qualname" as older checkpoints wrote it: matched against the
        registered MLPs, never imported.

        Raises:
            ValueError: not a JSON object, or unknown / missing fields (naming them and the valid ones).
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: the model config must be a JSON object, got {type(data).__name__}")
        if "layers" in data:
            return cls.from_dict(data)
        args = dict(data)
        unknown = sorted(set(args) - set(ARGUMENT_FIELDS))
        missing = sorted({"d_model", "n_layer", "vocab_size", "mixer_types"} - set(args))
        if unknown or missing:
            raise ValueError(f"{source}: invalid model config (unknown fields {unknown}, missing fields {missing}); "
                             f"valid fields: {sorted(ARGUMENT_FIELDS)}")
        mlp = args.pop("mlp_cls", None)
        if mlp is not None:
            matches = [c for name, c in MLPS.items()
                       if mlp in (name, f"{c.__module__}:{c.__qualname__}")] if isinstance(mlp, str) else []
            if not matches:
                raise ValueError(f"{source}: mlp_cls {mlp!r} is not a registered MLP (registered: {MLPS.keys()}); "
                                 f"a config never imports code")
            args["mlp_cls"] = matches[0]
        return cls.from_args(**args)

    @classmethod
    def from_args(cls, d_model: int, d_state: int | None = None, n_layer: int = 1, vocab_size: int = 1,
                  mixer_types: Any = None,
                  d_intermediate: int = 0, mixer_kwargs: dict | None = None, mlp_cls: Any = None,
                  initializer_cfg: dict | None = None, **fields: Any) -> ModelConfig:
        """A config from ``LRNNLMHeadModel``'s constructor arguments (see its docstring).

        ``d_state`` (None: each mixer's own default) and ``mixer_kwargs`` are resolved into each layer's
        mixer config; ``mlp_cls`` must
        be a class registered in ``seqblocks.registry.MLPS`` (or None for ``GatedMLP``);
        ``initializer_cfg`` is read into an ``InitConfig``; ``fields`` are the remaining fields.
        """
        for name, value in (("d_model", d_model), ("d_state", d_state), ("n_layer", n_layer)):
            if name == "d_state" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LRNNLMHeadModel: {name}={value!r} must be a positive int")
        if isinstance(mixer_types, str) or not isinstance(mixer_types, list | tuple):
            raise TypeError(f"mixer_types must be a list of mixer names, got {mixer_types!r}")
        if len(mixer_types) != n_layer:
            raise ValueError(f"mixer_types has {len(mixer_types)} entries but n_layer={n_layer}")
        for t in mixer_types:
            if not isinstance(t, str):
                raise TypeError(f"mixer_types entries must be registered names (str), got {t!r}")
            MIXERS.get(t)
        per_layer = resolve_mixer_kwargs(mixer_types, mixer_kwargs)
        layers = tuple(LayerConfig(mixer=t, mixer_config=mixer_config(t, d_model, d_state=d_state, kwargs=kw))
                       for t, kw in zip(mixer_types, per_layer))
        if mlp_cls is not None:
            names = MLPS.names_of(mlp_cls)
            if not names:
                raise ValueError(f"mlp_cls={mlp_cls!r} is not a registered MLP; register the class with "
                                 f"seqblocks.registry.mlp_registry.register(name) (registered: {MLPS.keys()})")
            fields["mlp"] = names[0]
        if initializer_cfg is not None:
            if not isinstance(initializer_cfg, dict):
                raise TypeError(f"initializer_cfg must be a dict, got {type(initializer_cfg).__name__}")
            fields["initializer"] = InitConfig.from_dict(initializer_cfg)
        moe = fields.get("moe")
        if isinstance(moe, dict) and "d_model" not in moe:
            defaults = {"ffn": "moe", "d_model": d_model, "bias": False,
                        "d_ff": d_intermediate if d_intermediate > 0 else 4 * d_model}
            fields["moe"] = BlockConfig.from_dict({**defaults, **moe})
        return cls(d_model=d_model, vocab_size=vocab_size, layers=layers, d_intermediate=d_intermediate, **fields)
