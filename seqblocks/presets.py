"""Model presets: named, JSON-serialisable configurations of ``LRNNLMHeadModel`` with training defaults.

A preset is plain data::

    {"description": "...",
     "model": {LRNNLMHeadModel keyword arguments: d_model, d_state, n_layer, vocab_size, mixer_types, ...},
     "train": {TrainConfig overrides suited to the model: steps, batch_size, lr, task options, ...}}

A JSON config file may hold the same object, or only the ``"model"`` part (for example the
``config.json`` of a checkpoint). ``vocab_size`` in a preset is a default for ``seqblocks info``;
training replaces it with the task's vocabulary size.

- ``tiny`` (the default): a 4-layer RG-LRU + attention hybrid (Griffin's pattern) that visibly learns
  the character task in under a minute on a quiet 2-core CPU. ``tiny-hybrid-mamba`` is the Mamba +
  attention twin; the pure-PyTorch selective scan makes it several times slower per step on CPU.
- ``tiny-<mixer>``: the same size with one mixer type throughout, for each mixer family.
- ``tiny-gated-deltanet-hybrid``, ``gated-deltanet-hybrid-130m``, ``qwen3.5-like`` (and ``tiny-qwen3.5-like``):
  Gated DeltaNet + attention hybrids, three GDN layers per attention layer.
- ``gemma3-like`` / ``tiny-gemma3-like``: 5 sliding-window : 1 global attention, QK-norm, soft-capping.
- ``llama4-like`` / ``tiny-llama4-like``: 3 chunked attention : 1 global NoPE attention (iRoPE), shared-expert
  MoE (top-1 of 16).
- ``nemotron-h-like``, ``falcon-h1-like`` (Mamba-2 + attention hybrids) and ``deepseek-like`` (MLA +
  shared-expert MoE + multi-token prediction), each with a ``tiny-`` CPU twin.
- ``mixtral-like`` (sliding-window GQA + 8x top-2 MoE) and ``jamba-like`` (1 attention : 7 Mamba, MoE on
  every other layer), each with a ``tiny-`` CPU twin.
- ``hybrid-130m``, ``mamba-130m``, ``mamba2-130m``, ``mamba3-130m``, ``hybrid-mamba2-130m``, ``llama-125m``: GPU-sized
  models (GPT-NeoX-sized vocabulary).
- ``vit-tiny`` / ``vim-tiny``: image classifiers for the ``shapes`` task, a Vision Transformer and its
  Vision-Mamba-style twin (bidirectional Mamba as the token mixer).

A model config that names another ``model_type`` than the language model (``MODEL_KINDS``: a
``VisionTransformer``) holds that model's config and is built by ``build_model`` as that model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "DEFAULT_PRESET", "preset_names", "get_preset", "load_config", "model_kwargs",
           "build_model", "MODEL_KINDS"]

DEFAULT_PRESET = "tiny"
# GPT-NeoX's 50,277 tokens (the mamba / pythia tokenizer), embedding and head rows padded to a multiple of
# 8 as mamba_ssm's MambaConfig does (50,280 rows): an odd row count leaves the head's GEMMs on cuBLAS's
# unaligned (align1) kernels, 30 of a mamba-130m train step's 145 ms of kernels on the H200.
_GPU_VOCAB = {"vocab_size": 50277, "pad_vocab_size_multiple": 8}

# Shared by the tiny presets: a character model that trains in under a minute on two quiet CPU cores.
_TINY_TRAIN = {"task": "chars", "task_options": {"seq_len": 128}, "steps": 300, "batch_size": 16,
               "lr": 3e-3, "warmup_steps": 30, "eval_every": 100, "ckpt_every": 100}
_GPU_TRAIN = {"task": "chars", "task_options": {"seq_len": 1024, "max_chars": 20_000_000}, "steps": 5000,
              "batch_size": 64, "lr": 6e-4, "warmup_steps": 500, "eval_every": 500, "ckpt_every": 1000}


# Attention layers get rotary positions over their full head width (the other mixers need none).
_TINY_ATTN = {"num_heads": 4, "rotary_emb_dim": 32}
_GPU_ATTN = {"num_heads": 12, "rotary_emb_dim": 64}


def _tiny(description: str, mixer_types: list[str], **model: Any) -> dict[str, Any]:
    base = {"d_model": 128, "d_state": 16, "n_layer": len(mixer_types), "vocab_size": 98,
            "mixer_types": mixer_types, "d_intermediate": 0}
    if "attn" in mixer_types:
        base["mixer_kwargs"] = {"attn": dict(_TINY_ATTN)}
    base.update(model)
    return {"description": description, "model": base, "train": copy.deepcopy(_TINY_TRAIN)}


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _tiny("default: Griffin-style hybrid, 2 RG-LRU + 2 attention layers with gated MLPs, d_model 128 "
                  "(learns the char task in ~40 s on a quiet 2-core CPU)", ["rglru", "attn", "rglru", "attn"],
                  d_intermediate=256),
    "tiny-hybrid-mamba": _tiny("Mamba + attention hybrid, 4 layers, d_model 128 (slower on CPU than 'tiny')",
                               ["mamba", "attn", "mamba", "attn"]),
    "tiny-attn": _tiny("4 attention layers with gated MLPs (a tiny Llama-style transformer)", ["attn"] * 4,
                       d_intermediate=256),
    "tiny-mamba": _tiny("4 Mamba layers", ["mamba"] * 4),
    "tiny-mamba2": _tiny("4 Mamba-2 layers (SSD, head width 32, chunk 64)", ["mamba2"] * 4,
                         mixer_kwargs={"mamba2": {"headdim": 32, "chunk_size": 64}}),
    "tiny-mamba3": _tiny("4 Mamba-3 layers (SISO, trapezoidal and rotary, head width 32, state 32)", ["mamba3"] * 4,
                         mixer_kwargs={"mamba3": {"headdim": 32, "d_state": 32}}),
    "tiny-gla-hybrid": _tiny("GLA + attention hybrid, 4 layers (gated linear attention, 4 heads)",
                             ["gla", "attn", "gla", "attn"], d_intermediate=256),
    "tiny-rglru": _tiny("4 RG-LRU layers (Griffin's recurrence) with gated MLPs", ["rglru"] * 4,
                        d_intermediate=256),
    "tiny-s7": _tiny("4 S7 layers (input-dependent S5) with gated MLPs", ["s7"] * 4, d_intermediate=256),
    "tiny-lru": _tiny("4 LRU layers (LTI, diagonal complex) with gated MLPs", ["lru"] * 4, d_intermediate=256),
    "tiny-s4": _tiny("4 S4 layers (LTI, convolution mode) with gated MLPs", ["s4"] * 4, d_intermediate=256),
    "tiny-s4d": _tiny("4 S4D layers (LTI, diagonal) with gated MLPs", ["s4d"] * 4, d_intermediate=256),
    "tiny-s5": _tiny("4 S5 layers (LTI, MIMO) with gated MLPs", ["s5"] * 4, d_intermediate=256),
    "tiny-centaurus": _tiny("4 Centaurus layers (LTI) with gated MLPs", ["centaurus"] * 4, d_intermediate=256),
    "hybrid-130m": {
        "description": "~130M hybrid: 24 layers, d_model 768, Mamba with attention at every 6th layer (GPU)",
        "model": {"d_model": 768, "d_state": 16, "n_layer": 24, **_GPU_VOCAB,
                  "mixer_types": [("attn" if i % 6 == 5 else "mamba") for i in range(24)],
                  "d_intermediate": 0, "mixer_kwargs": {"attn": dict(_GPU_ATTN)}},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    "mamba-130m": {
        "description": "~130M Mamba: 24 layers, d_model 768, no MLP (the mamba-130m shape) (GPU)",
        "model": {"d_model": 768, "d_state": 16, "n_layer": 24, **_GPU_VOCAB,
                  "mixer_types": ["mamba"] * 24, "d_intermediate": 0},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    "mamba2-130m": {
        "description": "~130M Mamba-2: 24 layers, d_model 768, d_state 128, head width 64, no MLP (the "
                       "mamba2-130m shape) (GPU)",
        "model": {"d_model": 768, "d_state": 128, "n_layer": 24, **_GPU_VOCAB,
                  "mixer_types": ["mamba2"] * 24, "d_intermediate": 0, "residual_in_fp32": True},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    "mamba3-130m": {
        "description": "~130M Mamba-3: 24 layers, d_model 768, d_state 128, head width 64, SISO, no MLP (the "
                       "mamba2-130m shape with Mamba-3 mixers) (GPU)",
        "model": {"d_model": 768, "d_state": 128, "n_layer": 24, **_GPU_VOCAB,
                  "mixer_types": ["mamba3"] * 24, "d_intermediate": 0, "residual_in_fp32": True},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    "hybrid-mamba2-130m": {
        "description": "~130M Mamba-2 + attention hybrid: 24 layers, d_model 768, attention at every 6th layer (GPU)",
        "model": {"d_model": 768, "d_state": 128, "n_layer": 24, **_GPU_VOCAB,
                  "mixer_types": [("attn" if i % 6 == 5 else "mamba2") for i in range(24)],
                  "d_intermediate": 0, "residual_in_fp32": True, "mixer_kwargs": {"attn": dict(_GPU_ATTN)}},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    "llama-125m": {
        "description": "~125M Llama-style transformer: 12 attention layers, d_model 768, SwiGLU MLP 2048 (GPU)",
        "model": {"d_model": 768, "d_state": 16, "n_layer": 12, **_GPU_VOCAB,
                  "mixer_types": ["attn"] * 12, "d_intermediate": 2048,
                  "mixer_kwargs": {"attn": dict(_GPU_ATTN)}},
        "train": {**copy.deepcopy(_GPU_TRAIN), "lr": 3e-4},
    },
}

# Gated DeltaNet hybrids: three GDN layers per attention layer (the Qwen3-Next / Qwen3.5 layout).
def _gdn_pattern(n_layer: int) -> list[str]:
    return [("attn" if i % 4 == 3 else "gated_deltanet") for i in range(n_layer)]


# A Qwen3-Next-like shape: GDN with 16 query / key heads and 32 value heads of width 128; GQA attention
# with 16 query / 2 KV heads of width 256 and rotary on a quarter of each head. Qwen3-Next's attention
# output gate and MoE FFN have no seqblocks counterpart: plain GQA attention and a dense SwiGLU stand in.
_QWEN35_GDN = {"head_dim": 128, "num_heads": 16, "num_v_heads": 32, "expand_v": 1.0}
_QWEN35_ATTN = {"num_heads": 16, "num_heads_kv": 2, "head_dim": 256, "rotary_emb_dim": 64,
                "qkv_proj_bias": False, "out_proj_bias": False}
PRESETS.update({
    "tiny-gated-deltanet-hybrid": _tiny(
        "Gated DeltaNet + attention hybrid, 3 GDN : 1 attention, 4 layers, d_model 128, gated MLPs",
        _gdn_pattern(4), d_intermediate=256,
        mixer_kwargs={"attn": dict(_TINY_ATTN), "gated_deltanet": {"head_dim": 32, "num_heads": 3}}),
    "gated-deltanet-hybrid-130m": {
        "description": "~130M Gated DeltaNet + attention hybrid: 24 layers, d_model 768, 3 GDN (6 heads of "
                       "width 128, values 256) : 1 attention (GPU)",
        "model": {"d_model": 768, "d_state": 16, "n_layer": 24, **_GPU_VOCAB,
                  "mixer_types": _gdn_pattern(24), "d_intermediate": 0, "residual_in_fp32": True,
                  "mixer_kwargs": {"attn": dict(_GPU_ATTN), "gated_deltanet": {"head_dim": 128, "num_heads": 6}}},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    "qwen3.5-like": {
        "description": "Qwen3-Next / Qwen3.5-shaped hybrid: 48 layers, d_model 2048, 3 Gated DeltaNet (16 QK / 32 V "
                       "heads of width 128) : 1 GQA attention (16 / 2 heads of width 256, rotary 64), dense "
                       "SwiGLU 6144 in place of the MoE, ~3.5B (GPU)",
        "model": {"d_model": 2048, "d_state": 16, "n_layer": 48, "vocab_size": 151936,
                  "mixer_types": _gdn_pattern(48), "d_intermediate": 6144, "residual_in_fp32": True,
                  "mixer_kwargs": {"attn": dict(_QWEN35_ATTN), "gated_deltanet": dict(_QWEN35_GDN)}},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    "tiny-qwen3.5-like": _tiny(
        "qwen3.5-like at CPU size: 4 layers (3 GDN : 1 GQA attention), d_model 128, 2 QK / 4 V heads of width 32",
        _gdn_pattern(4), d_intermediate=256,
        mixer_kwargs={"attn": {"num_heads": 4, "num_heads_kv": 2, "head_dim": 64, "rotary_emb_dim": 16,
                               "qkv_proj_bias": False, "out_proj_bias": False},
                      "gated_deltanet": {"head_dim": 32, "num_heads": 2, "num_v_heads": 4, "expand_v": 1.0}}),
})

# Gemma-3-like: 5 sliding-window layers : 1 global layer, QK-norm, attention-logit and final-logit
# soft-capping (Gemma 2's caps, 50 and 30), local RoPE base 10k and global 1M. Gemma's GeGLU MLP and
# sandwich norms have no LRNNLMHeadModel counterpart: the gated (SwiGLU) MLP and pre-norm blocks stand in.
def _gemma3_pattern(n_layer: int) -> list[str]:
    return [("attn" if i % 6 == 5 else "sliding_window") for i in range(n_layer)]


def _gemma3_kwargs(heads: int, kv_heads: int, head_dim: int, window: int) -> dict[str, Any]:
    common = {"num_heads": heads, "num_heads_kv": kv_heads, "head_dim": head_dim, "rotary_emb_dim": head_dim,
              "qk_norm": True, "softcap": 50.0, "qkv_proj_bias": False, "out_proj_bias": False}
    return {"sliding_window": {**common, "window_size": window},
            "attn": {**common, "rotary_emb_base": 1_000_000.0}}


# Llama-4-like: 3 chunked local attention layers (RoPE) : 1 global GQA layer with no positions (NoPE), the
# iRoPE layout; the global layers simply have no rotary_emb_dim.
# The FFN is Llama 4's mixture of experts: one shared expert plus top-1 of 16 routed SwiGLU experts
# with a sigmoid router (``_llama4_moe``), in every layer.
def _llama4_moe(d_ff: int) -> dict[str, Any]:
    return {"ffn": "shared_moe", "n_experts": 16, "top_k_experts": 1, "n_shared_experts": 1, "moe_router": "sigmoid",
            "moe_d_ff": d_ff, "shared_expert_d_ff": d_ff}


def _llama4_pattern(n_layer: int) -> list[str]:
    return [("gqa" if i % 4 == 3 else "chunked_gqa") for i in range(n_layer)]


def _llama4_kwargs(heads: int, kv_heads: int, head_dim: int, chunk: int) -> dict[str, Any]:
    common = {"num_heads": heads, "num_heads_kv": kv_heads, "head_dim": head_dim, "qkv_proj_bias": False,
              "out_proj_bias": False}
    return {"chunked_gqa": {**common, "attention_chunk_size": chunk, "rotary_emb_dim": head_dim,
                            "rotary_emb_base": 500_000.0},
            "gqa": dict(common)}


PRESETS.update({
    "tiny-gemma3-like": _tiny(
        "gemma3-like at CPU size: 6 layers (5 sliding-window (32) : 1 global attention), QK-norm, soft-capped "
        "attention (50) and final logits (30), d_model 128, gated MLPs",
        _gemma3_pattern(6), d_intermediate=256, final_logit_softcapping=30.0,
        mixer_kwargs=_gemma3_kwargs(4, 2, 32, 32)),
    "gemma3-like": {
        "description": "Gemma-3-1B-shaped: 26 layers, d_model 1152, 5 sliding-window (512) : 1 global attention "
                       "(4 query / 1 KV heads of width 256), QK-norm, soft-capped attention (50) and final logits "
                       "(30), gated MLP 6912, ~1B with its 262k vocabulary (GPU)",
        "model": {"d_model": 1152, "d_state": 16, "n_layer": 26, "vocab_size": 262144,
                  "mixer_types": _gemma3_pattern(26), "d_intermediate": 6912, "residual_in_fp32": True,
                  "final_logit_softcapping": 30.0, "mixer_kwargs": _gemma3_kwargs(4, 1, 256, 512)},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    "tiny-llama4-like": _tiny(
        "llama4-like at CPU size: 4 layers (3 chunked attention (chunk 32, RoPE) : 1 global GQA without positions, "
        "iRoPE), d_model 128, shared-expert MoE (16 experts, top-1, sigmoid router, expert width 128)",
        _llama4_pattern(4), moe=_llama4_moe(128), mixer_kwargs=_llama4_kwargs(4, 2, 32, 32)),
    "llama4-like": {
        "description": "Llama-4-shaped: 16 layers, d_model 2048, 3 chunked attention (chunk 8192, RoPE) : "
                       "1 global GQA without positions (iRoPE), 16 query / 4 KV heads of width 128, shared-expert "
                       "MoE (16 experts of width 2048, top-1, sigmoid router), ~4.0B total, ~1.0B active (GPU)",
        "model": {"d_model": 2048, "d_state": 16, "n_layer": 16, "vocab_size": 202048,
                  "mixer_types": _llama4_pattern(16), "d_intermediate": 0, "moe": _llama4_moe(2048),
                  "residual_in_fp32": True,
                  "mixer_kwargs": _llama4_kwargs(16, 4, 128, 8192)},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
})


def _deepseek_moe(experts: int, top_k: int, groups: int, topk_groups: int, d_ff: int, shared_d_ff: int) -> dict:
    return {"ffn": "shared_moe", "n_experts": experts, "top_k_experts": top_k, "n_shared_experts": 1,
            "moe_router": "sigmoid", "moe_n_groups": groups, "moe_topk_groups": topk_groups, "moe_d_ff": d_ff,
            "shared_expert_d_ff": shared_d_ff, "moe_routed_scaling_factor": 2.5, "moe_bias_update_rate": 0.001,
            "moe_aux_loss_coef": 0.0001}


# Mamba-2 + attention hybrids and DeepSeek-like MLA + MTP (issue 17). Nemotron-H alternates a mixer
# layer (Mamba-2, or GQA attention at a few places) with a squared-ReLU MLP layer; a seqblocks Block
# pairs each mixer with its MLP, so "M-" / "*-" become one block each. Falcon-H1 runs attention and
# Mamba-2 in parallel inside every layer; seqblocks has no parallel-mixer block, so falcon-h1-like is
# the common sequential approximation: Mamba-2 layers with an attention layer every fourth,
# each with a SwiGLU MLP.
def _every(n_layer: int, period: int, mixer: str, other: str) -> list[str]:
    return [(other if i % period == period - 1 else mixer) for i in range(n_layer)]


_TINY_GQA = {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 32, "qkv_proj_bias": False, "out_proj_bias": False}
_GPU_GQA = {"num_heads": 12, "num_heads_kv": 4, "rotary_emb_dim": 64, "qkv_proj_bias": False, "out_proj_bias": False}
_TINY_MAMBA2 = {"headdim": 32, "chunk_size": 64}
PRESETS.update({
    "tiny-nemotron-h-like": _tiny(
        "nemotron-h-like at CPU size: 4 layers, 3 Mamba-2 : 1 GQA attention, squared-ReLU MLP 256, d_model 128",
        _every(4, 4, "mamba2", "attn"), d_intermediate=256, mlp_cls="relu2_mlp",
        mixer_kwargs={"attn": dict(_TINY_GQA), "mamba2": dict(_TINY_MAMBA2)}),
    "nemotron-h-like": {
        "description": "Nemotron-H-shaped hybrid: 24 layers, d_model 768, Mamba-2 (state 128) with GQA attention "
                       "(12 / 4 heads) at every 8th layer, squared-ReLU MLP 3072 after each mixer (GPU)",
        "model": {"d_model": 768, "d_state": 128, "n_layer": 24, **_GPU_VOCAB,
                  "mixer_types": _every(24, 8, "mamba2", "attn"), "d_intermediate": 3072, "mlp_cls": "relu2_mlp",
                  "residual_in_fp32": True, "tie_embeddings": False, "mixer_kwargs": {"attn": dict(_GPU_GQA)}},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    "tiny-falcon-h1-like": _tiny(
        "falcon-h1-like at CPU size: 4 layers, 3 Mamba-2 : 1 GQA attention in sequence (Falcon-H1's parallel "
        "layer approximated), SwiGLU MLP 256, d_model 128",
        _every(4, 4, "mamba2", "attn"), d_intermediate=256,
        mixer_kwargs={"attn": dict(_TINY_GQA), "mamba2": dict(_TINY_MAMBA2)}),
    "falcon-h1-like": {
        "description": "Falcon-H1-shaped hybrid, sequential approximation of its parallel attention + Mamba-2 "
                       "layers: 24 layers, d_model 768, 3 Mamba-2 : 1 GQA attention, SwiGLU MLP 2048 (GPU)",
        "model": {"d_model": 768, "d_state": 128, "n_layer": 24, **_GPU_VOCAB,
                  "mixer_types": _every(24, 4, "mamba2", "attn"), "d_intermediate": 2048, "residual_in_fp32": True,
                  "tie_embeddings": False, "mixer_kwargs": {"attn": dict(_GPU_GQA)}},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    # DeepSeek-V3's FFN: a dense SwiGLU in the first layer, then shared-expert MoE (sigmoid router,
    # group-limited routing, auxiliary-loss-free bias balancing, a small balance loss).
    "tiny-deepseek-like": _tiny(
        "deepseek-like at CPU size: 4 MLA layers (4 heads, KV rank 32, rope 16), SwiGLU MLP 256 in layer 0 then "
        "shared-expert MoE (1 shared + top-2 of 8 routed, 4 groups), one MTP depth, d_model 128",
        ["mla"] * 4, d_intermediate=256, mtp_n_predict=1, mtp_lambda=0.3,
        moe=_deepseek_moe(8, 2, 4, 2, 64, 128), moe_layers=[1, 2, 3],
        mixer_kwargs={"mla": {"num_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 64, "qk_rope_head_dim": 16}}),
    "deepseek-like": {
        "description": "DeepSeek-V3-shaped: 24 MLA layers (12 heads, KV rank 256, Q rank 512, rope 32), d_model 768, "
                       "SwiGLU 2048 in layer 0 then shared-expert MoE (1 shared + top-6 of 64 routed of width 256, "
                       "8 groups, 4 per token), one MTP depth (GPU)",
        "model": {"d_model": 768, "d_state": 16, "n_layer": 24, **_GPU_VOCAB,
                  "mixer_types": ["mla"] * 24, "d_intermediate": 2048, "tie_embeddings": False,
                  "moe": _deepseek_moe(64, 6, 8, 4, 256, 512), "moe_layers": list(range(1, 24)),
                  "mtp_n_predict": 1, "mtp_lambda": 0.3,
                  "mixer_kwargs": {"mla": {"num_heads": 12, "kv_lora_rank": 256, "q_lora_rank": 512,
                                           "qk_rope_head_dim": 32}}},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
})

# Mixtral-like: GQA with a sliding window in every layer and 8 SwiGLU experts, top-2, softmax router.
# Jamba-like: Mamba with one attention layer in every 8 (at offset 4), the MoE FFN (16 experts, top-2)
# on every other layer and a dense SwiGLU on the rest.
def _mixtral_kwargs(heads: int, kv_heads: int, head_dim: int, window: int) -> dict[str, Any]:
    return {"sliding_window": {"num_heads": heads, "num_heads_kv": kv_heads, "head_dim": head_dim,
                               "rotary_emb_dim": head_dim, "window_size": window, "rotary_emb_base": 1_000_000.0,
                               "qkv_proj_bias": False, "out_proj_bias": False}}


def _jamba_pattern(n_layer: int) -> list[str]:
    return [("attn" if i % 8 == 4 else "mamba") for i in range(n_layer)]


PRESETS.update({
    "tiny-mixtral-like": _tiny(
        "mixtral-like at CPU size: 4 sliding-window GQA layers (window 32, 4 / 2 heads), MoE of 8 SwiGLU experts "
        "(width 128), top-2, d_model 128", ["sliding_window"] * 4,
        moe={"ffn": "moe", "n_experts": 8, "top_k_experts": 2, "moe_d_ff": 128},
        mixer_kwargs=_mixtral_kwargs(4, 2, 32, 32)),
    "mixtral-like": {
        "description": "Mixtral-shaped: 16 sliding-window GQA layers (window 4096, 16 / 4 heads of width 64), "
                       "d_model 1024, MoE of 8 SwiGLU experts of width 3584, top-2 (~1.5B total, ~0.46B active; GPU)",
        "model": {"d_model": 1024, "d_state": 16, "n_layer": 16, "vocab_size": 32000,
                  "mixer_types": ["sliding_window"] * 16, "d_intermediate": 0, "residual_in_fp32": True,
                  "tie_embeddings": False, "mixer_kwargs": _mixtral_kwargs(16, 4, 64, 4096),
                  "moe": {"ffn": "moe", "n_experts": 8, "top_k_experts": 2, "moe_d_ff": 3584}},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
    "tiny-jamba-like": _tiny(
        "jamba-like at CPU size: 8 layers, 7 Mamba : 1 attention, MoE (8 experts of width 128, top-2) on every other "
        "layer and a SwiGLU MLP 256 on the rest, d_model 64", _jamba_pattern(8), d_model=64, d_intermediate=256,
        moe={"ffn": "moe", "n_experts": 8, "top_k_experts": 2, "moe_d_ff": 128}, moe_layers=[1, 3, 5, 7],
        mixer_kwargs={"attn": {"num_heads": 4, "rotary_emb_dim": 16}}),
    "jamba-like": {
        "description": "Jamba-shaped: 16 layers, d_model 1024, 7 Mamba : 1 attention (16 heads), MoE (16 experts of "
                       "width 2048, top-2) on every other layer, SwiGLU MLP 2048 on the rest (GPU)",
        "model": {"d_model": 1024, "d_state": 16, "n_layer": 16, **_GPU_VOCAB,
                  "mixer_types": _jamba_pattern(16), "d_intermediate": 2048, "residual_in_fp32": True,
                  "tie_embeddings": False, "mixer_kwargs": {"attn": {"num_heads": 16, "rotary_emb_dim": 64}},
                  "moe": {"ffn": "moe", "n_experts": 16, "top_k_experts": 2, "moe_d_ff": 2048},
                  "moe_layers": list(range(1, 16, 2))},
        "train": copy.deepcopy(_GPU_TRAIN),
    },
})

# Image classifiers for the shapes task (16 x 16 grey images, 4 classes): they learn it in a minute on CPU.
_VIT_TRAIN = {"task": "shapes", "task_options": {}, "steps": 300, "batch_size": 32, "lr": 3e-3, "warmup_steps": 30,
              "eval_every": 100, "ckpt_every": 100}
_VIT_TINY = {"model_type": "VisionTransformer", "image_size": 16, "patch_size": 4, "num_channels": 1,
             "num_classes": 4, "d_model": 64, "num_heads": 4, "num_layers": 2, "d_ff": 128}
PRESETS.update({
    "vit-tiny": {"description": "Vision Transformer, 2 layers, d_model 64, 4 x 4 patches (the shapes task)",
                 "model": dict(_VIT_TINY), "train": copy.deepcopy(_VIT_TRAIN)},
    "vim-tiny": {"description": "Vision-Mamba-style classifier: ViT layout with bidirectional Mamba mixing the "
                                "patches (the shapes task)",
                 "model": {**_VIT_TINY, "token_mixer": "mamba", "use_cls_token": False, "pool": "mean"},
                 "train": copy.deepcopy(_VIT_TRAIN)},
})

_PRESET_KEYS = {"description", "model", "train"}
_CHECKPOINT_KEYS = {"model_type", "torch_dtype", "seqblocks_version"}


def _check_vit(model: dict[str, Any], source: str) -> None:
    from seqblocks.models.vit import VisionTransformerConfig

    try:
        VisionTransformerConfig.from_dict({k: v for k, v in model.items() if k not in _CHECKPOINT_KEYS})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def _build_vit(model: dict[str, Any], device=None, dtype=None):
    from seqblocks.models.vit import VisionTransformer, VisionTransformerConfig

    config = VisionTransformerConfig.from_dict({k: v for k, v in model.items() if k not in _CHECKPOINT_KEYS})
    return VisionTransformer(config, device=device, dtype=dtype)


#: Model kinds a model config may name by ``model_type`` besides the language model (the default):
#: name -> (check(config, source), build(config, device, dtype)). ``seqblocks train`` builds through it.
MODEL_KINDS: dict[str, tuple[Any, Any]] = {"VisionTransformer": (_check_vit, _build_vit)}


def _kind(model: dict[str, Any]) -> str | None:
    kind = model.get("model_type")
    return kind if kind in MODEL_KINDS else None


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name``.

    Raises:
        ValueError: unknown name; the message lists the presets.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {preset_names()} "
                         f"(or the path of a JSON config file)")
    return copy.deepcopy(PRESETS[name])


def model_kwargs(model: Any, source: str = "config") -> dict[str, Any]:
    """Check a model config (``LRNNLMHeadModel``'s arguments, or a ``ModelConfig`` dict) and return it.

    Raises:
        ValueError: not a dict, unknown fields or missing required fields; the message lists the valid ones.
    """
    from seqblocks.models.model_config import ModelConfig

    if not isinstance(model, dict):
        raise ValueError(f"{source}: the model config must be a JSON object, got {type(model).__name__}")
    kind = _kind(model)
    if kind is not None:
        model = {k: v for k, v in model.items() if k not in _CHECKPOINT_KEYS}
        MODEL_KINDS[kind][0](model, source)
        return {"model_type": kind, **model}
    model = {k: v for k, v in model.items() if k not in _CHECKPOINT_KEYS}
    if model.get("mlp_cls") is None:
        model.pop("mlp_cls", None)
    checked = dict(model, vocab_size=model.get("vocab_size") or 1)
    ModelConfig.from_data(checked, source)  # validates every field and every layer's mixer config
    return model


def load_config(name_or_path: str) -> dict[str, Any]:
    """A preset by name, or a JSON config file, as ``{"description", "model", "train"}``.

    Raises:
        ValueError: unknown preset, unreadable / invalid JSON, or an invalid model config; each
            message says what is valid.
    """
    path = Path(name_or_path)
    if name_or_path in PRESETS:
        config = get_preset(name_or_path)
        config["source"] = f"preset {name_or_path!r}"
    elif path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"config file {name_or_path!r} does not exist; valid presets: {preset_names()}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {name_or_path!r} is not valid JSON: {err}") from None
        if isinstance(data, dict) and "model" in data:
            extra = sorted(set(data) - _PRESET_KEYS)
            if extra:
                raise ValueError(f"config file {name_or_path!r}: unknown top-level keys {extra}; "
                                 f"valid: {sorted(_PRESET_KEYS)} (or a bare model config)")
            config = {"description": data.get("description", ""), "model": data["model"],
                      "train": data.get("train", {})}
        else:
            config = {"description": "", "model": data, "train": {}}
        if not isinstance(config["train"], dict):
            raise ValueError(f"config file {name_or_path!r}: 'train' must be a JSON object")
        config["source"] = f"config file {name_or_path!r}"
    else:
        get_preset(name_or_path)  # raises the listing error
    model = config["model"]
    kind = model.get("model", "causal_lm") if isinstance(model, dict) else "causal_lm"
    if kind == "causal_lm":  # an encoder-decoder's / classifier's config is checked when it is built
        model = {k: v for k, v in model.items() if k != "model"} if isinstance(model, dict) else model
        config["model"] = model_kwargs(model, config["source"])
    return config


def build_model(model: dict[str, Any], vocab_size: int | None = None, device=None, dtype=None):
    """The ``LRNNLMHeadModel`` a model config describes, with ``vocab_size`` replaced when given (or
    the ``MODEL_KINDS`` model its ``model_type`` names)."""
    from seqblocks.models.lrnn_lm import LRNNLMHeadModel
    from seqblocks.models.model_config import ModelConfig

    kind = _kind(model)
    if kind is not None:
        return MODEL_KINDS[kind][1](model, device=device, dtype=dtype)
    data = dict(model)
    if vocab_size is not None:
        data["vocab_size"] = vocab_size
    return LRNNLMHeadModel.from_config(ModelConfig.from_data(data), device=device, dtype=dtype)
