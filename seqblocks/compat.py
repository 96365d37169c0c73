"""Loading checkpoint folders written by other training code into seqblocks models.

Two folder layouts are read (``docs/seed_compat.md`` says where each comes from):

- ``load_backbone_checkpoint(path)``: a hybrid LM saved as ``config.json`` (``d_model``, ``d_state``,
  ``n_layer``, ``vocab_size``, ``mixer_types``, ``d_intermediate``, ``norm_epsilon``, ``rms_norm``,
  ``fused_add_norm``, ``residual_in_fp32``, ``tie_embeddings``, ``pad_vocab_size_multiple``) and
  ``pytorch_model.bin``, a state dict whose keys start ``backbone.`` (``backbone.embedding``,
  ``backbone.layers.{i}.{norm, mixer, norm2, mlp}``, ``backbone.norm_f``) plus ``lm_head.weight``.
  It becomes an ``LRNNLMHeadModel``. Attention, Mamba, LRU, S4D, S5, Centaurus, RG-LRU and S7 layers are
  placed; the linear RNNs' parameters are converted to seqblocks' parameterisation exactly (the same
  function, up to float rounding), with the constructor values that function needs forced
  (``_FORCED_KWARGS``, ``_s4d_kwargs``). S4 layers raise.
- ``load_mlx_checkpoint(path, config)``: ``model.safetensors`` (and ``metadata.json``) written by an MLX
  trainer from a model of ``ConfigurableBlock`` s, keys ``embed``, ``blocks.{i}.{attention, ffn,
  attn_norm, ffn_norm}``, ``final_norm``, ``head``, with separate ``q_proj`` / ``k_proj`` / ``v_proj`` /
  ``o_proj`` and ``gate`` / ``up`` / ``down`` projections. The folder records no architecture, so the
  caller gives the matching ``LanguageModelConfig``; it becomes a ``LanguageModel``. Mixture-of-experts
  FFNs (``ffn.router``, ``ffn.experts.{e}``, ``ffn.shared_experts.{j}`` / ``ffn.shared_expert``) become
  the "moe" / "shared_moe" / "latent_moe" FFNs of the config; a routing the config's FFN would compute
  differently raises.

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

__all__ = ["load_backbone_checkpoint", "load_mlx_checkpoint", "BACKBONE_MIXERS"]

#: Mixer types whose parameters ``load_backbone_checkpoint`` can place: attention (fused ``in_proj``,
#: ``out_proj``, with ``mlp_dim`` / ``d_conv`` too), Mamba (``conv1d`` as ``conv_weight`` / ``conv_bias``),
#: and the linear RNNs LRU, S4D, S5, Centaurus, RG-LRU and S7, whose parameters are converted exactly
#: (``_MIXER_CONVERTERS``). S4 is not placed (see ``_UNPLACED``).
BACKBONE_MIXERS = ("attn", "Mamba", "LRU", "S4D", "S5", "Centaurus", "RGLRU", "S7")

#: Why the mixer types outside ``BACKBONE_MIXERS`` are refused.
_UNPLACED = {
    "S4": "it stores its DPLR system in an S4-kernel form (inv_dt, A_real / A_imag through configurable "
          "transforms, B, C and P as [..., N, 2] over half the conjugate states, shared over n_ssm copies) and its "
          "ungated output path applies GELU twice; this loader does not convert that form",
}

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
    # File: A [P, 2] = (inverse-softplus of -Re Λ, Im Λ), real B [P, H], log_dt [P], C [H, P, 2], D [H, H].
    A, B, log_dt, C, D = (t.double() for t in _take(params, "A", "B", "log_dt", "C", "D"))
    if A.dim() != 2 or A.shape[-1] != 2 or C.dim() != 3 or C.shape[-1] != 2:
        raise ValueError(f"S5: expected A [P, 2] and C [H, P, 2], got A {tuple(A.shape)}, C {tuple(C.shape)}")
    out = {"Lambda_re_log": torch.log(torch.nn.functional.softplus(A[:, 0])), "Lambda_im": A[:, 1],
           "B_re": B, "B_im": torch.zeros_like(B), "C_re": C[..., 0], "C_im": C[..., 1], "D": D, "log_step": log_dt}
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


def _positive(param: torch.Tensor, transform: str, what: str) -> torch.Tensor:
    """The positive quantity a stored S4-kernel parameter stands for (that code's ``param_transform``)."""
    fns = {"none": lambda p: p, "exp": torch.exp, "relu": lambda p: torch.relu(p) + 1e-4, "sigmoid": torch.sigmoid,
           "softplus": torch.nn.functional.softplus}
    if transform not in fns:
        raise ValueError(f"S4D: unknown {what} transform {transform!r}; expected one of {sorted(fns)}")
    return fns[transform](param)


#: S4D constructor values of the file's code and what this loader requires of them (the function it
#: reproduces: channels=1, no gate or bottleneck, the [B, T, H] layout, complex A).
_S4D_REQUIRED = {"transposed": False, "channels": 1, "gate": None, "bottleneck": None, "postact": None,
                 "is_real": False}
#: The file's S4D arguments this model takes under the same name and meaning.
_S4D_PASSED = ("disc", "dropout", "lr", "wd")
#: The file's S4D arguments that only shape its stored form or its initialisation (read from the tensors,
#: converted, or overwritten by the loaded values).
_S4D_FORM = ("dt_tie", "dt_transform", "dt_fast", "rank", "n_ssm", "deterministic", "verbose", "real_transform",
             "imag_transform", "tie_dropout", "final_act", "d_state", "init", "dt_min", "dt_max", "l_max")


def _s4d_kwargs(folder: Path, given: dict) -> dict:
    """seqblocks S4D arguments for the file's S4D arguments ``given`` (see ``_convert_s4d``)."""
    given = dict(given)
    if "transposed" not in given:
        raise ValueError(f"{folder}: S4D layers default to transposed=True, which inside a block reads a [B, T, H] "
                         f"input as [B, H, T]; that function is not reproduced. Pass the S4D arguments the "
                         f"checkpoint was built with (mixer_kwargs={{'S4D': {{'transposed': False, ...}}}})")
    bad = {k: given[k] for k, v in _S4D_REQUIRED.items() if k in given and given[k] != v}
    if bad:
        raise ValueError(f"{folder}: S4D layers with {bad} cannot be converted; supported: {_S4D_REQUIRED}")
    unknown = sorted(set(given) - set(_S4D_REQUIRED) - set(_S4D_PASSED) - set(_S4D_FORM))
    if unknown:
        raise ValueError(f"{folder}: unknown S4D arguments {unknown}")
    if given.get("l_max") is not None:
        raise ValueError(f"{folder}: S4D l_max={given['l_max']}: the file's kernel stops after l_max steps, while "
                         f"seqblocks' S4D kernel spans the whole input; not reproduced for longer inputs")
    disc = given.get("disc", "zoh")
    if disc not in ("zoh", "bilinear"):
        raise ValueError(f"{folder}: S4D disc={disc!r}; the file's S4D computes 'zoh' or 'bilinear'")
    out = {k: given[k] for k in _S4D_PASSED if k in given}
    # The ungated path: GELU, GELU, dropout, then Linear followed by GELU whatever final_act names (None: nothing).
    out.update(real_transform="exp", activation="gelu", double_activation=True,
               final_act=None if given.get("final_act", "glu") is None else "gelu")
    return out


def _convert_s4d(params, mixer, file_kwargs):
    # File: A_real / A_imag [n_ssm, n] with A = -t_re(A_real) - i t_im(A_imag), B [1, n_ssm, n, 2], C [1, H, n, 2],
    # inv_dt [H] or [H, 1] with dt = t_dt(inv_dt) (sinh first under dt_fast), D [1, H]; the rows repeat over H
    # as h -> h mod n_ssm. The kernel 2 Re sum_n C_n B̄_n λ_n^l is ours with B = B, C = C.
    A_real, A_imag, B, C, inv_dt, D = _take(params, "A_real", "A_imag", "B", "C", "inv_dt", "D")
    for k in [k for k in params if k.startswith("layer.kernel.")]:
        twin = {"A_real": A_real, "A_imag": A_imag, "B": B, "C": C, "inv_dt": inv_dt}.get(k[len("layer.kernel."):])
        value = params.pop(k)
        if twin is None or not torch.equal(value, twin):
            raise ValueError(f"{k} is not a copy of the layer's own {k[len('layer.kernel.'):]}")
    H, n = mixer.d_model, mixer.d_state // 2
    if A_real.dim() != 2 or A_real.shape[1] != n or H % A_real.shape[0]:
        raise ValueError(f"S4D: A_real has shape {tuple(A_real.shape)}, expected [n_ssm, {n}] with n_ssm dividing {H}")
    if tuple(B.shape) != (1, A_real.shape[0], n, 2) or tuple(C.shape) != (1, H, n, 2):
        raise ValueError(f"S4D: B {tuple(B.shape)} / C {tuple(C.shape)}, expected [1, n_ssm, {n}, 2] / "
                         f"[1, {H}, {n}, 2] (channels=1)")
    if inv_dt.numel() != H:
        raise ValueError(f"S4D: inv_dt has shape {tuple(inv_dt.shape)}: one step per state (dt_tie=False) has no "
                         f"counterpart here (one step per channel)")
    rep = H // A_real.shape[0]
    f = {k: file_kwargs.get(k, d) for k, d in (("real_transform", "exp"), ("imag_transform", "none"),
                                                ("dt_transform", "exp"), ("dt_fast", False))}
    A_real, A_imag, B, C, inv_dt = (t.double() for t in (A_real, A_imag, B, C, inv_dt))
    re = _positive(A_real, f["real_transform"], "real")
    im = _positive(A_imag, f["imag_transform"], "imag")
    dt = _positive(torch.sinh(inv_dt) if f["dt_fast"] else inv_dt, f["dt_transform"], "dt").reshape(H)
    out = {"A_real": torch.log(re).repeat(rep, 1), "A_imag": (-im).repeat(rep, 1),
           "B_re": B[0, ..., 0].repeat(rep, 1), "B_im": B[0, ..., 1].repeat(rep, 1),
           "C_re": C[0, ..., 0], "C_im": C[0, ..., 1], "log_dt": torch.log(dt), "D": D.reshape(-1)}
    return _rest(params, out)


_MIXER_CONVERTERS = {"LRU": _convert_lru, "S5": _convert_s5, "Centaurus": _convert_centaurus,
                     "RGLRU": _convert_rglru, "S7": _convert_s7, "S4D": _convert_s4d}

#: Constructor values these layers need here to compute the file's function (the file's layers have no
#: choice in them): S5's skip is a full [H, H] matrix, S7 adds its input to its output, Centaurus scales
#: B by Δ (B̄ = Δ B, Ā = exp(Δ A), which is the "mamba" rule whatever discretization was named), RG-LRU's
#: gates are dense (one block) and its gate branch takes the exact (erf) GeLU.
_FORCED_KWARGS = {"S5": {"full_D": True}, "S7": {"input_residual": True}, "Centaurus": {"discretization": "mamba"},
                  "RGLRU": {"gate_gelu": "exact", "num_heads": 1}}

#: S5 discretizations the file's systems share with seqblocks' S5. Its "bilinear" is (1 - ΔΛ/2) / (1 + ΔΛ/2),
#: the reciprocal of the usual rule (not representable with Re Λ < 0), and "async" needs timesteps.
_S5_DISCRETIZATIONS = ("zoh", "dirac", "no_discretization")


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
            ``{"S5": {"discretization": ...}}``, Centaurus layers ``sub_state_dim`` and ``mode``, S4D
            layers their arguments as built, with ``transposed=False``). Values
            the converted function needs are set here: S5 ``full_D=True``, S7 ``input_residual=True``,
            Centaurus ``discretization="mamba"`` (B̄ = Δ B), RG-LRU ``gate_gelu="exact"`` and
            ``num_heads=1``, S4D ``double_activation=True`` and ``final_act="gelu"``. Default: None.
        device, dtype: where and in what dtype to build the model. Default: None.

    Returns:
        LRNNLMHeadModel: the model with the folder's weights, in eval mode. Its attention layers are
        causal. A Mamba layer's ``dtA_proj`` (a second step projection used only for
        ``integration_timesteps``) has no counterpart and is not loaded; a warning lists such keys.

    Raises:
        ValueError: a missing or unreadable file, a mixer type outside ``BACKBONE_MIXERS`` (naming why),
            attention layers without ``num_heads``, S5 layers without a discretization or with one that
            has no exact counterpart ("bilinear", "async"), a Centaurus A with a non-negative real part,
            keys or shapes that do not fit.
    """
    folder = Path(path)
    config = _read_json(folder / "config.json")
    for key in ("d_model", "d_state", "n_layer", "vocab_size", "mixer_types"):
        if key not in config:
            raise ValueError(f"{folder / 'config.json'}: missing {key!r}")
    mixer_types = list(config["mixer_types"])
    unsupported = sorted({t for t in mixer_types if t not in BACKBONE_MIXERS})
    if unsupported:
        why = "; ".join(f"{t}: {_UNPLACED[t]}" for t in unsupported if t in _UNPLACED)
        raise ValueError(f"{folder}: mixer types {unsupported} cannot be placed ({why or 'unknown mixer type'}); "
                         f"this loader places {list(BACKBONE_MIXERS)}")
    if mixer_kwargs is not None and not isinstance(mixer_kwargs, dict):
        raise TypeError(f"mixer_kwargs must be a dict of per-mixer-type dicts, got {type(mixer_kwargs).__name__}")
    bad = {k: v for k, v in (mixer_kwargs or {}).items() if not isinstance(v, dict)}
    if bad:
        raise TypeError(f"mixer_kwargs maps mixer types to dicts of their arguments (as the checkpoint was built); "
                        f"got non-dict values {bad}")
    mixer_kwargs = {k: dict(v) for k, v in (mixer_kwargs or {}).items()}
    file_kwargs = {k: dict(v) for k, v in mixer_kwargs.items()}
    if "S4D" in mixer_types:
        mixer_kwargs["S4D"] = _s4d_kwargs(folder, mixer_kwargs.get("S4D", {}))
    for kind, forced in _FORCED_KWARGS.items():
        if kind in mixer_types:
            mixer_kwargs[kind] = {**mixer_kwargs.get(kind, {}), **forced}
    if "S5" in mixer_types:
        if "discretization" not in mixer_kwargs["S5"]:
            raise ValueError(f"{folder}: config.json does not record the S5 discretization; pass "
                             f"mixer_kwargs={{'S5': {{'discretization': ...}}}} as the checkpoint was built")
        disc = mixer_kwargs["S5"]["discretization"]
        if disc not in _S5_DISCRETIZATIONS:
            raise ValueError(f"{folder}: S5 layers with discretization={disc!r} cannot be converted exactly; "
                             f"supported: {list(_S5_DISCRETIZATIONS)}")
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
    logits for the choice only), or sigmoid scores plus ``score_correction_bias`` for both the choice
    and the normalised weights (latent), times ``moe_routed_scaling_factor`` there; group-limited
    choice (latent only) scores a group by the sum of its scores.
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
    if bias is not None and bool((bias != 0).any()):
        raise ValueError(f"a nonzero {bias_key} (it shifts the file's {'scores and weights' if latent else 'logits'}"
                         f", while seqblocks' expert_bias shifts the scores for the choice only); not convertible")
    out = {"router.weight": params.pop("router.weight", None), "expert_bias": torch.zeros(ffn.n_experts)}
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
            renormalisation, scaling, groups), a nonzero selection bias, expert biases.
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
