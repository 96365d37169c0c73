"""mamba_ssm's own checkpoint format <-> ``LRNNLMHeadModel``.

A mamba_ssm ``MambaLMHeadModel`` folder holds a config.json of ``MambaConfig`` fields (``d_model``,
``d_intermediate``, ``n_layer``, ``vocab_size``, ``ssm_cfg`` with ``layer`` "Mamba1" / "Mamba2",
``attn_layer_idx``, ``attn_cfg``, ``rms_norm``, ``residual_in_fp32``, ``fused_add_norm``,
``pad_vocab_size_multiple``, ``tie_embeddings``) and ``pytorch_model.bin`` with ``backbone.*`` keys.
seqblocks' ``LRNNLMHeadModel`` keeps mamba_ssm's module names, so the weight map is the ``backbone.``
prefix and Mamba-1's depthwise conv ([E, 1, W] there, [E, W] here).

The ``.bin`` is read with ``torch.load(weights_only=True)`` (plain tensors) and written with
``torch.save`` of a dict of tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqblocks.interop._files import copy_tokenizer
from seqblocks.layers.attention.mha import MHA
from seqblocks.layers.mixers.mamba import Mamba
from seqblocks.layers.mixers.mamba2 import Mamba2
from seqblocks.models.lrnn_lm import LRNNLMHeadModel

__all__ = ["config_from_mamba_ssm", "weights_from_mamba_ssm", "save_mamba_ssm"]

# ssm_cfg / attn_cfg keys that choose kernels or parallelism, not the function.
_RUNTIME_KEYS = {"use_fast_path", "use_mem_eff_path", "process_group", "sequence_parallel", "layer_idx", "device",
                 "dtype"}
_SSM_KEYS = {
    "Mamba1": {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
               "conv_bias", "bias"},
    "Mamba2": {"d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range", "D_has_hdim",
               "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias", "conv_bias",
               "chunk_size"},
}
_ATTN_KEYS = {"num_heads", "num_heads_kv", "head_dim", "qkv_proj_bias", "out_proj_bias", "softmax_scale", "causal",
              "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved"}
_DEFAULT_D_STATE = {"Mamba1": 16, "Mamba2": 128}


def config_from_mamba_ssm(config: dict[str, Any]) -> dict[str, Any]:
    """``LRNNLMHeadModel`` arguments of a mamba_ssm ``MambaConfig`` dict.

    Raises:
        ValueError: a layer kind or option seqblocks does not have (mamba_ssm's attention with a fused MLP
            or a conv), naming it.
    """
    try:
        d_model, n_layer, vocab = int(config["d_model"]), int(config["n_layer"]), int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"mamba_ssm config needs integer d_model, n_layer and vocab_size: {err}") from None
    ssm = dict(config.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer not in _SSM_KEYS:
        raise ValueError(f"mamba_ssm ssm_cfg.layer={layer!r} is not supported; supported: {sorted(_SSM_KEYS)}")
    unknown = sorted(set(ssm) - _SSM_KEYS[layer] - _RUNTIME_KEYS)
    if unknown:
        raise ValueError(f"mamba_ssm ssm_cfg keys {unknown} are not {layer} options seqblocks has")
    ssm = {k: v for k, v in ssm.items() if k in _SSM_KEYS[layer]}
    d_state = int(ssm.pop("d_state", _DEFAULT_D_STATE[layer]))
    for key in ("dt_limit", "A_init_range"):
        if key in ssm:
            ssm[key] = tuple(ssm[key])
    attn = dict(config.get("attn_cfg") or {})
    for key in ("mlp_dim", "d_conv"):
        if attn.get(key, 0):
            raise ValueError(f"mamba_ssm attn_cfg.{key}={attn[key]} (attention with a fused MLP / conv) is not "
                             f"supported")
    attn = {k: v for k, v in attn.items() if k not in _RUNTIME_KEYS and k not in ("mlp_dim", "d_conv")}
    unknown = sorted(set(attn) - _ATTN_KEYS)
    if unknown:
        raise ValueError(f"mamba_ssm attn_cfg keys {unknown} are not attention options seqblocks has")
    attn.setdefault("causal", False)  # mamba_ssm's MHA default, kept so the logits agree
    attn_layers = {int(i) for i in config.get("attn_layer_idx") or []}
    if not attn_layers <= set(range(n_layer)):
        raise ValueError(f"mamba_ssm attn_layer_idx {sorted(attn_layers)} must lie in [0, {n_layer})")
    ssm_name = "mamba" if layer == "Mamba1" else "mamba2"
    mixer_kwargs: dict[str, Any] = {ssm_name: ssm}
    if attn_layers:
        mixer_kwargs["attn"] = attn
    return dict(d_model=d_model, d_state=d_state, n_layer=n_layer, vocab_size=vocab,
                mixer_types=["attn" if i in attn_layers else ssm_name for i in range(n_layer)],
                d_intermediate=int(config.get("d_intermediate", 0)), mixer_kwargs=mixer_kwargs,
                rms_norm=bool(config.get("rms_norm", True)),
                residual_in_fp32=bool(config.get("residual_in_fp32", True)),
                fused_add_norm=bool(config.get("fused_add_norm", True)),
                pad_vocab_size_multiple=int(config.get("pad_vocab_size_multiple", 8)),
                tie_embeddings=bool(config.get("tie_embeddings", True)))


def weights_from_mamba_ssm(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """seqblocks names for a mamba_ssm state dict (``backbone.`` dropped, Mamba-1's conv reshaped).

    Raises:
        ValueError: a tensor outside the backbone and the head.
    """
    out: dict[str, torch.Tensor] = {}
    foreign = []
    for key, value in state.items():
        if key == "lm_head.weight":
            out[key] = value
            continue
        if not key.startswith("backbone."):
            foreign.append(key)
            continue
        name = key.removeprefix("backbone.")
        if name.endswith("mixer.conv1d.weight") and value.dim() == 3 and _is_mamba1(state, key):
            name, value = name.replace("conv1d.weight", "conv_weight"), value[:, 0]
        elif name.endswith("mixer.conv1d.bias") and _is_mamba1(state, key):
            name = name.replace("conv1d.bias", "conv_bias")
        out[name] = value
    if foreign:
        raise ValueError(f"mamba_ssm checkpoint has tensors outside backbone.* and lm_head: {sorted(foreign)[:8]}")
    return out


def _is_mamba1(state: dict[str, torch.Tensor], conv_key: str) -> bool:
    # Mamba-1 has x_proj; Mamba-2 does not.
    return conv_key.rsplit("conv1d.", 1)[0] + "x_proj.weight" in state


def save_mamba_ssm(model: nn.Module, path: str | Path) -> Path:
    """Write an ``LRNNLMHeadModel`` of Mamba (or Mamba-2) layers, optionally with attention layers, in
    mamba_ssm's format: config.json (``MambaConfig`` fields) and pytorch_model.bin.

    Raises:
        TypeError: not an ``LRNNLMHeadModel``.
        ValueError: layers mamba_ssm's ``MixerModel`` cannot hold (other mixers, Mamba-1 and Mamba-2
            mixed, attention layers of different options), or a non-default MLP.
    """
    if not isinstance(model, LRNNLMHeadModel):
        raise TypeError(f"save_mamba_ssm expects an LRNNLMHeadModel, got {type(model).__name__}")
    c = model.config
    kinds = [type(m) for m in model.mixers()]
    ssm_kinds = {k for k in kinds if k is not MHA}
    if not ssm_kinds <= {Mamba, Mamba2} or len(ssm_kinds) != 1 or any(k not in (Mamba, Mamba2, MHA) for k in kinds):
        raise ValueError(f"save_mamba_ssm: layers must be all Mamba or all Mamba-2, with optional MHA layers; got "
                         f"{sorted({k.__name__ for k in kinds})}")
    if c.d_intermediate and c.mlp != "gated_mlp":
        raise ValueError(f"save_mamba_ssm: mamba_ssm's MLP is gated_mlp, got {c.mlp!r}")
    if c.final_logit_softcapping is not None or c.mtp_n_predict:
        raise ValueError("save_mamba_ssm: logit soft-capping and MTP modules have no mamba_ssm counterpart")
    ssm_kind = ssm_kinds.pop()
    layer_name = "Mamba1" if ssm_kind is Mamba else "Mamba2"
    ssm_cfg = {"layer": layer_name}
    first_ssm = next(i for i, k in enumerate(kinds) if k is ssm_kind)
    ssm_values = c.layers[first_ssm].mixer_config.to_dict()
    ssm_cfg.update({k: v for k, v in ssm_values.items() if k in _SSM_KEYS[layer_name]})
    attn_idx = [i for i, k in enumerate(kinds) if k is MHA]
    attn_cfg: dict[str, Any] = {}
    configs = {json.dumps({k: v for k, v in c.layers[i].mixer_config.to_dict().items() if k in _ATTN_KEYS},
                          sort_keys=True) for i in attn_idx}
    if len(configs) > 1:
        raise ValueError("save_mamba_ssm: every attention layer must have the same options (one attn_cfg)")
    if attn_idx:
        values = c.layers[attn_idx[0]].mixer_config.to_dict()
        bad = {k: values[k] for k in ("window_size", "qk_norm", "softcap", "score_mod", "mask_mod")
               if values.get(k) not in (None, False)}
        if bad:
            raise ValueError(f"save_mamba_ssm: attention options {bad} have no mamba_ssm counterpart")
        attn_cfg = {k: v for k, v in values.items() if k in _ATTN_KEYS}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"d_model": c.d_model, "d_intermediate": c.d_intermediate, "n_layer": c.n_layer,
              "vocab_size": c.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": attn_idx, "attn_cfg": attn_cfg,
              "rms_norm": c.rms_norm, "residual_in_fp32": c.residual_in_fp32, "fused_add_norm": c.fused_add_norm,
              "pad_vocab_size_multiple": c.pad_vocab_size_multiple, "tie_embeddings": c.tie_embeddings}
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            state[key] = value
            continue
        name = key
        if name.endswith("mixer.conv_weight"):
            name, value = name.replace("conv_weight", "conv1d.weight"), value[:, None]
        elif name.endswith("mixer.conv_bias"):
            name = name.replace("conv_bias", "conv1d.bias")
        state["backbone." + name] = value
    torch.save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    source = getattr(model, "tokenizer_path", None)
    if source:
        copy_tokenizer(Path(source), folder)
    return folder
