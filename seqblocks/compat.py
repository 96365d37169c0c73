"""Loading checkpoint folders written by other training code into seqblocks models.

Two folder layouts are read (docs/interop.md, "Checkpoint folders of the seed systems", has the details):

- ``load_backbone_checkpoint(path)``: a hybrid LM saved as ``config.json`` (``d_model``, ``d_state``,
  ``n_layer``, ``vocab_size``, ``mixer_types``, ``d_intermediate``, ``norm_epsilon``, ``rms_norm``,
  ``fused_add_norm``, ``residual_in_fp32``, ``tie_embeddings``, ``pad_vocab_size_multiple``) and
  ``pytorch_model.bin``, a state dict whose keys start ``backbone.`` (``backbone.embedding``,
  ``backbone.layers.{i}.{norm, mixer, norm2, mlp}``, ``backbone.norm_f``) plus ``lm_head.weight``.
  It becomes an ``LRNNLMHeadModel``. Attention, Mamba, LRU, S4, S4D, S5, Centaurus, RG-LRU and S7 layers
  are placed; the linear RNNs' parameters are converted to seqblocks' parameterisation exactly (the same
  function, up to float rounding), with the constructor values that function needs forced
  (``_FORCED_KWARGS``, ``_s4_kwargs``, the S5 ``real_transform``). The few argument values whose layer
  cannot be reproduced (or whose layer fails in its own code) raise, naming why.
- ``load_mlx_checkpoint(path, config)``: ``model.safetensors`` (and ``metadata.json``) written by an MLX
  trainer from a model of ``ConfigurableBlock`` s, keys ``embed``, ``blocks.{i}.{attention, ffn,
  attn_norm, ffn_norm}``, ``final_norm``, ``head``, with separate ``q_proj`` / ``k_proj`` / ``v_proj`` /
  ``o_proj`` and ``gate`` / ``up`` / ``down`` projections. The folder records no architecture, so the
  caller gives the matching ``LanguageModelConfig``; it becomes a ``LanguageModel``. Mixture-of-experts
  FFNs (``ffn.router``, ``ffn.experts.{e}``, ``ffn.shared_experts.{j}`` / ``ffn.shared_expert``) become
  the "moe" / "shared_moe" / "latent_moe" FFNs of the config, their selection biases included
  (``moe_bias_mode``); a routing the config's FFN would compute differently raises.

Loading never runs anything the folder names: the pickle is read with ``torch.load(weights_only=True)``
(tensors and plain containers only), safetensors with ``safetensors``. Loading is strict: a key that
maps nowhere, a missing key or a shape that differs raises ``ValueError`` naming them.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from seqblocks.layers.moe import LatentMoEFeedForward, MoEFeedForward
from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig
from seqblocks.models.lrnn_lm import LRNNLMHeadModel
from seqblocks.ops.ssm_conv_kernels import dplr_bilinear

__all__ = ["load_backbone_checkpoint", "load_mlx_checkpoint", "BACKBONE_MIXERS"]

#: Mixer types whose parameters ``load_backbone_checkpoint`` can place: attention (fused ``in_proj``,
#: ``out_proj``, with ``mlp_dim`` / ``d_conv`` too), Mamba (``conv1d`` as ``conv_weight`` / ``conv_bias``),
#: and the linear RNNs LRU, S4, S4D, S5, Centaurus, RG-LRU and S7, whose parameters are converted exactly
#: (``_MIXER_CONVERTERS``).
BACKBONE_MIXERS = ("attn", "Mamba", "LRU", "S4", "S4D", "S5", "Centaurus", "RGLRU", "S7")

_CONFIG_KEYS = ("d_intermediate", "norm_epsilon", "rms_norm", "fused_add_norm", "residual_in_fp32",
                "tie_embeddings", "pad_vocab_size_multiple")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON file: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: the weights do not fit the model: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, shape mismatches (file vs model) {shapes[:8]}")
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- config.json + pytorch_model.bin


# ---------------------------------------------------------------- per-mixer parameter conversion
#
# Each converter takes one layer's mixer tensors under the file's names (``name -> tensor``, the
# ``backbone.layers.{i}.mixer.`` prefix removed) and the seqblocks mixer built for it, and returns that
# mixer's state dict. The arithmetic runs in float64 and is exact up to the rounding of the last cast.


def _take(params: dict[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    absent = [n for n in names if n not in params]
    if absent:
        raise ValueError(f"missing mixer tensors {absent}")
    return [params.pop(n) for n in names]


def _rest(params: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors kept under their own names (checked against the mixer by the strict load)."""
    out.update(params)
    return out


def _convert_lru(params, mixer, file_kwargs):
    return dict(params)  # same names and the same function: x_t = λ x_{t-1} + γ B u_t, y = Re(C x) + D u


def _convert_s5(params, mixer, file_kwargs):
    # File (lrnnx's LTI S5): A [P, 2] = (p, Im Λ) with Re Λ = -softplus(p), real B [P, H], log_dt [P],
    # C [H, P, 2], D [H, H]. Its "bilinear" is Ā = (1 - ΔΛ/2) / (1 + ΔΛ/2), B̄ = Δ / (1 + ΔΛ/2) B: the usual
    # bilinear rule of -Λ, so that case stores Λ' = -Λ (Re Λ' > 0, real_transform="none").
    A, B, log_dt, C, D = (t.double() for t in _take(params, "A", "B", "log_dt", "C", "D"))
    if B.dim() == 3 or D.dim() == 1:
        raise ValueError(f"S5: B {tuple(B.shape)} and D {tuple(D.shape)} are the layout of the file code's "
                         f"time-varying S5 (complex B [P, H, 2], diagonal D [H]), which its language model does not "
                         f"build; expected the LTI S5's real B [P, H] and full D [H, H]")
    if A.dim() != 2 or A.shape[-1] != 2 or C.dim() != 3 or C.shape[-1] != 2:
        raise ValueError(f"S5: expected A [P, 2] and C [H, P, 2], got A {tuple(A.shape)}, C {tuple(C.shape)}")
    if mixer.discretization == "bilinear":
        re, im = torch.nn.functional.softplus(A[:, 0]), -A[:, 1]  # Λ' = -Λ under real_transform="none"
    else:
        re, im = A[:, 0], A[:, 1]  # the same parameter under real_transform="softplus"
    out = {"Lambda_re_log": re, "Lambda_im": im, "B_re": B, "B_im": torch.zeros_like(B), "C_re": C[..., 0],
           "C_im": C[..., 1], "D": D, "log_step": log_dt}
    return _rest(params, out)


def _convert_centaurus(params, mixer, file_kwargs):
    # File: a complex A [N, M] (Re A < 0 for a stable system); E, log_delta, B, C as here.
    (A,) = _take(params, "A")
    if not A.is_complex():
        raise ValueError(f"Centaurus: expected a complex A, got dtype {A.dtype}")
    A = A.to(torch.complex128)
    if not bool((A.real < 0).all()):
        raise ValueError(f"Centaurus: A has {int((A.real >= 0).sum())} entries with real part >= 0, which "
                         f"this Centaurus (Re A = -exp(A_real)) cannot represent")
    return _rest(params, {"A_real": torch.log(-A.real), "A_imag": A.imag})


def _convert_rglru(params, mixer, file_kwargs):
    # File: dense recurrence / input gates (nn.Linear [E, E] with bias), a_log [E, 1] with a = sigmoid(a_log),
    # the conv as nn.Conv1d [E, 1, W]. Here: gate_weight [2, 1, E, E] applied as x @ W, a_param [E].
    if mixer.num_heads != 1:
        raise ValueError(f"RGLRU: the file's gates are dense; build with num_heads=1, got {mixer.num_heads}")
    rw, rb, iw, ib, a_log, cw = _take(params, "recurrent_gate_proj.weight", "recurrent_gate_proj.bias",
                                      "input_gate_proj.weight", "input_gate_proj.bias", "a_log", "conv1d.weight")
    if a_log.dim() != 2 or a_log.shape[1] != 1:
        raise ValueError(f"RGLRU: expected a_log [E, 1] (one state per channel), got {tuple(a_log.shape)}")
    out = {"gate_weight": torch.stack((rw.T, iw.T)).unsqueeze(1), "gate_bias": torch.stack((rb, ib)).unsqueeze(1),
           "a_param": a_log[:, 0], "conv_weight": cw.squeeze(1)}
    if "conv1d.bias" in params:
        out["conv_bias"] = params.pop("conv1d.bias")
    return _rest(params, out)


def _convert_s7(params, mixer, file_kwargs):
    # File: base_params [N] (no per-channel skip base), x_proj rows [Λ (N), B (H*N, h-major), C (H*N), D (H), β (N)].
    # Here B's rows are n-major ([N, H] flattened), and d_base is added to D: set to 0.
    base, W = _take(params, "base_params", "x_proj.weight")
    H, N = mixer.d_model, mixer.d_state
    if W.shape[0] != N + 2 * H * N + H + N:
        raise ValueError(f"S7: x_proj.weight has {W.shape[0]} rows, expected {N + 2 * H * N + H + N} "
                         f"for d_model={H}, d_state={N}")
    lam, Bw, rest = W.split([N, H * N, W.shape[0] - N - H * N], 0)
    Bw = Bw.unflatten(0, (H, N)).transpose(0, 1).flatten(0, 1)
    out = {"lambda_base": base, "d_base": torch.zeros(H, dtype=torch.float64),
           "x_proj.weight": torch.cat((lam, Bw, rest))}
    return _rest(params, out)


#: The S4-kernel code's ``param_transform``: the positive quantity a stored parameter stands for.
_TRANSFORMS = {"none": lambda p: p, "exp": torch.exp, "relu": lambda p: torch.relu(p) + 1e-4,
               "sigmoid": torch.sigmoid, "softplus": torch.nn.functional.softplus}


def _positive(param: torch.Tensor, transform: str, what: str) -> torch.Tensor:
    """The positive quantity a stored S4-kernel parameter stands for under ``transform``."""
    if transform not in _TRANSFORMS:
        raise ValueError(f"unknown {what} transform {transform!r}; expected one of {sorted(_TRANSFORMS)}")
    return _TRANSFORMS[transform](param)


#: The S4 / S4D arguments of the file's code that this model takes under the same name and meaning.
_S4_PASSED = ("dropout", "lr", "wd")
#: Arguments that only shape the file's stored form or its initialisation (read from the tensors,
#: converted, or overwritten by the loaded values).
_S4_FORM = ("dt_tie", "dt_transform", "dt_fast", "n_ssm", "deterministic", "verbose", "real_transform",
            "imag_transform", "tie_dropout", "d_state", "init", "dt_min", "dt_max")
#: Arguments that change the function, each converted or refused in ``_s4_kwargs``.
_S4_FUNCTION = ("transposed", "channels", "gate", "final_act", "postact", "l_max", "bottleneck", "is_real", "rank")
#: The file's real_transform values this model stores the same parameter under.
_SAME_REAL_TRANSFORM = ("exp", "softplus", "relu", "none")


def _s4_kwargs(kind: str, folder: Path, given: dict) -> dict:
    """seqblocks S4 / S4D arguments for the file's S4 / S4D arguments ``given`` (see ``_convert_s4_family``).

    The file's layer: [B, T, H] input (``transposed=False``), the SSM with ``channels`` output maps, D,
    then GELU; ungated a second GELU, gated ``gelu(W_o y * gelu(W_i x))`` (``gate``); dropout; and an
    output map that is Linear then GELU whatever ``final_act`` names (None: no map). With ``l_max`` its
    kernel stops after l_max steps.
    """
    given = dict(given)
    where = f"{folder}: {kind}"
    if "transposed" not in given:
        raise ValueError(f"{where} layers default to transposed=True, which inside a block reads a [B, T, H] input "
                         f"as [B, H, T]; that function is not reproduced. Pass the {kind} arguments the checkpoint "
                         f"was built with (mixer_kwargs={{'{kind}': {{'transposed': False, ...}}}})")
    known = set(_S4_PASSED) | set(_S4_FORM) | set(_S4_FUNCTION) | ({"disc"} if kind == "S4D" else set())
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{where}: unknown {kind} arguments {unknown}")
    if given["transposed"] is not False:
        raise ValueError(f"{where} transposed={given['transposed']!r}: only transposed=False reads the block's "
                         f"[B, T, H] input as the sequence it is")
    if given.get("bottleneck") is not None:
        raise ValueError(f"{where} bottleneck={given['bottleneck']!r} cannot be converted: the file's layer then "
                         f"reads its input through a dense input_linear (which fails on a d_model-wide input unless "
                         f"bottleneck=1); this {kind} has no input map")
    if given.get("is_real") and kind == "S4":
        raise ValueError(f"{where} is_real=True cannot be converted: the file's S4 kernel reads its real C as complex "
                         f"pairs in its first forward, which fails; there is no function to reproduce")
    channels, gate = given.get("channels", 1), given.get("gate")
    final_act, postact = given.get("final_act", "glu"), given.get("postact")
    if postact is not None:
        if final_act is not None:
            raise ValueError(f"{where} postact={postact!r} with final_act={final_act!r}: the file's code requires "
                             f"final_act=None when postact is given (it then uses postact as final_act)")
        final_act = postact
    if gate is not None and kind == "S4" and channels > 1 and channels != gate:
        raise ValueError(f"{where} gate={gate} with channels={channels}: the file's S4 builds its output gate for "
                         f"d_model inputs, so its forward fails on the channels * d_model features")
    if gate is not None and kind == "S4D" and channels == gate:
        raise ValueError(f"{where} gate={gate} with channels={channels}: the file's S4D then has no output_gate "
                         f"and its forward fails")
    if final_act is None and (channels > 1 or gate is not None):
        raise ValueError(f"{where} final_act=None with channels={channels}, gate={gate}: the layer's output is then "
                         f"wider than d_model and the block's residual cannot take it")
    for arg, default in (("real_transform", "exp"), ("imag_transform", "none"), ("dt_transform", "exp")):
        if given.get(arg, default) not in _TRANSFORMS:
            raise ValueError(f"{where}: unknown {arg} {given[arg]!r}; the file's code knows {list(_TRANSFORMS)}")
    transform = given.get("real_transform", "exp")
    per_state = given.get("dt_tie", True) is False
    out = {k: given[k] for k in _S4_PASSED if k in given}
    if out.get("lr") == 0.0:  # the file keeps its SSM tensors as frozen buffers: no learning-rate hint here
        del out["lr"]
    out.update(real_transform="exp" if per_state or transform not in _SAME_REAL_TRANSFORM else transform,
               activation="gelu", double_activation=gate is None, final_act=None if final_act is None else "gelu",
               channels=channels)
    if gate is not None:
        out.update(gate=gate, gate_act="gelu")
    if given.get("l_max") is not None:
        out.update(l_max=given["l_max"], truncate_kernel=True)
    if kind == "S4":
        out["rank"] = given.get("rank", 1)
    else:
        disc = given.get("disc", "zoh")
        if disc not in ("zoh", "bilinear"):
            raise ValueError(f"{where} disc={disc!r}; the file's S4D computes 'zoh' or 'bilinear'")
        out["disc"] = disc
    return out


def _convert_s4_family(params, mixer, file_kwargs, kind: str):
    """One S4 / S4D layer of the file as this S4 / S4D mixer (``_s4_kwargs`` built it).

    File: A_real / A_imag [n_ssm, n] with Λ = -t_re(A_real) - i t_im(A_imag) (A_imag absent and Λ real
    under is_real), B [1, n_ssm, n, 2], C [channels, H, n, 2], S4's low-rank P [rank, n_ssm, n, 2]
    (A = Λ - P P^*), inv_dt [H, 1] with dt = t_dt(inv_dt) (sinh first under dt_fast) or [H, n], one step
    per state (dt_tie=False), D [channels, H]; the rows repeat over H as h -> h mod n_ssm. The same
    tensors again under ``layer.kernel.``, S4's ``layer.kernel.l_kernel``, ``input_gate.0`` /
    ``output_gate`` / ``output_linear.0`` Linear layers.

    Per-state steps: the file's system is x' = Δ A x + Δ B u (Δ diagonal, bilinear or ZOH with a unit
    step), which here is the same system with dt = 1: S4D takes Λ' = Δ Λ, B' = Δ B; for S4 the change of
    basis x = Δ^{1/2} x' makes it DPLR again, Λ' = Δ Λ, P' = Δ^{1/2} P, B' = Δ^{1/2} B, C' = C Δ^{1/2}.

    S4's stored C is S4's C̃ = C (I - Ā^M) for the kernel length M = l_kernel it last computed (the raw C
    while l_kernel = 0); the true C, which this S4 stores, is C̃ (I - Ā^M)^{-1}, solved in float64.
    """
    is_real = bool(file_kwargs.get("is_real", False))
    names = ("A_real",) + (() if is_real else ("A_imag",)) + ("B", "C", "inv_dt", "D")
    names += ("P",) if kind == "S4" else ()
    taken = dict(zip(names, _take(params, *names), strict=True))
    if kind == "S4" and "layer.kernel.l_kernel" not in params:  # it says whether C is S4's C̃, and for what length
        raise ValueError("missing mixer tensors ['layer.kernel.l_kernel'] (S4's kernel length, a buffer of its kernel)")
    l_kernel = 0
    for k in [k for k in params if k.startswith("layer.kernel.")]:
        name, value = k[len("layer.kernel."):], params.pop(k)
        if kind == "S4" and name == "l_kernel":
            if value.numel() != 1:
                raise ValueError(f"{k} must be a scalar, got shape {tuple(value.shape)}")
            l_kernel = int(value)
            continue
        twin = taken.get(name) if name != "D" else None
        if twin is None or not torch.equal(value, twin):
            raise ValueError(f"{k} is not a copy of the layer's own {name}")
    if kind == "S4" and l_kernel < 0:
        raise ValueError(f"layer.kernel.l_kernel={l_kernel} must be >= 0")
    H, n, c = mixer.d_model, mixer.d_state // 2, mixer.channels
    A_real, B, C, inv_dt, D = (taken[k].double() for k in ("A_real", "B", "C", "inv_dt", "D"))
    if A_real.dim() != 2 or A_real.shape[1] != n or H % A_real.shape[0]:
        raise ValueError(f"{kind}: A_real has shape {tuple(A_real.shape)}, expected [n_ssm, {n}] with n_ssm dividing "
                         f"{H}")
    n_ssm, pair = A_real.shape[0], () if is_real else (2,)
    if tuple(B.shape) != (1, n_ssm, n, *pair) or tuple(C.shape) != (c, H, n, *pair):
        raise ValueError(f"{kind}: B {tuple(B.shape)} / C {tuple(C.shape)}, expected {(1, n_ssm, n, *pair)} / "
                         f"{(c, H, n, *pair)} (channels={c}{', is_real' if is_real else ''})")
    if tuple(D.shape) != (c, H):
        raise ValueError(f"{kind}: D has shape {tuple(D.shape)}, expected {(c, H)} (channels={c})")
    per_state = inv_dt.dim() == 2 and inv_dt.shape[1] == n and n != 1
    if inv_dt.numel() != H and not per_state:
        raise ValueError(f"{kind}: inv_dt has shape {tuple(inv_dt.shape)}, expected [{H}, 1] or [{H}, {n}]")
    declared = file_kwargs.get("dt_tie", True) is False
    if per_state != declared and not (n == 1 and declared):
        raise ValueError(f"{kind}: inv_dt has shape {tuple(inv_dt.shape)} but the arguments say dt_tie="
                         f"{file_kwargs.get('dt_tie', True)}; pass the arguments the checkpoint was built with")
    rep = H // n_ssm
    f = {k: file_kwargs.get(k, d) for k, d in (("real_transform", "exp"), ("imag_transform", "none"),
                                                ("dt_transform", "exp"), ("dt_fast", False))}

    def cplx(t):
        return torch.complex(t, torch.zeros_like(t)) if is_real else torch.complex(t[..., 0], t[..., 1])

    pos = _positive(A_real, f["real_transform"], "real").repeat(rep, 1)  # -Re Λ [H, n]
    im = (torch.zeros_like(A_real) if is_real else
          -_positive(taken["A_imag"].double(), f["imag_transform"], "imag")).repeat(rep, 1)  # Im Λ
    Bc = cplx(B[0]).repeat(rep, 1)  # [H, n]
    Cc = cplx(C)  # [c, H, n]
    dt = _positive(torch.sinh(inv_dt) if f["dt_fast"] else inv_dt, f["dt_transform"], "dt")
    if not bool((dt > 0).all()):
        raise ValueError(f"{kind}: the steps dt = {f['dt_transform']}(inv_dt) include {int((dt <= 0).sum())} values "
                         f"<= 0, which have no log step here")
    out = {}
    if kind == "S4":
        P = cplx(taken["P"].double())
        if P.dim() != 3 or tuple(P.shape[1:]) != (n_ssm, n):
            raise ValueError(f"S4: P has shape {tuple(taken['P'].shape)}, expected [rank, {n_ssm}, {n}, 2]")
        P = P.permute(1, 0, 2).repeat(rep, 1, 1)  # [H, rank, n]
    if per_state:
        dt = dt.reshape(H, n)
        pos, im = pos * dt, im * dt
        if kind == "S4":
            root = dt.sqrt()
            P, Bc, Cc = P * root[:, None], Bc * root, Cc * root
        else:
            Bc = Bc * dt
        dt = torch.ones(H, dtype=torch.float64)
    dt = dt.reshape(H)
    lam = torch.complex(-pos, im)
    if kind == "S4" and l_kernel > 0:
        Cc = _s4_true_C(lam, P, Bc, Cc, dt, l_kernel)
    transform = mixer.real_transform
    if not per_state and transform == f["real_transform"] and transform in ("exp", "softplus", "relu"):
        out["A_real"] = A_real.repeat(rep, 1)  # the same stored parameter
    elif transform == "none":
        out["A_real"] = -pos
    else:
        out["A_real"] = torch.log(pos)
    out.update(A_imag=im, B_re=Bc.real, B_im=Bc.imag, log_dt=torch.log(dt))
    Cc = Cc[0] if c == 1 else Cc
    out.update(C_re=Cc.real, C_im=Cc.imag, D=D[0] if c == 1 else D)
    if kind == "S4":
        out.update(P_re=P.real, P_im=P.imag)
    if mixer.gate is not None:
        for part in ("weight", "bias"):
            if f"input_gate.0.{part}" in params:
                out[f"input_gate.{part}"] = params.pop(f"input_gate.0.{part}")
        if not any(k.startswith("output_gate.") for k in params):  # the file's S4 with channels == gate: identity
            width = mixer.gate * H
            out["output_gate.weight"] = torch.eye(width, dtype=torch.float64)
            out["output_gate.bias"] = torch.zeros(width, dtype=torch.float64)
    return _rest(params, out)


#: The largest error amplification ``||(I - Ā^M)^{-1}|| * max(1, ||Ā^M||)`` (spectral norms) for which
#: recovering S4's C from C̃ in float64 (I - Ā^M is formed to 1.1e-16 * ||Ā^M||) stays below fp32 rounding
#: (6e-8): 1.1e-16 * 1e8 ~ 1e-8.
_S4_MAX_AMPLIFICATION = 1e8


def _s4_true_C(lam, P, B, C_tilde, dt, M: int) -> torch.Tensor:
    """S4's C from its stored C̃ = C (I - Ā^M): ``C̃ (I - Ā^M)^{-1}`` per channel, in float64 (``C_tilde``
    [c, H, n] halves of conjugate pairs; the result likewise).

    Raises:
        ValueError: I - Ā^M so close to singular (steps so small that Ā^M ~ I, or a pole at ~0) that the
            recovered C would not be exact to fp32 rounding.
    """
    A_bar, _ = dplr_bilinear(lam, P, B, dt)  # [H, N, N]
    N = A_bar.shape[-1]
    power = torch.linalg.matrix_power(A_bar, M)
    Mat = torch.eye(N, dtype=A_bar.dtype) - power
    amp = torch.linalg.matrix_norm(torch.linalg.pinv(Mat), ord=2) * torch.linalg.matrix_norm(power, ord=2).clamp(min=1)
    if not bool((amp <= _S4_MAX_AMPLIFICATION).all()):
        h = int(torch.nan_to_num(amp, nan=float("inf")).argmax())
        raise ValueError(f"S4: the stored C is S4's C̃ = C (I - Ā^L) for L = layer.kernel.l_kernel = {M}; recovering C "
                         f"solves with I - Ā^L, which amplifies rounding by {float(amp[h]):.3g} at channel {h} "
                         f"(above {_S4_MAX_AMPLIFICATION:.0e}: Ā^L is nearly I there, so C̃ nearly vanishes), so C "
                         f"would not be exact to fp32 rounding")
    full = torch.cat((C_tilde, C_tilde.conj()), -1)  # [c, H, N]
    C = torch.linalg.solve(Mat.transpose(-1, -2), full.unsqueeze(-1)).squeeze(-1)
    return C[..., : N // 2]


def _convert_s4(params, mixer, file_kwargs):
    return _convert_s4_family(params, mixer, file_kwargs, "S4")


def _convert_s4d(params, mixer, file_kwargs):
    return _convert_s4_family(params, mixer, file_kwargs, "S4D")


_MIXER_CONVERTERS = {"LRU": _convert_lru, "S5": _convert_s5, "Centaurus": _convert_centaurus,
                     "RGLRU": _convert_rglru, "S7": _convert_s7, "S4D": _convert_s4d, "S4": _convert_s4}

#: Constructor values these layers need here to compute the file's function (the file's layers have no
#: choice in them): S5's skip is a full [H, H] matrix, S7 adds its input to its output, Centaurus scales
#: B by Δ (B̄ = Δ B, Ā = exp(Δ A), which is the "mamba" rule whatever discretization was named), RG-LRU's
#: gates are dense (one block) and its gate branch takes the exact (erf) GeLU.
_FORCED_KWARGS = {"S5": {"full_D": True}, "S7": {"input_residual": True}, "Centaurus": {"discretization": "mamba"},
                  "RGLRU": {"gate_gelu": "exact", "num_heads": 1}}

#: S5 discretizations of the file's code, all converted. Its "bilinear" is Ā = (1 - ΔΛ/2) / (1 + ΔΛ/2), the
#: usual rule of -Λ (so |Ā| > 1: it grows), placed as our "bilinear" with Λ' = -Λ (``real_transform="none"``);
#: "async" (Ā = exp(Δ τ Λ) with ``integration_timesteps`` τ, B̄ by ZOH) is our "async". The file's LTI S5
#: never passes timesteps to its async rule, which then fails; ours computes that rule (ZOH without τ).
_S5_DISCRETIZATIONS = ("zoh", "bilinear", "dirac", "async", "no_discretization")


def _backbone_key(key: str, mixer_types: list[str], dropped: list[str]) -> str | None:
    """The seqblocks name of one checkpoint key (None: dropped, recorded in ``dropped``)."""
    if key == "lm_head.weight":
        return key
    m = re.fullmatch(r"backbone\.(embedding\.weight|norm_f\.(?:weight|bias))", key)
    if m:
        return m.group(1)
    m = re.fullmatch(r"backbone\.layers\.(\d+)\.(.+)", key)
    if m is None:
        raise ValueError(f"unexpected key {key!r}: expected lm_head.weight or backbone.<embedding | layers | "
                         f"norm_f>...")
    i, rest = int(m.group(1)), m.group(2)
    if i >= len(mixer_types):
        raise ValueError(f"key {key!r} names layer {i}, but config.json lists {len(mixer_types)} mixer types")
    if not rest.startswith("mixer."):
        return f"layers.{i}.{rest}"  # norm, norm2, mlp.fc1, mlp.fc2
    name = rest[len("mixer."):]
    kind = mixer_types[i]
    if kind == "Mamba" and name.startswith("dtA_proj."):
        dropped.append(key)
        return None
    if kind in _MIXER_CONVERTERS:
        return f"layers.{i}.mixer.{name}"  # converted per layer afterwards
    # Mamba's conv, and attention's q / k / v conv (MHA's d_conv), are nn.Conv1d modules there.
    name = {"conv1d.weight": "conv_weight", "conv1d.bias": "conv_bias"}.get(name, name)
    return f"layers.{i}.mixer.{name}"


def load_backbone_checkpoint(path: str | Path, *, mixer_kwargs: dict | None = None,
                             device: torch.device | str | None = None,
                             dtype: torch.dtype | None = None) -> LRNNLMHeadModel:
    """Load a ``config.json`` + ``pytorch_model.bin`` hybrid-LM folder (see the module docstring) as an
    ``LRNNLMHeadModel``.

    Args:
        path (str | Path): the folder.
        mixer_kwargs (dict | None): the per-mixer-type arguments the checkpoint was built with, which
            the folder does not record (attention layers need ``{"attn": {"num_heads": H}}``, S5 layers
            ``{"S5": {"discretization": ...}}``, Centaurus layers ``sub_state_dim`` and ``mode``, S4 and
            S4D layers their arguments as built, with ``transposed=False``). Values the converted
            function needs are set here: S5 ``full_D=True`` and ``real_transform`` ("softplus", "none"
            for its bilinear rule), S7 ``input_residual=True``, Centaurus ``discretization="mamba"``
            (B̄ = Δ B), RG-LRU ``gate_gelu="exact"`` and ``num_heads=1``, S4 / S4D ``activation="gelu"``,
            ``final_act="gelu"``, ``double_activation`` (ungated), ``gate_act="gelu"`` (gated) and
            ``truncate_kernel=True`` with ``l_max``. Default: None.
        device, dtype: where and in what dtype to build the model. Default: None.

    Returns:
        LRNNLMHeadModel: the model with the folder's weights, in eval mode. Its attention layers are
        causal. A Mamba layer's ``dtA_proj`` (a second step projection used only for
        ``integration_timesteps``) has no counterpart and is not loaded; a warning lists such keys.

    Raises:
        ValueError: a missing or unreadable file, a mixer type outside ``BACKBONE_MIXERS``, attention
            layers without ``num_heads``, S5 layers without a discretization or with ``conj_sym``, S4 /
            S4D arguments whose layer is not reproduced (``transposed=True``, ``bottleneck``, S4
            ``is_real``, the gate / channels combinations the file's own forward fails on), an S4 C̃
            whose recovery is ill-conditioned, a Centaurus A with a non-negative real part, keys or
            shapes that do not fit.
    """
    folder = Path(path)
    config = _read_json(folder / "config.json")
    for key in ("d_model", "d_state", "n_layer", "vocab_size", "mixer_types"):
        if key not in config:
            raise ValueError(f"{folder / 'config.json'}: missing {key!r}")
    mixer_types = list(config["mixer_types"])
    unsupported = sorted({t for t in mixer_types if t not in BACKBONE_MIXERS})
    if unsupported:
        raise ValueError(f"{folder}: mixer types {unsupported} cannot be placed (unknown mixer types); this loader "
                         f"places {list(BACKBONE_MIXERS)}")
    if mixer_kwargs is not None and not isinstance(mixer_kwargs, dict):
        raise TypeError(f"mixer_kwargs must be a dict of per-mixer-type dicts, got {type(mixer_kwargs).__name__}")
    bad = {k: v for k, v in (mixer_kwargs or {}).items() if not isinstance(v, dict)}
    if bad:
        raise TypeError(f"mixer_kwargs maps mixer types to dicts of their arguments (as the checkpoint was built); "
                        f"got non-dict values {bad}")
    mixer_kwargs = {k: dict(v) for k, v in (mixer_kwargs or {}).items()}
    file_kwargs = {k: dict(v) for k, v in mixer_kwargs.items()}
    for kind in ("S4", "S4D"):
        if kind in mixer_types:
            mixer_kwargs[kind] = _s4_kwargs(kind, folder, mixer_kwargs.get(kind, {}))
    for kind, forced in _FORCED_KWARGS.items():
        if kind in mixer_types:
            mixer_kwargs[kind] = {**mixer_kwargs.get(kind, {}), **forced}
    if "S5" in mixer_types:
        s5 = mixer_kwargs["S5"]
        if "discretization" not in s5:
            raise ValueError(f"{folder}: config.json does not record the S5 discretization; pass "
                             f"mixer_kwargs={{'S5': {{'discretization': ...}}}} as the checkpoint was built")
        disc = s5["discretization"]
        if disc not in _S5_DISCRETIZATIONS:
            raise ValueError(f"{folder}: S5 discretization={disc!r} is not one of the file's code's "
                             f"{list(_S5_DISCRETIZATIONS)}")
        if s5.get("conj_sym"):
            raise ValueError(f"{folder}: S5 conj_sym=True: the file's (LTI) S5 refuses it, so no such checkpoint "
                             f"computes anything")
        # The file's Re Λ = -softplus(A[:, 0]); its bilinear rule is ours on -Λ (Re -Λ > 0).
        s5["real_transform"] = "none" if disc == "bilinear" else "softplus"
    if "attn" in mixer_types and "num_heads" not in mixer_kwargs.get("attn", {}):
        raise ValueError(f"{folder}: config.json does not record the attention head count; pass "
                         f"mixer_kwargs={{'attn': {{'num_heads': H}}}} as the checkpoint was built")
    weights = folder / "pytorch_model.bin"
    if not weights.is_file():
        raise ValueError(f"{folder}: no pytorch_model.bin")
    try:
        raw = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{weights}: not a plain state dict of tensors ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{weights}: expected a dict of tensors")
    model = LRNNLMHeadModel(config["d_model"], config["d_state"], config["n_layer"], config["vocab_size"],
                            mixer_types, mixer_kwargs=mixer_kwargs,
                            **{k: config[k] for k in _CONFIG_KEYS if k in config}, device=device, dtype=dtype)
    dropped: list[str] = []
    state = {}
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        try:
            name = _backbone_key(key, mixer_types, dropped)
        except ValueError as err:
            raise ValueError(f"{weights}: {err}") from None
        if name is None:
            continue
        m = re.fullmatch(r"layers\.(\d+)\.mixer\.(.+)", name)
        if m and mixer_types[int(m.group(1))] in _MIXER_CONVERTERS:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        if name.endswith("mixer.conv_weight") and value.dim() == 3:
            value = value.squeeze(1)  # Conv1d's [E, 1, W] -> [E, W]
        state[name] = value
    for i, params in sorted(per_layer.items()):
        kind = mixer_types[i]
        try:
            converted = _MIXER_CONVERTERS[kind](dict(params), model.layers[i].mixer, file_kwargs.get(kind, {}))
        except ValueError as err:
            raise ValueError(f"{weights}: layer {i} ({kind}): {err}") from None
        state.update({f"layers.{i}.mixer.{k}": v for k, v in converted.items()})
    if model.tie_embeddings and "lm_head.weight" not in state and "embedding.weight" in state:
        state["lm_head.weight"] = state["embedding.weight"]
    own = model.state_dict()
    state = {k: v.to(device=own[k].device, dtype=own[k].dtype) if k in own else v for k, v in state.items()}
    _load_strict(model, state, weights)
    if dropped:
        warnings.warn(f"{weights}: not loaded (no counterpart; used only with integration_timesteps): {dropped}",
                      stacklevel=2)
    return model.eval()


# ---------------------------------------------------------------- model.safetensors from MLX


def _mlx_moe(params: dict[str, torch.Tensor], ffn) -> dict[str, torch.Tensor]:
    """One block's mixture-of-experts FFN tensors (names after ``ffn.``) as seqblocks' ``MoEFeedForward``.

    The file keeps one module per expert (``experts.{e}.{gate, up, down}`` SwiGLU, or ``experts.{e}.{up,
    down}`` squared ReLU in the latent variant), a list of shared SwiGLU experts (``shared_experts.{j}``)
    or one squared-ReLU ``shared_expert``, and the router. Its routing is: top-k by logits with the
    weights a softmax over the chosen logits (the SwiGLU variants, with ``expert_bias`` added to the
    logits for the choice only: ``moe_bias_mode="logits"``), or sigmoid scores plus
    ``score_correction_bias`` for both the choice and the normalised weights (latent:
    ``moe_bias_mode="corrected"``), times ``moe_routed_scaling_factor`` there; group-limited choice
    (latent only) scores a group by the sum of its scores. The bias is loaded into ``expert_bias``; a
    nonzero one needs the config's block to have the matching ``moe_bias_mode`` (a zero one routes alike
    in every mode).
    """
    latent = isinstance(ffn, LatentMoEFeedForward)
    expected_router = "sigmoid" if latent else "softmax"
    problems = []
    if ffn.router_kind != expected_router:
        problems.append(f"moe_router={ffn.router_kind!r} (the file's router is {expected_router})")
    if not ffn.norm_topk:
        problems.append("moe_norm_topk=False (the file renormalises the top-k weights)")
    if not latent and ffn.scaling != 1.0:
        problems.append(f"moe_routed_scaling_factor={ffn.scaling} (this file variant applies none)")
    if not latent and ffn.n_groups != 1:
        problems.append(f"moe_n_groups={ffn.n_groups} (this file variant routes without groups)")
    if latent and ffn.n_groups > 1 and ffn.n_experts // ffn.n_groups > 2:
        problems.append(f"moe_n_groups={ffn.n_groups} with {ffn.n_experts // ffn.n_groups} experts per group (the "
                        f"file scores a group by the sum of all its scores, seqblocks by its best two)")
    if problems:
        raise ValueError(f"the config's MoE FFN routes differently from the file: {', '.join(problems)}")
    biased = [k for k in params if re.fullmatch(r"(experts|shared_experts?)\.(\d+\.)?\w+\.bias", k)]
    if biased:
        raise ValueError(f"expert projections with biases {biased[:4]} (the MoE experts here have none)")
    bias_key = "score_correction_bias" if latent else "expert_bias"
    bias = params.pop(bias_key, None)
    mode = "corrected" if latent else "logits"
    if bias is not None and bool((bias != 0).any()) and ffn.bias_mode != mode:
        where = "the sigmoid scores, for the choice and the weights" if latent else "the logits, for the choice only"
        raise ValueError(f"a nonzero {bias_key}: the file adds it to {where}, which is moe_bias_mode={mode!r}; the "
                         f"config's block has moe_bias_mode={ffn.bias_mode!r}")
    out = {"router.weight": params.pop("router.weight", None),
           "expert_bias": torch.zeros(ffn.n_experts) if bias is None else bias}
    E = ffn.n_experts
    names = ("up", "down") if latent else ("gate", "up", "down")
    try:
        experts = {n: [params.pop(f"experts.{e}.{n}.weight") for e in range(E)] for n in names}
    except KeyError as err:
        raise ValueError(f"the file lacks expert tensor {err.args[0]!r} ({E} experts expected)") from None
    if latent:
        out["w_up"] = torch.stack([w.T for w in experts["up"]])
        out["w_down"] = torch.stack([w.T for w in experts["down"]])
        for n in ("up", "down"):
            if f"shared_expert.{n}.weight" in params:
                out[f"shared.{n}.weight"] = params.pop(f"shared_expert.{n}.weight")
        for n in ("down_proj", "up_proj"):
            if f"{n}.weight" in params:
                out[f"{n}.weight"] = params.pop(f"{n}.weight")
    else:
        out["w_gate_up"] = torch.stack([torch.cat((g.T, u.T), 1) for g, u in zip(experts["gate"], experts["up"],
                                                                                strict=True)])
        out["w_down"] = torch.stack([w.T for w in experts["down"]])
        shared = sorted({int(m.group(1)) for k in params if (m := re.fullmatch(r"shared_experts\.(\d+)\..+", k))})
        if shared:
            if shared != list(range(len(shared))):
                raise ValueError(f"shared experts numbered {shared}, expected 0..{len(shared) - 1}")
            parts = {n: [params.pop(f"shared_experts.{j}.{n}.weight") for j in shared] for n in names}
            # The sum of S SwiGLU experts is one SwiGLU whose hidden units are theirs side by side.
            out["shared.gate_up.weight"] = torch.cat(parts["gate"] + parts["up"], 0)
            out["shared.down.weight"] = torch.cat(parts["down"], 1)
    if out["router.weight"] is None:
        del out["router.weight"]
    out.update(params)  # anything left is reported by the strict load
    return out


def _mlx_state(raw: dict[str, torch.Tensor], model: LanguageModel) -> dict[str, torch.Tensor]:
    fused: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    moe: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        if key == "embed.weight":
            state["embedding.weight"] = value
            continue
        if key == "head.weight":
            state["lm_head.weight"] = value
            continue
        m = re.fullmatch(r"final_norm\.(weight|bias)", key)
        if m:
            state[f"norm_f.{m.group(1)}"] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m is None:
            raise ValueError(f"unexpected key {key!r}: expected embed, blocks.<i>, final_norm or head")
        i, rest = m.group(1), m.group(2)
        block = model.layers[int(i)] if int(i) < len(model.layers) else None
        if block is not None and isinstance(block.ffn, MoEFeedForward) and rest.startswith("ffn."):
            moe.setdefault(int(i), {})[rest[len("ffn."):]] = value
            continue
        q = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", rest)
        if q:
            fused.setdefault(f"layers.{i}.attention.in_proj.{q.group(2)}", {})[q.group(1)] = value
            continue
        g = re.fullmatch(r"ffn\.(gate|up)\.(weight|bias)", rest)
        if g and block is not None and hasattr(block.ffn, "gate_up"):
            fused.setdefault(f"layers.{i}.ffn.gate_up.{g.group(2)}", {})[g.group(1)] = value
            continue
        rest = re.sub(r"^attention\.o_proj\.", "attention.out_proj.", rest)
        state[f"layers.{i}.{rest}"] = value
    for name, parts in fused.items():
        order = ("q", "k", "v") if ".in_proj." in name else ("gate", "up")
        absent = [p for p in order if p not in parts]
        if absent:
            raise ValueError(f"{name}: the file lacks the {absent} part(s) of it")
        state[name] = torch.cat([parts[p] for p in order], 0)
    for i, params in sorted(moe.items()):
        try:
            converted = _mlx_moe(params, model.layers[i].ffn)
        except ValueError as err:
            raise ValueError(f"block {i}: {err}") from None
        state.update({f"layers.{i}.ffn.{k}": v for k, v in converted.items()})
    return state


def load_mlx_checkpoint(path: str | Path, config: LanguageModelConfig, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> LanguageModel:
    """Load a ``model.safetensors`` folder written from an MLX model of ``ConfigurableBlock`` s (see the
    module docstring) as a ``LanguageModel`` of ``config``.

    Args:
        path (str | Path): the folder (or the ``.safetensors`` file itself).
        config (LanguageModelConfig): the architecture the weights were trained with (block names,
            sizes, ``tie_embeddings``), which the folder does not record.
        device, dtype: where and in what dtype to build the model. Default: None.

    Returns:
        LanguageModel: the model with the file's weights, in eval mode. ``metadata.json`` (step and
        training metadata), when present, is in ``model.checkpoint_metadata``.

    Raises:
        ValueError: a missing or unreadable file, keys or shapes that do not fit ``config``; an MoE
            FFN whose routing the config's FFN computes differently (router kind, top-k
            renormalisation, scaling, groups, a nonzero selection bias with another ``moe_bias_mode``),
            expert biases.
        TypeError: config is not a ``LanguageModelConfig``.
    """
    import safetensors.torch

    if not isinstance(config, LanguageModelConfig):
        raise TypeError(f"load_mlx_checkpoint: config must be a LanguageModelConfig, got {type(config).__name__}")
    target = Path(path)
    weights = target if target.suffix == ".safetensors" else target / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{target}: no model.safetensors")
    try:
        raw = safetensors.torch.load_file(str(weights))
    except Exception as err:
        raise ValueError(f"{weights}: not a readable safetensors file: {err}") from None
    model = LanguageModel(config, device=device, dtype=dtype)
    try:
        state = _mlx_state(raw, model)
    except ValueError as err:
        raise ValueError(f"{weights}: {err}") from None
    if model.tie_embeddings and "lm_head.weight" not in state and "embedding.weight" in state:
        state["lm_head.weight"] = state["embedding.weight"]
    own = model.state_dict()
    state = {k: v.to(device=own[k].device, dtype=own[k].dtype) if k in own else v for k, v in state.items()}
    _load_strict(model, state, weights)
    meta = weights.parent / "metadata.json"
    model.checkpoint_metadata = _read_json(meta) if meta.is_file() else {}
    return model.eval()
