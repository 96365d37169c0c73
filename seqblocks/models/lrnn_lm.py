"""``LRNNLMHeadModel``: the hybrid language model over any registered mixers.

Embedding, a stack of ``Block`` s (Add -> Norm -> Mixer, then Add -> Norm -> MLP), final norm, LM
head. Its constructor keeps the hybrid-LM arguments (``d_model, d_state, n_layer, vocab_size,
mixer_types, ...``) and reads them into a ``ModelConfig``; the model is built from that config
alone, so ``LRNNLMHeadModel.from_config(model.config)`` rebuilds the same architecture.

Shapes: B batch, T time, D width, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from seqblocks.blocks import Block
from seqblocks.layers.build import build_mixer
from seqblocks.layers.checks import check_lengths, check_timesteps
from seqblocks.layers.norm import LayerNorm, RMSNorm, norm_params
from seqblocks.models.engine import CausalLM
from seqblocks.models.model_config import ModelConfig
from seqblocks.ops.add_norm import add_norm
from seqblocks.registry import FFNS, MLPS, MODELS

__all__ = ["LRNNLMHeadModel", "LRNNModel"]


@MODELS.register("LRNNLMHeadModel")
class LRNNLMHeadModel(CausalLM):
    """Hybrid language model over any registered mixers : embedding, a stack of
    Add -> Norm -> Mixer (-> Add -> Norm -> MLP) blocks, final norm, LM head.

    Args:
        d_model (int): model width.
        d_state (int): state width, passed to the mixers whose constructor names ``d_state``.
        n_layer (int): number of blocks.
        vocab_size (int): vocabulary size (logits have this width).
        mixer_types (list[str]): one registered mixer name per layer, case-insensitive: "LRU", "S4",
            "S4D", "S5", "Centaurus", "Mamba", "RGLRU", "S7", "attn", and any other registered mixer
            ("mla", "sliding_window", ...). Attention layers are causal; attention without a head count
            in ``mixer_kwargs`` gets ``default_num_heads(d_model)`` heads.
        d_intermediate (int): MLP hidden width; 0 for no MLP. Default: 0.
        mixer_kwargs (dict | None): mixer config values, per mixer type (``{"S5": {...}}``) or one dict
            for all mixers (each takes the keys its config has). Default: None.
        mlp_cls (type | None): MLP class registered in ``seqblocks.registry.mlp_registry``, built as
            ``mlp_cls(d_model, hidden_features=d_intermediate, out_features=d_model, device=, dtype=)``.
            Default: None (``GatedMLP``).
        norm_epsilon (float): norm epsilon. Default: 1e-5.
        rms_norm (bool): RMSNorm instead of LayerNorm. Default: True.
        fused_add_norm (bool): add + norm as one op (on CPU too). Default: True.
        residual_in_fp32 (bool): keep the residual stream in fp32. Default: False.
        tie_embeddings (bool): LM head shares the embedding matrix. Default: True.
        pad_vocab_size_multiple (int): embedding rows padded to a multiple of this. Default: 8.
        initializer_cfg (dict | None): ``initializer_range`` (0.02, embedding std),
            ``rescale_prenorm_residual`` (True: divide each residual output projection by
            sqrt(n_residuals_per_layer * n_layer), once), ``n_residuals_per_layer`` (default 1, or 2
            with an MLP). Default: None (those defaults).
        device, dtype: parameter placement. Default: None.
        final_logit_softcapping (float | None): keyword only; soft-cap of the logits,
            ``c * tanh(logits / c)`` (Gemma 2). Default: None.
        mtp_n_predict (int): keyword only; multi-token prediction depths (``seqblocks.models.mtp``),
            each a ``Block`` like the last layer's. Default: 0 (off).
        mtp_lambda (float): keyword only; weight of the MTP loss in training. Default: 0.1.
        moe (dict | BlockConfig | None): keyword only; the mixture-of-experts FFN of the MoE layers
            (``ModelConfig.moe``; e.g. ``{"ffn": "moe", "n_experts": 8, "top_k_experts": 2}``). Its
            balance losses reach ``CausalLMOutput.aux_loss``. Default: None.
        moe_layers (list[int] | None): keyword only; the layers with the MoE FFN (the others keep the
            dense MLP of d_intermediate, or none). Default: None (every layer).

    The arguments are read into a ``ModelConfig`` (``model.config``); ``LRNNLMHeadModel.from_config``
    builds from one directly.

    Raises:
        ValueError: inconsistent sizes, unknown mixer names, unknown keys in mixer_kwargs (naming the
            key, the mixer and its accepted keys), an unregistered mlp_cls.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        n_layer: int,
        vocab_size: int,
        mixer_types: list,
        d_intermediate: int = 0,
        mixer_kwargs: dict | None = None,
        mlp_cls=None,
        norm_epsilon: float = 1e-5,
        rms_norm: bool = True,
        fused_add_norm: bool = True,
        residual_in_fp32: bool = False,
        tie_embeddings: bool = True,
        pad_vocab_size_multiple: int = 8,
        initializer_cfg: dict | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        final_logit_softcapping: float | None = None,
        mtp_n_predict: int = 0,
        mtp_lambda: float = 0.1,
        moe: dict | Any | None = None,
        moe_layers: list | None = None,
        config: ModelConfig | None = None,
    ) -> None:
        # ``config`` (keyword only) builds from a ModelConfig and ignores the other arguments; it is
        # how ``from_config`` enters, so every construction path runs this one __init__.
        super().__init__()
        if config is None:
            config = ModelConfig.from_args(
                d_model, d_state, n_layer, vocab_size, mixer_types, d_intermediate=d_intermediate,
                mixer_kwargs=mixer_kwargs, mlp_cls=mlp_cls, initializer_cfg=initializer_cfg,
                norm_epsilon=norm_epsilon, rms_norm=rms_norm, fused_add_norm=fused_add_norm,
                residual_in_fp32=residual_in_fp32, tie_embeddings=tie_embeddings,
                pad_vocab_size_multiple=pad_vocab_size_multiple, final_logit_softcapping=final_logit_softcapping,
                mtp_n_predict=mtp_n_predict, mtp_lambda=mtp_lambda,
                **({"moe": moe} if moe is not None else {}),
                **({"moe_layers": tuple(moe_layers)} if moe_layers is not None else {}))
        elif not isinstance(config, ModelConfig):
            raise TypeError(f"LRNNLMHeadModel: config must be a ModelConfig, got {type(config).__name__}")
        self._build(config, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, config: ModelConfig, *, device=None, dtype=None) -> LRNNLMHeadModel:
        """Build from a ``ModelConfig``."""
        if not isinstance(config, ModelConfig):
            raise TypeError(f"LRNNLMHeadModel.from_config expects a ModelConfig, got {type(config).__name__}")
        return cls(config.d_model, 1, config.n_layer, config.vocab_size, list(config.mixer_types), config=config,
                   device=device, dtype=dtype)

    def _build(self, config: ModelConfig, device=None, dtype=None) -> None:
        self.config = config
        self.n_layer = config.n_layer
        self.mixer_types = list(config.mixer_types)
        self.fused_add_norm = config.fused_add_norm
        self.residual_in_fp32 = config.residual_in_fp32
        factory = {"device": device, "dtype": dtype}
        D = config.d_model
        self._build_embedding(config.vocab_size, D, config.pad_vocab_size_multiple, config.tie_embeddings, None,
                              **factory)
        norm_cls = functools.partial(RMSNorm if config.rms_norm else LayerNorm, eps=config.norm_epsilon, **factory)
        mlp_cls = None
        if config.d_intermediate > 0:
            mlp_cls = functools.partial(MLPS.get(config.mlp), hidden_features=config.d_intermediate,
                                        out_features=D, **factory)

        def moe_cls(_dim: int) -> nn.Module:
            return FFNS.get(config.moe.ffn)(config.moe, **factory)

        def block(layer_idx: int, layer) -> Block:
            mixer = build_mixer(layer.mixer, layer.mixer_config, layer_idx=layer_idx, **factory)
            mlp = moe_cls if config.layer_has_moe(layer_idx) else (mlp_cls or nn.Identity)
            return Block(D, mixer_cls=lambda _dim: mixer, mlp_cls=mlp, norm_cls=norm_cls,
                         fused_add_norm=config.fused_add_norm, residual_in_fp32=config.residual_in_fp32)

        self.layers = nn.ModuleList(block(i, layer) for i, layer in enumerate(config.layers))
        self.norm_f = norm_cls(D)
        self._build_head(**factory)
        self._build_mtp(config.mtp_n_predict, lambda: block(config.n_layer - 1, config.layers[-1]),
                        config.norm_epsilon, **factory)
        self._apply_initializer(config.initializer, [[layer.mixer if layer.norm is not None else None, layer.mlp]
                                                     for layer in self.layers])

    def mixers(self) -> list[nn.Module]:
        return [layer.mixer for layer in self.layers]

    def _backbone(self, hidden: torch.Tensor, caches: Any, inputs: list[dict[str, Any]],
                  hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        residual = None
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:  # the residual stream entering layer i: residual + branch output
                hidden_states.append(hidden if residual is None else (residual + hidden).to(hidden.dtype))
            cache = None if caches is None else caches[i]
            hidden, residual = layer(hidden, residual, inference_params=cache, **inputs[i])
        if self.fused_add_norm:
            weight, bias, eps, is_rms = norm_params(self.norm_f, hidden.dtype)
            out = add_norm(hidden, residual, weight, bias, eps, is_rms, residual_in_fp32=self.residual_in_fp32)
        else:
            residual = hidden if residual is None else residual + hidden
            if self.residual_in_fp32:
                residual = residual.float()
            out = self.norm_f(residual).to(hidden.dtype)
        if hidden_states is not None:
            hidden_states.append(out)
        return out

    # ---------------------------------------------------------------- checkpoints

    def checkpoint_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> LRNNLMHeadModel:
        return cls.from_config(ModelConfig.from_data(config), device=device, dtype=dtype)


    @property
    def backbone(self) -> LRNNModel:
        """This model without its head, as an ``LRNNModel`` over the same modules (no copy): its
        ``embedding``, ``layers`` and ``norm_f`` are this model's, and calling it gives the final
        hidden states [B, T, D]."""
        return LRNNModel._over(self)


class LRNNModel(nn.Module):
    """The backbone of ``LRNNLMHeadModel``: embedding, blocks and final norm, giving hidden states.

    Built standalone with the hybrid-LM arguments (its state dict then holds ``embedding``,
    ``layers`` and ``norm_f``), or read off a language model as ``lm.backbone``, which shares that
    model's modules.

    Args:
        d_model, d_state, n_layer, vocab_size, mixer_types, d_intermediate, mixer_kwargs, mlp_cls,
        norm_epsilon, rms_norm, initializer_cfg, fused_add_norm, residual_in_fp32, device, dtype: as
            ``LRNNLMHeadModel`` (the embedding has exactly ``vocab_size`` rows).

    Raises:
        ValueError: as ``LRNNLMHeadModel``.
    """

    def __init__(self, d_model: int, d_state: int, n_layer: int, vocab_size: int, mixer_types: list,
                 d_intermediate: int = 0, mixer_kwargs: dict | None = None, mlp_cls=None, norm_epsilon: float = 1e-5,
                 rms_norm: bool = True, initializer_cfg: dict | None = None, fused_add_norm: bool = True,
                 residual_in_fp32: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        # A tied head adds no parameter: the model is the engine that runs the backbone.
        lm = LRNNLMHeadModel(d_model, d_state, n_layer, vocab_size, mixer_types, d_intermediate=d_intermediate,
                             mixer_kwargs=mixer_kwargs, mlp_cls=mlp_cls, norm_epsilon=norm_epsilon, rms_norm=rms_norm,
                             fused_add_norm=fused_add_norm, residual_in_fp32=residual_in_fp32, tie_embeddings=True,
                             pad_vocab_size_multiple=1, initializer_cfg=initializer_cfg, device=device, dtype=dtype)
        self._attach(lm)

    @classmethod
    def _over(cls, lm: LRNNLMHeadModel) -> LRNNModel:
        view = cls.__new__(cls)
        nn.Module.__init__(view)
        view._attach(lm)
        return view

    def _attach(self, lm: LRNNLMHeadModel) -> None:
        self.__dict__["_lm"] = lm  # not a submodule: the head is not part of the backbone
        self.embedding = lm.embedding
        self.layers = lm.layers
        self.norm_f = lm.norm_f
        self.config = lm.config

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> Any:
        """Caches of every layer, as ``LRNNLMHeadModel.allocate_inference_cache``."""
        return self._lm.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, input_ids: torch.Tensor, inference_params: Any = None,
                integration_timesteps: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **mixer_kwargs: Any) -> torch.Tensor:
        """Final hidden states [B, T, D] (after the final norm) of input_ids [B, T]; the arguments are
        those of ``LRNNLMHeadModel.forward``, and caches given as ``inference_params`` advance."""
        lm = self._lm
        B, T = lm._check_ids(input_ids)
        owner = type(self).__name__
        cp = lm._context_parallel(T, inference_params)  # input_ids: this rank's chunk (see LRNNLMHeadModel)
        check_lengths(owner, lengths, B, T if cp is None else T * cp.world_size)
        check_timesteps(owner, integration_timesteps, B, T)
        if inference_params is not None:
            lm._check_caches(inference_params, B, T)
        extra = {k: v for k, v in mixer_kwargs.items() if v is not None}
        unused = sorted(set(extra) - set().union(*lm._route(extra))) if extra else []
        if unused:
            raise TypeError(f"{owner}.forward: the inputs {unused} are declared by no mixer of this model")
        if lengths is not None:
            lengths = lengths.to(device=input_ids.device, dtype=torch.long)
        return lm._final_hidden(input_ids, inference_params, position_ids, integration_timesteps, lengths, extra)

    def step(self, input_ids: torch.Tensor, caches: Any, integration_timesteps: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Hidden states [B, 1, D] of one token per row; ``caches`` advance in place."""
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
            input_ids = input_ids[:, None]
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"LRNNModel.step expects input_ids of shape [B, 1], got {shape}")
        if isinstance(integration_timesteps, torch.Tensor) and integration_timesteps.dim() == 1:
            integration_timesteps = integration_timesteps[:, None]
        return self.forward(input_ids, caches, integration_timesteps=integration_timesteps)
