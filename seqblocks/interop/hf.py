"""Hugging Face model folders <-> seqblocks models.

``from_hf(path, **overrides)`` reads a local folder written by a transformers model's
``save_pretrained`` (config.json + safetensors, sharded or not, or a ``.bin`` read with
``torch.load(weights_only=True)``), picks the family from config.json's ``architectures`` (else its
``model_type``), translates the config into a seqblocks one and renames the weights. ``save_hf(model,
path)`` does the reverse: a folder the matching transformers class loads with the same logits.

Families (``FAMILIES``): Mamba and Mamba-2 become an ``LRNNLMHeadModel``; Llama, Mistral, Qwen2, Qwen3,
GPT-2 and RecurrentGemma a ``LanguageModel`` of ``ConfigurableBlock`` s. A folder of mamba_ssm's own
format (``seqblocks.interop.mamba_ssm``) is recognised too. docs/interop.md has the name maps and the
known numerical differences.

Export checks that the model is one the family can express: it translates the config it is about to
write back into a seqblocks config and compares the two on every field that changes the function
(sizes, norms, positions, biases, windows, soft-caps, ...); a difference raises naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqblocks.config import BlockConfig
from seqblocks.interop._files import (
    as_folder,
    copy_tokenizer,
    finite_or_none,
    load_tokenizer,
    read_config,
    read_weights,
    tokenizer_files,
    write_weights,
)
from seqblocks.layers.attention.mha import GQA, MHA, SlidingWindowAttention
from seqblocks.layers.mixers.mamba import Mamba
from seqblocks.layers.mixers.mamba2 import Mamba2
from seqblocks.layers.mixers.rglru import RGLRU
from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig
from seqblocks.models.lrnn_lm import LRNNLMHeadModel
from seqblocks.registry import CONVERTERS, MIXERS

__all__ = ["FAMILIES", "ARCHITECTURES", "from_hf", "save_hf", "detect_family", "hf_config_of", "family_of"]

#: transformers class name -> family name.
ARCHITECTURES = {
    "MambaForCausalLM": "mamba",
    "Mamba2ForCausalLM": "mamba2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "RecurrentGemmaForCausalLM": "recurrent_gemma",
    "GPT2LMHeadModel": "gpt2",
}
#: family name -> transformers class name (the one ``save_hf`` writes).
FAMILIES = {family: arch for arch, family in ARCHITECTURES.items()}

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def _supported() -> str:
    return ", ".join(f"{arch} ({family})" for arch, family in ARCHITECTURES.items()) + \
        ", and mamba_ssm's MambaLMHeadModel folders"


def _get(hf: dict[str, Any], key: str, family: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"{family} config.json lacks {key!r}, which the model needs")
    return hf[key]


# ---------------------------------------------------------------------------------------------- detection


def detect_family(config: dict[str, Any], source: str = "config.json") -> str:
    """The family of a config.json: its first known ``architectures`` entry, else its ``model_type``;
    ``"mamba_ssm"`` for mamba_ssm's own format (MambaConfig fields, no ``model_type``).

    Raises:
        ValueError: a model no family covers; the message names the supported ones.
    """
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise ValueError(f"{source}: 'architectures' must be a list, got {archs!r}")
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = config.get("model_type")
    if not archs and model_type in FAMILIES:
        return model_type
    if model_type is None and not archs and {"d_model", "n_layer", "vocab_size"} <= set(config):
        return "mamba_ssm"
    what = f"architectures {archs}" if archs else f"model_type {model_type!r}"
    raise ValueError(f"{source} describes {what}, which seqblocks cannot import; supported: {_supported()}")


# ---------------------------------------------------------------------------------------------- RoPE


def _rope_fields(hf: dict[str, Any], family: str) -> tuple[dict[str, Any], float]:
    """(BlockConfig RoPE fields, partial_rotary_factor) from ``rope_parameters`` (transformers >= 5)
    or the older ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor`` keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**legacy, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    partial = float(merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        fields["rope_scaling"] = float(merged["factor"])
    elif rope_type == "llama3":
        fields.update(rope_scaling=float(merged["factor"]), rope_scaling_type="llama3", rope_scaling_kwargs={
            "low_freq_factor": float(merged["low_freq_factor"]),
            "high_freq_factor": float(merged["high_freq_factor"]),
            "original_max_positions": int(merged["original_max_position_embeddings"])})
    else:
        raise ValueError(f"{family}: RoPE type {rope_type!r} is not supported; supported: default, linear, llama3")
    return fields, partial


def _rope_parameters(block: BlockConfig) -> dict[str, Any]:
    """transformers' ``rope_parameters`` for a block's RoPE."""
    params: dict[str, Any] = {"rope_theta": block.rope_theta, "rope_type": "default"}
    if block.rope_scaling != 1.0:
        if block.rope_scaling_type == "linear":
            params.update(rope_type="linear", factor=block.rope_scaling)
        elif block.rope_scaling_type == "llama3":
            kw = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_positions": 8192,
                  **block.rope_scaling_kwargs}
            params.update(rope_type="llama3", factor=block.rope_scaling, low_freq_factor=kw["low_freq_factor"],
                          high_freq_factor=kw["high_freq_factor"],
                          original_max_position_embeddings=kw["original_max_positions"])
        else:
            raise ValueError(f"save_hf: RoPE scaling {block.rope_scaling_type!r} has no transformers counterpart "
                             f"here; exportable: linear, llama3")
    if block.rotary_dim is not None and block.rotary_dim != block.effective_head_dim:
        params["partial_rotary_factor"] = block.rotary_dim / block.effective_head_dim
    return params


def _rotary_dim(head_dim: int, partial: float) -> int | None:
    dim = int(head_dim * partial)
    return None if dim == head_dim else dim


# ---------------------------------------------------------------------------------------------- config in


_ACTIVATIONS = {"silu": "gated", "swish": "gated", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh",
                "gelu_new": "geglu_tanh"}


def _llama_like_config(hf: dict[str, Any], family: str) -> LanguageModelConfig:
    D, L = _get(hf, "hidden_size", family), _get(hf, "num_hidden_layers", family)
    H = _get(hf, "num_attention_heads", family)
    Hkv = hf.get("num_key_value_heads") or H
    head_dim = hf.get("head_dim") or D // H
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{family}: hidden_act={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias, out_bias = attention_bias, attention_bias
    if family == "qwen2":
        qkv_bias, out_bias = True, False
    elif family == "mistral":
        qkv_bias, out_bias = False, False
    windows: list[int | None] = [None] * L
    window = hf.get("sliding_window")
    if family == "mistral":
        windows = [window] * L
    elif family in ("qwen2", "qwen3"):
        types = hf.get("layer_types")
        if types is None:
            on = bool(hf.get("use_sliding_window", False)) and window is not None
            start = hf.get("max_window_layers", L)
            types = ["sliding_attention" if on and i >= start else "full_attention" for i in range(L)]
        if len(types) != L:
            raise ValueError(f"{family}: layer_types has {len(types)} entries for {L} layers")
        windows = [window if t == "sliding_attention" else None for t in types]
    rope, partial = _rope_fields(hf, family)
    common = dict(attention="gqa", ffn=_ACTIVATIONS[act], norm="rms_norm", position="rope", d_model=D, n_heads=H,
                  n_kv_heads=Hkv, head_dim=head_dim, d_ff=_get(hf, "intermediate_size", family),
                  bias=bool(hf.get("mlp_bias", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  max_seq_len=int(hf.get("max_position_embeddings", 2048)), rotary_dim=_rotary_dim(head_dim, partial),
                  qk_norm=family == "qwen3", mixer_kwargs={"qkv_proj_bias": qkv_bias, "out_proj_bias": out_bias},
                  **rope)
    blocks = tuple(BlockConfig(window_size=w, **common) for w in windows)
    return LanguageModelConfig(vocab_size=_get(hf, "vocab_size", family), blocks=blocks,
                               tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "standard", "relu": "relu"}


def _gpt2_config(hf: dict[str, Any]) -> LanguageModelConfig:
    D, L, H = (_get(hf, k, "gpt2") for k in ("n_embd", "n_layer", "n_head"))
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise ValueError(f"gpt2: activation_function={act!r} is not supported; supported: {sorted(_GPT2_ACTIVATIONS)}")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("gpt2: scale_attn_by_inverse_layer_idx=True (a per-layer score scale) is not supported")
    if hf.get("add_cross_attention", False):
        raise ValueError("gpt2: add_cross_attention=True is not supported (a decoder-only LM is imported)")
    mixer_kwargs = {} if hf.get("scale_attn_weights", True) else {"softmax_scale": 1.0}
    block = BlockConfig(attention="mha", ffn=_GPT2_ACTIVATIONS[act], norm="layer_norm", position="learned", d_model=D,
                        n_heads=H, d_ff=hf.get("n_inner") or 4 * D, bias=True,
                        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                        max_seq_len=int(_get(hf, "n_positions", "gpt2")), mixer_kwargs=mixer_kwargs)
    return LanguageModelConfig(vocab_size=_get(hf, "vocab_size", "gpt2"), blocks=(block,) * L,
                               tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def bf16_sqrt(d_model: int) -> float:
    """sqrt(d_model) rounded to bfloat16: RecurrentGemma's embedding scale, which the reference
    keeps as a bfloat16 constant whatever the model dtype."""
    return float(torch.tensor(math.sqrt(d_model), dtype=torch.bfloat16))


def _recurrent_gemma_config(hf: dict[str, Any]) -> LanguageModelConfig:
    family = "recurrent_gemma"
    D, L, H = (_get(hf, k, family) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    Hkv = hf.get("num_key_value_heads") or H
    lru_width = hf.get("lru_width") or D
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"{family}: hidden_activation={act!r} is not supported; supported: gelu_pytorch_tanh")
    types = list(hf.get("block_types") or ("recurrent", "recurrent", "attention"))
    unknown = sorted(set(types) - {"recurrent", "attention"})
    if unknown:
        raise ValueError(f"{family}: block_types {unknown} are not 'recurrent' / 'attention'")
    pattern = (types * (L // len(types) + 1))[:L]
    head_dim = D // H
    # the family's default rotary fraction is one half
    rope, partial = _rope_fields({**hf, "partial_rotary_factor": hf.get("partial_rotary_factor", 0.5)}, family)
    expand = lru_width // D if lru_width % D == 0 else lru_width / D
    if int(expand * D) != lru_width:
        raise ValueError(f"{family}: lru_width={lru_width} is not expressible as a width multiple of hidden_size={D}")
    common = dict(ffn="geglu_tanh", norm="gemma_rms_norm", d_model=D, n_heads=H,
                  d_ff=_get(hf, "intermediate_size", family) // 2, bias=True,
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    recurrent = BlockConfig(attention="rglru", position="none", **common,
                            mixer_kwargs={"d_conv": int(hf.get("conv1d_width", 4)), "expand": expand, "num_heads": H,
                                          "conv_bias": True, "scale_first_input": False})
    attention = BlockConfig(attention="gqa", position="rope", n_kv_heads=Hkv, head_dim=head_dim,
                            rotary_dim=_rotary_dim(head_dim, partial),
                            window_size=int(hf.get("attention_window_size", 2048)),
                            mixer_kwargs={"qkv_proj_bias": bool(hf.get("attention_bias", False)),
                                          "out_proj_bias": True}, **common, **rope)
    blocks = tuple(recurrent if t == "recurrent" else attention for t in pattern)
    cap = hf.get("logits_soft_cap", 30.0)
    return LanguageModelConfig(vocab_size=_get(hf, "vocab_size", family), blocks=blocks,
                               tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                               embedding_scale=bf16_sqrt(D), final_logit_softcapping=cap)


def _mamba_kwargs(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """``LRNNLMHeadModel`` arguments of a (HF) Mamba / Mamba-2 config."""
    D, L = _get(hf, "hidden_size", family), _get(hf, "num_hidden_layers", family)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{family}: hidden_act={act!r} is not supported; supported: silu")
    expand = hf.get("expand", 2)
    mixer: dict[str, Any] = {"d_conv": int(hf.get("conv_kernel", 4)), "expand": expand,
                             "conv_bias": bool(hf.get("use_conv_bias", True)), "bias": bool(hf.get("use_bias", False))}
    if family == "mamba":
        rank = hf.get("time_step_rank", "auto")
        mixer["dt_rank"] = math.ceil(D / 16) if rank == "auto" else int(rank)
        name = "mamba"
    else:
        heads, head_dim = _get(hf, "num_heads", family), _get(hf, "head_dim", family)
        if heads * head_dim != int(expand * D):
            raise ValueError(f"{family}: num_heads * head_dim = {heads * head_dim} must equal expand * hidden_size = "
                             f"{int(expand * D)}")
        lo, hi = (list(hf.get("time_step_limit", (0.0, math.inf))) + [None])[:2]
        mixer.update(headdim=head_dim, ngroups=int(hf.get("n_groups", 1)), chunk_size=int(hf.get("chunk_size", 256)),
                     rmsnorm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                     dt_limit=(float(lo or 0.0), finite_or_none(hi)))
        if not hf.get("rms_norm", True):
            raise ValueError(f"{family}: rms_norm=False is not supported (the reference's gated norm is always on)")
        name = "mamba2"
    return dict(d_model=D, d_state=int(_get(hf, "state_size", family)), n_layer=L,
                vocab_size=_get(hf, "vocab_size", family), mixer_types=[name] * L, d_intermediate=0,
                mixer_kwargs={name: mixer}, norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), rms_norm=True,
                residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", family == "mamba")), pad_vocab_size_multiple=1)


def config_from_hf(hf: dict[str, Any], family: str) -> LanguageModelConfig | dict[str, Any]:
    """The seqblocks config of an HF config of ``family``: a ``LanguageModelConfig``, or the
    ``LRNNLMHeadModel`` arguments (a dict) for the Mamba families."""
    if family in _LLAMA_LIKE:
        return _llama_like_config(hf, family)
    if family == "gpt2":
        return _gpt2_config(hf)
    if family == "recurrent_gemma":
        return _recurrent_gemma_config(hf)
    if family in ("mamba", "mamba2"):
        return _mamba_kwargs(hf, family)
    raise ValueError(f"unknown family {family!r}; supported: {sorted(FAMILIES)}")


# ---------------------------------------------------------------------------------------------- overrides


def apply_overrides(spec: LanguageModelConfig | dict[str, Any], overrides: dict[str, Any]) -> Any:
    """``spec`` with ``overrides`` applied: a field of the model config, else of every block
    (``BlockConfig``) / of the LM's constructor, else of every mixer that has it (into its mixer_kwargs).

    Raises:
        ValueError: a key none of them has; the message lists the accepted keys.
    """
    if not overrides:
        return spec
    if isinstance(spec, LanguageModelConfig):
        model_fields = set(LanguageModelConfig.field_names()) - {"blocks"}
        block_fields = set(BlockConfig.field_names())
        model_changes = {k: v for k, v in overrides.items() if k in model_fields}
        block_changes = {k: v for k, v in overrides.items() if k in block_fields and k not in model_fields}
        rest = {k: v for k, v in overrides.items() if k not in model_changes and k not in block_changes}
        blocks = []
        used: set[str] = set()
        for block in spec.blocks:
            names = _mixer_fields(block.attention)
            mine = {k: v for k, v in rest.items() if k in names}
            used |= set(mine)
            blocks.append(block.replace(**block_changes, mixer_kwargs={**block.mixer_kwargs, **mine}))
        unknown = sorted(set(rest) - used)
        if unknown:
            raise ValueError(f"from_hf: unknown overrides {unknown}; accepted: LanguageModelConfig fields "
                             f"{sorted(model_fields)}, BlockConfig fields, or an option of the model's mixers")
        return spec.replace(blocks=tuple(blocks), **model_changes)
    spec = dict(spec)
    top = {"norm_epsilon", "rms_norm", "fused_add_norm", "residual_in_fp32", "tie_embeddings",
           "pad_vocab_size_multiple", "final_logit_softcapping", "mtp_n_predict", "mtp_lambda", "initializer_cfg"}
    unknown = []
    for key, value in overrides.items():
        if key in top:
            spec[key] = value
            continue
        hit = False
        for name, kwargs in spec["mixer_kwargs"].items():
            if key in _mixer_fields(name):
                spec["mixer_kwargs"] = {**spec["mixer_kwargs"], name: {**kwargs, key: value}}
                hit = True
        if not hit:
            unknown.append(key)
    if unknown:
        raise ValueError(f"from_hf: unknown overrides {sorted(unknown)}; accepted: {sorted(top)} or an option of "
                         f"the model's mixers")
    return spec


def _mixer_fields(name: str) -> set[str]:
    cls = MIXERS.get(name)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        return set()
    try:
        return set(config_class().field_names())
    except (TypeError, ValueError):
        return set()


# ---------------------------------------------------------------------------------------------- weights in


def _cat(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    if all(t is None for t in tensors):
        return None
    if any(t is None for t in tensors):
        raise ValueError("a fused projection has a bias in some of its parts only")
    return torch.cat(tensors, dim=0)


class _Source:
    """The HF tensors, taken by name; ``left()`` lists what no rule read."""

    def __init__(self, state: dict[str, torch.Tensor], family: str) -> None:
        self.state, self.family, self.read = state, family, set()

    def take(self, name: str, optional: bool = False) -> torch.Tensor | None:
        if name not in self.state:
            if optional:
                return None
            raise ValueError(f"{self.family} checkpoint lacks the tensor {name!r} (is it a {FAMILIES[self.family]} "
                             f"checkpoint, complete and of this config?)")
        self.read.add(name)
        return self.state[name]

    def left(self, ignore: tuple[str, ...] = ()) -> list[str]:
        return sorted(k for k in self.state if k not in self.read and not k.endswith(ignore))


def _put(out: dict[str, torch.Tensor], name: str, value: torch.Tensor | None) -> None:
    if value is not None:
        out[name] = value


def _llama_like_weights(src: _Source, config: LanguageModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"embedding.weight": src.take("model.embed_tokens.weight"),
                                    "norm_f.weight": src.take("model.norm.weight")}
    for i in range(config.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        out[q + "attention.in_proj.weight"] = torch.cat([src.take(a + f"{n}_proj.weight") for n in "qkv"])
        _put(out, q + "attention.in_proj.bias", _cat(*(src.take(a + f"{n}_proj.bias", True) for n in "qkv")))
        out[q + "attention.out_proj.weight"] = src.take(a + "o_proj.weight")
        _put(out, q + "attention.out_proj.bias", src.take(a + "o_proj.bias", True))
        if config.blocks[i].qk_norm:
            out[q + "attention.q_norm.weight"] = src.take(a + "q_norm.weight")
            out[q + "attention.k_norm.weight"] = src.take(a + "k_norm.weight")
        m = p + "mlp."
        out[q + "ffn.gate_up.weight"] = torch.cat([src.take(m + "gate_proj.weight"), src.take(m + "up_proj.weight")])
        _put(out, q + "ffn.gate_up.bias",
             _cat(src.take(m + "gate_proj.bias", True), src.take(m + "up_proj.bias", True)))
        out[q + "ffn.down.weight"] = src.take(m + "down_proj.weight")
        _put(out, q + "ffn.down.bias", src.take(m + "down_proj.bias", True))
        out[q + "attn_norm.weight"] = src.take(p + "input_layernorm.weight")
        out[q + "ffn_norm.weight"] = src.take(p + "post_attention_layernorm.weight")
    return out


def _gpt2_weights(src: _Source, config: LanguageModelConfig) -> dict[str, torch.Tensor]:
    t = "transformer."
    out = {"embedding.weight": src.take(t + "wte.weight"), "position.table.weight": src.take(t + "wpe.weight"),
           "norm_f.weight": src.take(t + "ln_f.weight"), "norm_f.bias": src.take(t + "ln_f.bias")}
    for i in range(config.n_layers):
        p, q = f"{t}h.{i}.", f"layers.{i}."
        # GPT-2's Conv1D stores [in, out]: transposed against nn.Linear.
        for hf_name, ours in (("attn.c_attn", "attention.in_proj"), ("attn.c_proj", "attention.out_proj"),
                              ("mlp.c_fc", "ffn.up"), ("mlp.c_proj", "ffn.down")):
            out[f"{q}{ours}.weight"] = src.take(f"{p}{hf_name}.weight").t()
            out[f"{q}{ours}.bias"] = src.take(f"{p}{hf_name}.bias")
        for hf_name, ours in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[f"{q}{ours}.weight"] = src.take(f"{p}{hf_name}.weight")
            out[f"{q}{ours}.bias"] = src.take(f"{p}{hf_name}.bias")
    return out


def _recurrent_gemma_weights(src: _Source, config: LanguageModelConfig) -> dict[str, torch.Tensor]:
    out = {"embedding.weight": src.take("model.embed_tokens.weight"),
           "norm_f.weight": src.take("model.final_norm.weight")}
    for i, block in enumerate(config.blocks):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        t = p + "temporal_block."
        if block.attention == "rglru":
            for hf_name, ours in (("linear_y", "gate_proj"), ("linear_x", "in_proj"), ("linear_out", "out_proj")):
                out[f"{q}attention.{ours}.weight"] = src.take(f"{t}{hf_name}.weight")
                out[f"{q}attention.{ours}.bias"] = src.take(f"{t}{hf_name}.bias")
            out[q + "attention.conv_weight"] = src.take(t + "conv_1d.weight")[:, 0]
            out[q + "attention.conv_bias"] = src.take(t + "conv_1d.bias")
            # the reference's decay is sigmoid(-recurrent_param); ours is sigmoid(a_param)
            out[q + "attention.a_param"] = -src.take(t + "rg_lru.recurrent_param")
            out[q + "attention.gate_weight"] = torch.stack([src.take(t + "rg_lru.recurrent_gate_weight"),
                                                            src.take(t + "rg_lru.input_gate_weight")])
            out[q + "attention.gate_bias"] = torch.stack([src.take(t + "rg_lru.recurrent_gate_bias"),
                                                          src.take(t + "rg_lru.input_gate_bias")])
        else:
            out[q + "attention.in_proj.weight"] = torch.cat([src.take(t + f"{n}_proj.weight") for n in "qkv"])
            _put(out, q + "attention.in_proj.bias", _cat(*(src.take(t + f"{n}_proj.bias", True) for n in "qkv")))
            out[q + "attention.out_proj.weight"] = src.take(t + "o_proj.weight")
            out[q + "attention.out_proj.bias"] = src.take(t + "o_proj.bias")
        m = p + "mlp_block."
        out[q + "ffn.gate_up.weight"] = torch.cat([src.take(m + "gate_proj.weight"), src.take(m + "up_proj.weight")])
        out[q + "ffn.gate_up.bias"] = torch.cat([src.take(m + "gate_proj.bias"), src.take(m + "up_proj.bias")])
        out[q + "ffn.down.weight"] = src.take(m + "down_proj.weight")
        out[q + "ffn.down.bias"] = src.take(m + "down_proj.bias")
        out[q + "attn_norm.weight"] = src.take(p + "temporal_pre_norm.weight")
        out[q + "ffn_norm.weight"] = src.take(p + "channel_pre_norm.weight")
    return out


def _mamba_weights(src: _Source, n_layer: int, family: str) -> dict[str, torch.Tensor]:
    out = {"embedding.weight": src.take("backbone.embeddings.weight"),
           "norm_f.weight": src.take("backbone.norm_f.weight")}
    names = {"mamba": ("A_log", "D", "in_proj.weight", "in_proj.bias", "x_proj.weight", "dt_proj.weight",
                       "dt_proj.bias", "out_proj.weight", "out_proj.bias"),
             "mamba2": ("A_log", "D", "dt_bias", "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias",
                        "norm.weight", "out_proj.weight", "out_proj.bias")}[family]
    for i in range(n_layer):
        p, q = f"backbone.layers.{i}.", f"layers.{i}."
        out[q + "norm.weight"] = src.take(p + "norm.weight")
        for name in names:
            _put(out, q + "mixer." + name, src.take(p + "mixer." + name, optional=name.endswith("bias")))
        if family == "mamba":  # ours keeps the depthwise conv as [E, W]
            out[q + "mixer.conv_weight"] = src.take(p + "mixer.conv1d.weight")[:, 0]
            _put(out, q + "mixer.conv_bias", src.take(p + "mixer.conv1d.bias", optional=True))
    return out


def _hf_weights_in(state: dict[str, torch.Tensor], family: str, config: Any, n_layer: int) -> dict[str, torch.Tensor]:
    src = _Source(state, family)
    if family in _LLAMA_LIKE:
        out = _llama_like_weights(src, config)
    elif family == "gpt2":
        out = _gpt2_weights(src, config)
    elif family == "recurrent_gemma":
        out = _recurrent_gemma_weights(src, config)
    else:
        out = _mamba_weights(src, n_layer, family)
    head = src.take("lm_head.weight", optional=True)
    if head is not None:
        out["lm_head.weight"] = head
    # buffers older transformers wrote (GPT-2's causal-mask "attn.bias", rotary tables) carry no weights
    left = src.left(ignore=(".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
    if left:
        raise ValueError(f"{family} checkpoint has tensors no {FAMILIES[family]} of this config has: {left[:8]}"
                         f"{' ...' if len(left) > 8 else ''}")
    return out


# ---------------------------------------------------------------------------------------------- build + load


def fit_state(skeleton: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` checked against ``skeleton`` (a model of the config, e.g. on the meta device): every
    tensor given, with its shape (a tied head may be absent; vocabulary rows are zero-padded to the
    model's padded vocabulary).

    Raises:
        ValueError: naming what is missing, unexpected or mis-shaped.
    """
    own = {k: v.shape for k, v in skeleton.state_dict().items()}
    state = dict(state)
    if getattr(skeleton, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
        own.pop("lm_head.weight", None)
    padded = getattr(skeleton, "padded_vocab_size", None)
    if padded is not None:
        for key in ("embedding.weight", "lm_head.weight"):
            if key in state and key in own and state[key].dim() == 2 and state[key].shape[0] < padded:
                extra = state[key].new_zeros(padded - state[key].shape[0], state[key].shape[1])
                state[key] = torch.cat([state[key], extra])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} for {tuple(own[k])}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: the weights do not fit the model of its config: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, mis-shaped {shapes[:8]}")
    return state


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """``ValueError`` naming the tensors of ``state`` that hold NaN / Inf."""
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"{source}: tensors {bad[:8]} hold NaN / Inf (pass allow_non_finite=True to load them "
                         f"anyway)")


def copy_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the checked ``state`` (``fit_state``) into ``model``'s tensors."""
    own = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))


def _dtype_of(hf: dict[str, Any], dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype is not None else hf.get("dtype", hf.get("torch_dtype"))
    if name in (None, "auto"):
        return torch.float32
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating-point torch dtype")
    return value


def build_model(spec: LanguageModelConfig | dict[str, Any], device=None) -> nn.Module:
    """The seqblocks model of a translated config, in fp32."""
    if isinstance(spec, LanguageModelConfig):
        return LanguageModel(spec, device=device)
    return LRNNLMHeadModel(**spec, device=device)


def from_hf(path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
            allow_non_finite: bool = False, **overrides: Any) -> nn.Module:
    """Load a local Hugging Face model folder as a seqblocks model.

    Args:
        path: a folder with config.json and weights (model.safetensors, a sharded
            model.safetensors.index.json, or pytorch_model.bin read with ``torch.load(weights_only=True)``),
            written by one of ``FAMILIES``' transformers classes, or by mamba_ssm's ``MambaLMHeadModel``.
        device: where to place the model. Default: None (CPU).
        dtype: parameter dtype. Default: None (config.json's ``dtype`` / ``torch_dtype``, else fp32).
        allow_non_finite: load weights that hold NaN / Inf. Default: False (they raise).
        **overrides: seqblocks options to change on the imported config: a ``LanguageModelConfig`` /
            ``LRNNLMHeadModel`` field, a ``BlockConfig`` field (every block), or an option of the
            model's mixers (e.g. ``attention_type="flash"``, ``scale_first_input=True``, ``chunk_size=64``).

    Returns:
        An ``LRNNLMHeadModel`` (Mamba families) or a ``LanguageModel``, in eval mode, with
        ``tokenizer_path`` (the folder when it holds tokenizer files, else None) and ``tokenizer`` (a
        ``tokenizers.Tokenizer`` when tokenizer.json and the ``tokenizers`` package are both there,
        else None) set.

    Raises:
        FileNotFoundError: no folder, no config.json, no weights.
        ValueError: a family seqblocks does not import (the message names the supported ones), a
            config option it cannot express, damaged weights, weights that do not fit the config.
    """
    folder = as_folder(path, "from_hf")
    hf = read_config(folder)
    family = detect_family(hf, str(folder / "config.json"))
    target_dtype = _dtype_of(hf, dtype)
    if family == "mamba_ssm":
        from seqblocks.interop.mamba_ssm import config_from_mamba_ssm

        spec = apply_overrides(config_from_mamba_ssm(hf), overrides)
    else:
        spec = apply_overrides(config_from_hf(hf, family), overrides)
    # The config is built once on the meta device first: every constructor check runs, and the weights
    # are checked against it, before anything is allocated.
    with torch.device("meta"):
        skeleton = build_model(spec)
    state = read_weights(folder)
    if not allow_non_finite:
        check_finite(state, str(folder))
    if family == "mamba_ssm":
        from seqblocks.interop.mamba_ssm import weights_from_mamba_ssm

        state = weights_from_mamba_ssm(state, spec["n_layer"])
    else:
        n_layer = spec.n_layers if isinstance(spec, LanguageModelConfig) else spec["n_layer"]
        state = _hf_weights_in(state, family, spec, n_layer)
    state = fit_state(skeleton, state, str(folder))
    model = build_model(spec, device=device)
    copy_state(model, state)
    model = model.to(dtype=target_dtype).eval()
    model.tokenizer_path = str(folder) if tokenizer_files(folder) else None
    model.tokenizer = load_tokenizer(folder)
    return model


# ---------------------------------------------------------------------------------------------- export


def family_of(model: nn.Module) -> str:
    """The HF family a seqblocks model exports to, read from its structure.

    Raises:
        TypeError: not a seqblocks language model.
        ValueError: a model no family expresses (the message says what each needs).
    """
    if isinstance(model, LRNNLMHeadModel):
        kinds = {type(m) for m in model.mixers()}
        if kinds == {Mamba}:
            return "mamba"
        if kinds == {Mamba2}:
            return "mamba2"
        raise ValueError(f"save_hf: an LRNNLMHeadModel exports when every layer is Mamba or every layer is Mamba-2 "
                         f"(with no MLP); this one has {sorted(k.__name__ for k in kinds)}")
    if not isinstance(model, LanguageModel):
        raise TypeError(f"save_hf expects a seqblocks LRNNLMHeadModel or LanguageModel, got {type(model).__name__}")
    blocks = model.config.blocks
    kinds = {type(m) for m in model.mixers()}
    if RGLRU in kinds or blocks[0].norm == "gemma_rms_norm":
        return "recurrent_gemma"
    if blocks[0].position == "learned":
        return "gpt2"
    if any(b.qk_norm for b in blocks):
        return "qwen3"
    kw = blocks[0].mixer_kwargs
    if kw.get("qkv_proj_bias", blocks[0].bias) and not kw.get("out_proj_bias", blocks[0].bias):
        return "qwen2"
    windows = {b.window_size for b in blocks}
    if windows != {None}:
        return "mistral" if len(windows) == 1 else "qwen2"
    return "llama"


def _llama_like_hf(config: LanguageModelConfig, family: str) -> dict[str, Any]:
    b = config.blocks[0]
    act = {"gated": "silu", "swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh"}.get(b.ffn)
    if act is None:
        raise ValueError(f"save_hf({family}): ffn={b.ffn!r} has no counterpart; exportable: gated, geglu, geglu_tanh")
    hf: dict[str, Any] = {
        "vocab_size": config.vocab_size, "hidden_size": b.d_model, "intermediate_size": b.d_ff,
        "num_hidden_layers": config.n_layers, "num_attention_heads": b.n_heads,
        "num_key_value_heads": b.effective_n_kv_heads, "head_dim": b.effective_head_dim, "hidden_act": act,
        "rms_norm_eps": b.norm_eps, "max_position_embeddings": b.max_seq_len, "rope_parameters": _rope_parameters(b),
        "tie_word_embeddings": config.tie_embeddings,
    }
    qkv_bias = b.mixer_kwargs.get("qkv_proj_bias", b.bias)
    if family in ("llama", "qwen3"):
        hf["attention_bias"] = bool(qkv_bias)
    if family == "llama":
        hf["mlp_bias"] = b.bias
    windows = [blk.window_size for blk in config.blocks]
    if family == "mistral":
        hf["sliding_window"] = windows[0]
    if family in ("qwen2", "qwen3"):
        sizes = {w for w in windows if w is not None}
        if len(sizes) > 1:
            raise ValueError(f"save_hf({family}): one sliding-window size for every windowed layer, got "
                             f"{sorted(sizes)}")
        hf.update(use_sliding_window=bool(sizes), sliding_window=sizes.pop() if sizes else None,
                  layer_types=["sliding_attention" if w is not None else "full_attention" for w in windows],
                  max_window_layers=config.n_layers)
    return hf


def _gpt2_hf(config: LanguageModelConfig) -> dict[str, Any]:
    b = config.blocks[0]
    act = {"gelu_tanh": "gelu_new", "standard": "gelu", "relu": "relu"}.get(b.ffn)
    if act is None:
        raise ValueError(f"save_hf(gpt2): ffn={b.ffn!r} has no counterpart; exportable: gelu_tanh, standard, relu")
    return {"vocab_size": config.vocab_size, "n_positions": b.max_seq_len, "n_embd": b.d_model,
            "n_layer": config.n_layers, "n_head": b.n_heads, "n_inner": b.d_ff, "activation_function": act,
            "layer_norm_epsilon": b.norm_eps, "scale_attn_weights": "softmax_scale" not in b.mixer_kwargs,
            "tie_word_embeddings": config.tie_embeddings}


def _recurrent_gemma_hf(config: LanguageModelConfig) -> dict[str, Any]:
    rec = next((b for b in config.blocks if b.attention == "rglru"), None)
    att = next((b for b in config.blocks if b.attention != "rglru"), None)
    b = rec or att
    D = b.d_model
    hf: dict[str, Any] = {
        "vocab_size": config.vocab_size, "hidden_size": D, "intermediate_size": 2 * b.d_ff,
        "num_hidden_layers": config.n_layers, "num_attention_heads": b.n_heads, "rms_norm_eps": b.norm_eps,
        "hidden_activation": "gelu_pytorch_tanh", "logits_soft_cap": config.final_logit_softcapping,
        "tie_word_embeddings": config.tie_embeddings,
        "block_types": ["recurrent" if blk.attention == "rglru" else "attention" for blk in config.blocks],
    }
    if rec is not None:
        hf["lru_width"] = int(rec.mixer_kwargs.get("expand", 1) * D)
        hf["conv1d_width"] = rec.mixer_kwargs.get("d_conv", 4)
    if att is not None:
        params = _rope_parameters(att)
        params.setdefault("partial_rotary_factor", 1.0)
        hf.update(num_key_value_heads=att.effective_n_kv_heads, attention_window_size=att.window_size,
                  rope_parameters=params, attention_bias=bool(att.mixer_kwargs.get("qkv_proj_bias", att.bias)))
    return hf


def _mamba_hf(model: LRNNLMHeadModel, family: str) -> dict[str, Any]:
    c = model.config
    m = c.layers[0].mixer_config.to_dict()
    hf: dict[str, Any] = {
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "state_size": m["d_state"],
        "num_hidden_layers": c.n_layer, "layer_norm_epsilon": c.norm_epsilon, "expand": m["expand"],
        "conv_kernel": m["d_conv"], "use_bias": m["bias"], "use_conv_bias": m["conv_bias"], "hidden_act": "silu",
        "residual_in_fp32": c.residual_in_fp32, "tie_word_embeddings": c.tie_embeddings,
    }
    if family == "mamba":
        hf["time_step_rank"] = model.mixers()[0].dt_rank
    else:
        mixer = model.mixers()[0]
        lo, hi = m["dt_limit"]
        hf.update(num_heads=mixer.nheads, head_dim=m["headdim"], n_groups=m["ngroups"], chunk_size=m["chunk_size"],
                  time_step_limit=[lo, math.inf if hi is None else hi], rms_norm=True)
        if m["rmsnorm_eps"] != c.norm_epsilon:
            raise ValueError(f"save_hf(mamba2): the gated norm's rmsnorm_eps={m['rmsnorm_eps']} must equal "
                             f"norm_epsilon={c.norm_epsilon} (one layer_norm_epsilon serves both there)")
    return hf


def hf_config_of(model: nn.Module, family: str | None = None) -> tuple[str, dict[str, Any]]:
    """(family, the config.json ``save_hf`` writes for ``model``), checked to describe the same function.

    Raises:
        ValueError: the model has an option the family cannot express (named in the message).
    """
    family = family_of(model) if family is None else family
    if family not in FAMILIES:
        raise ValueError(f"save_hf: unknown family {family!r}; supported: {sorted(FAMILIES)}")
    if family in ("mamba", "mamba2"):
        if not isinstance(model, LRNNLMHeadModel):
            raise ValueError(f"save_hf({family}) needs an LRNNLMHeadModel, got {type(model).__name__}")
        hf = _mamba_hf(model, family)
    else:
        if not isinstance(model, LanguageModel):
            raise ValueError(f"save_hf({family}) needs a LanguageModel, got {type(model).__name__}")
        config = model.config
        if family in _LLAMA_LIKE:
            hf = _llama_like_hf(config, family)
        elif family == "gpt2":
            hf = _gpt2_hf(config)
        else:
            hf = _recurrent_gemma_hf(config)
    hf = {"architectures": [FAMILIES[family]], "model_type": family, **hf,
          "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    _check_round_trip(model, config_from_hf(hf, family), family)
    return family, hf


# Fields that change nothing the exported function computes (init, dropout, backends, padding).
_MODEL_IGNORE = {"initializer_range", "rescale_residual", "embedding_dropout", "pad_vocab_size_multiple",
                 "mtp_lambda", "mup_base_width", "blocks", "initializer", "fused_add_norm", "layers", "mlp",
                 "initializer_cfg"}
_BLOCK_IGNORE = {"dropout", "attention_dropout", "attention_type", "attention_block_size",
                 "linear_attention_chunk_size", "d_state", "mixer_kwargs", "attention", "head_dim", "n_kv_heads",
                 "rotary_dim", "kv_lora_rank", "q_lora_rank", "rope_dim", "rope_scaling_kwargs"}
_MIXER_IGNORE = {"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "conv_init",
                 "chunk_size", "a_init_range", "layer_idx"}


def _block_view(b: BlockConfig) -> dict[str, Any]:
    view = {k: v for k, v in b.to_dict().items() if k not in _BLOCK_IGNORE}
    cls = MIXERS.get(b.attention)
    # plain softmax attention under any of its names; variants (MQA, chunked, sparse, MLA, ...) by class
    view["mixer"] = "MHA" if cls in (MHA, GQA, SlidingWindowAttention) else cls.__name__
    view["head_dim"], view["n_kv_heads"] = b.effective_head_dim, b.effective_n_kv_heads
    view["rotary_dim"] = b.rotary_dim if b.rotary_dim is not None else b.effective_head_dim
    if b.rope_scaling != 1.0:
        view["rope_scaling_kwargs"] = b.rope_scaling_kwargs
    if b.position != "learned":
        view.pop("max_seq_len")
    if b.ffn == "swiglu":
        view["ffn"] = "gated"
    if issubclass(cls, MHA):
        kw = b.mixer_kwargs
        view.update(qkv_proj_bias=kw.get("qkv_proj_bias", b.bias), out_proj_bias=kw.get("out_proj_bias", b.bias),
                    softmax_scale=kw.get("softmax_scale"), rotary_emb_dim=kw.get("rotary_emb_dim", 0))
        extra = sorted(set(kw) - {"qkv_proj_bias", "out_proj_bias", "softmax_scale", "rotary_emb_dim"})
        view["other_mixer_kwargs"] = extra
    else:  # a recurrent mixer: the attention-only fields do nothing
        for key in ("n_heads", "n_kv_heads", "head_dim", "rotary_dim", "window_size", "qk_norm", "position",
                    "rope_theta", "rope_scaling", "rope_scaling_type", "rope_scaling_kwargs", "attn_logit_softcapping",
                    "attention_chunk_size", "sparse_select_k", "mup", "causal"):
            view.pop(key, None)
        fields = cls.config_class()
        values = {f.name: f.default for f in dataclasses.fields(fields)
                  if f.default is not dataclasses.MISSING}
        values.update({k: v for k, v in b.to_dict().items() if k in values and k not in ("mixer_kwargs",)})
        values.update(b.mixer_kwargs)
        if "expand" in values:
            values["expand"] = int(values["expand"] * b.d_model)
        view.update({f"mixer.{k}": v for k, v in values.items() if k not in _MIXER_IGNORE})
    return view


def _mixer_view(values: dict[str, Any]) -> dict[str, Any]:
    view = {k: v for k, v in values.items() if k not in _MIXER_IGNORE}
    if view.get("dt_rank") == "auto":
        view["dt_rank"] = math.ceil(view["d_model"] / 16)
    if view.get("d_ssm") is None and "headdim" in view:
        view["d_ssm"] = view["expand"] * view["d_model"]
    return view


def _check_round_trip(model: nn.Module, spec: Any, family: str) -> None:
    if isinstance(model, LanguageModel):
        ours = {k: v for k, v in model.config.to_dict().items() if k not in _MODEL_IGNORE}
        theirs = {k: v for k, v in spec.to_dict().items() if k not in _MODEL_IGNORE}
        pairs = [("", ours, theirs)]
        if len(spec.blocks) != model.config.n_layers:
            raise ValueError(f"save_hf({family}): {model.config.n_layers} layers would load as {len(spec.blocks)}")
        pairs += [(f"blocks[{i}].", _block_view(a), _block_view(b))
                  for i, (a, b) in enumerate(zip(model.config.blocks, spec.blocks))]
    else:
        c = model.config.to_dict()
        ref = LRNNLMHeadModel(**spec, device="meta").config.to_dict()
        ours = {k: v for k, v in c.items() if k not in _MODEL_IGNORE}
        theirs = {k: v for k, v in ref.items() if k not in _MODEL_IGNORE}
        ours["d_intermediate"], theirs["d_intermediate"] = c["d_intermediate"], 0
        pairs = [("", ours, theirs)]
        pairs += [(f"layers[{i}].", _mixer_view(a["mixer_config"]), _mixer_view(b["mixer_config"]))
                  for i, (a, b) in enumerate(zip(c["layers"], ref["layers"]))]
    for prefix, a, b in pairs:
        for key in sorted(set(a) | set(b)):
            if key == "other_mixer_kwargs" and a.get(key):
                raise ValueError(f"save_hf({family}): {prefix}mixer_kwargs {a[key]} have no counterpart in "
                                 f"{FAMILIES[family]}")
            if _norm(a.get(key)) != _norm(b.get(key)):
                raise ValueError(f"save_hf({family}): the model's {prefix}{key} = {a.get(key)!r} has no counterpart "
                                 f"in {FAMILIES[family]} (it would load as {b.get(key)!r})")


def _norm(value: Any) -> Any:
    """Values compared as JSON would store them (tuples as lists, ints as floats where they agree)."""
    return json.loads(json.dumps(value, sort_keys=True)) if not isinstance(value, float) else float(value)


def _hf_weights_out(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in model.state_dict().items()}
    V = model.vocab_size
    out: dict[str, torch.Tensor] = {}
    if family in ("mamba", "mamba2"):
        out["backbone.embeddings.weight"] = state["embedding.weight"][:V]
        out["backbone.norm_f.weight"] = state["norm_f.weight"]
        for key, value in state.items():
            if key.startswith("layers."):
                _, i, rest = key.split(".", 2)
                if rest == "mixer.conv_weight":
                    rest, value = "mixer.conv1d.weight", value[:, None]
                elif rest == "mixer.conv_bias":
                    rest = "mixer.conv1d.bias"
                out[f"backbone.layers.{i}.{rest}"] = value
    elif family == "gpt2":
        t = "transformer."
        out.update({t + "wte.weight": state["embedding.weight"][:V], t + "wpe.weight": state["position.table.weight"],
                    t + "ln_f.weight": state["norm_f.weight"], t + "ln_f.bias": state["norm_f.bias"]})
        for i in range(model.config.n_layers):
            p, q = f"{t}h.{i}.", f"layers.{i}."
            for hf_name, ours in (("attn.c_attn", "attention.in_proj"), ("attn.c_proj", "attention.out_proj"),
                                  ("mlp.c_fc", "ffn.up"), ("mlp.c_proj", "ffn.down")):
                out[f"{p}{hf_name}.weight"] = state[f"{q}{ours}.weight"].t()
                out[f"{p}{hf_name}.bias"] = state[f"{q}{ours}.bias"]
            for hf_name, ours in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
                out[f"{p}{hf_name}.weight"] = state[f"{q}{ours}.weight"]
                out[f"{p}{hf_name}.bias"] = state[f"{q}{ours}.bias"]
    else:
        rg = family == "recurrent_gemma"
        out["model.embed_tokens.weight"] = state["embedding.weight"][:V]
        out["model.final_norm.weight" if rg else "model.norm.weight"] = state["norm_f.weight"]
        for i, block in enumerate(model.config.blocks):
            p, q = f"model.layers.{i}.", f"layers.{i}."
            a = p + ("temporal_block." if rg else "self_attn.")
            m = p + ("mlp_block." if rg else "mlp.")
            if block.attention == "rglru":
                for hf_name, ours in (("linear_y", "gate_proj"), ("linear_x", "in_proj"), ("linear_out", "out_proj")):
                    out[f"{a}{hf_name}.weight"] = state[f"{q}attention.{ours}.weight"]
                    out[f"{a}{hf_name}.bias"] = state[f"{q}attention.{ours}.bias"]
                out[a + "conv_1d.weight"] = state[q + "attention.conv_weight"][:, None]
                out[a + "conv_1d.bias"] = state[q + "attention.conv_bias"]
                out[a + "rg_lru.recurrent_param"] = -state[q + "attention.a_param"]
                gw, gb = state[q + "attention.gate_weight"], state[q + "attention.gate_bias"]
                out.update({a + "rg_lru.recurrent_gate_weight": gw[0], a + "rg_lru.input_gate_weight": gw[1],
                            a + "rg_lru.recurrent_gate_bias": gb[0], a + "rg_lru.input_gate_bias": gb[1]})
            else:
                mixer = model.layers[i].attention
                H, Hkv, K = mixer.num_heads, mixer.num_heads_kv, mixer.head_dim
                sizes = (H * K, Hkv * K, Hkv * K)
                for n, w in zip("qkv", state[q + "attention.in_proj.weight"].split(sizes)):
                    out[f"{a}{n}_proj.weight"] = w
                if q + "attention.in_proj.bias" in state:
                    for n, bias in zip("qkv", state[q + "attention.in_proj.bias"].split(sizes)):
                        out[f"{a}{n}_proj.bias"] = bias
                out[a + "o_proj.weight"] = state[q + "attention.out_proj.weight"]
                if q + "attention.out_proj.bias" in state:
                    out[a + "o_proj.bias"] = state[q + "attention.out_proj.bias"]
                if block.qk_norm:
                    out[a + "q_norm.weight"] = state[q + "attention.q_norm.weight"]
                    out[a + "k_norm.weight"] = state[q + "attention.k_norm.weight"]
            gate, up = state[q + "ffn.gate_up.weight"].chunk(2)
            out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = gate, up
            if q + "ffn.gate_up.bias" in state:
                gate_b, up_b = state[q + "ffn.gate_up.bias"].chunk(2)
                out[m + "gate_proj.bias"], out[m + "up_proj.bias"] = gate_b, up_b
            out[m + "down_proj.weight"] = state[q + "ffn.down.weight"]
            if q + "ffn.down.bias" in state:
                out[m + "down_proj.bias"] = state[q + "ffn.down.bias"]
            norms = ("temporal_pre_norm", "channel_pre_norm") if rg else ("input_layernorm", "post_attention_layernorm")
            out[p + norms[0] + ".weight"] = state[q + "attn_norm.weight"]
            out[p + norms[1] + ".weight"] = state[q + "ffn_norm.weight"]
    if not model.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][:V]
    return out


def save_hf(model: nn.Module, path: str | Path, *, family: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face model folder (config.json + model.safetensors) that the family's
    transformers class (``FAMILIES``) loads with the same logits.

    Args:
        model: an ``LRNNLMHeadModel`` of Mamba or Mamba-2 layers, or a ``LanguageModel`` of one of the
            other families.
        path: the folder (created if needed).
        family: the family to write. Default: None (read from the model: ``family_of``).

    The model's ``tokenizer_path`` (set by ``from_hf``), when present, has its tokenizer files copied along.

    Returns:
        Path: the folder.

    Raises:
        ValueError: the model has an option the family cannot express (named in the message).
    """
    if not isinstance(path, str | Path):
        raise TypeError(f"save_hf: path must be a str or Path, got {type(path).__name__}")
    family, hf = hf_config_of(model, family)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(_hf_weights_out(model, family), folder)
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    source = getattr(model, "tokenizer_path", None)
    if source:
        copy_tokenizer(Path(source), folder)
    return folder


@CONVERTERS.register("hf")
class HFFormat:
    """Hugging Face model folders: ``load`` is ``from_hf``, ``save`` is ``save_hf``."""

    load = staticmethod(from_hf)
    save = staticmethod(save_hf)
