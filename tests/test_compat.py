"""Checkpoint folders in other training code's layouts load into seqblocks models with the same outputs."""

from __future__ import annotations

import collections
import functools
import json

import pytest
import safetensors.torch
import torch
from torch.testing import assert_close

from seqblocks import BlockConfig, LanguageModel, LanguageModelConfig, LRNNLMHeadModel
from seqblocks.compat import load_backbone_checkpoint, load_mlx_checkpoint
from seqblocks.layers.mixers.rglru import RGLRU
from seqblocks.layers.mixers.s4d import S4D
from seqblocks.layers.mixers.s5 import S5
from seqblocks.layers.mixers.s7 import S7
from seqblocks.testing import check_causality, check_prefill_then_steps

KW = dict(d_model=16, d_state=4, n_layer=2, vocab_size=40, mixer_types=["attn", "Mamba"], d_intermediate=32)
HEADS = {"attn": {"num_heads": 4}}


def _write_backbone_folder(folder, model, config):
    """The folder as that training code writes it: config.json and a torch.save'd state dict."""
    folder.mkdir()
    state = collections.OrderedDict()
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            state[key] = value
            continue
        key = "backbone." + key
        if key.endswith("mixer.conv_weight"):
            key, value = key.replace("conv_weight", "conv1d.weight"), value.unsqueeze(1)  # [E, 1, W]
        elif key.endswith("mixer.conv_bias"):
            key = key.replace("conv_bias", "conv1d.bias")
        state[key] = value.clone()
    mamba = [k for k in state if k.endswith("mixer.dt_proj.bias")][0]
    state[mamba.replace("dt_proj", "dtA_proj")] = torch.zeros_like(state[mamba])
    state[mamba.replace("dt_proj.bias", "dtA_proj.weight")] = torch.zeros(state[mamba].shape[0], 1)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config))


def test_backbone_folder_loads_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = LRNNLMHeadModel(**KW, mixer_kwargs=HEADS).eval()
    config = {**KW, "norm_epsilon": 1e-5, "rms_norm": True, "fused_add_norm": True, "residual_in_fp32": False,
              "tie_embeddings": True, "pad_vocab_size_multiple": 8}
    _write_backbone_folder(tmp_path / "ckpt", model, config)
    with pytest.warns(UserWarning, match="dtA_proj"):
        loaded = load_backbone_checkpoint(tmp_path / "ckpt", mixer_kwargs=HEADS)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="num_heads"):
        load_backbone_checkpoint(tmp_path / "ckpt")


def test_backbone_folder_errors(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**KW, "mixer_types": ["S5", "attn"]}))
    with pytest.raises(ValueError, match="S5"):
        load_backbone_checkpoint(folder, mixer_kwargs=HEADS)
    (folder / "config.json").write_text(json.dumps(KW))
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_backbone_checkpoint(folder, mixer_kwargs=HEADS)
    torch.save({"weights": collections.Counter(a=1)}, folder / "pytorch_model.bin")  # not tensors only
    with pytest.raises(ValueError, match="tensors"):
        load_backbone_checkpoint(folder, mixer_kwargs=HEADS)
    torch.save({"backbone.embedding.weight": torch.zeros(40, 16)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing"):
        load_backbone_checkpoint(folder, mixer_kwargs=HEADS)


def _mlx_keys(model: LanguageModel, config: LanguageModelConfig) -> dict[str, torch.Tensor]:
    """The model's weights under the MLX trainer's names (separate q / k / v, gate / up)."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "embedding.weight":
            out["embed.weight"] = value
        elif key == "lm_head.weight":
            if not config.tie_embeddings:
                out["head.weight"] = value
        elif key.startswith("norm_f."):
            out[key.replace("norm_f.", "final_norm.")] = value
        else:
            i, rest = key.split(".", 2)[1:]
            block = config.blocks[int(i)]
            if rest.startswith("attention.in_proj."):
                kv = (block.n_kv_heads or block.n_heads) * block.effective_head_dim
                q, k, v = value.split((block.n_heads * block.effective_head_dim, kv, kv), 0)
                for name, part in zip("qkv", (q, k, v), strict=True):
                    out[f"blocks.{i}.attention.{name}_proj.{rest.rsplit('.', 1)[1]}"] = part
            elif rest.startswith("attention.out_proj."):
                out[f"blocks.{i}.{rest.replace('out_proj', 'o_proj')}"] = value
            elif rest.startswith("ffn.gate_up."):
                gate, up = value.chunk(2, 0)
                out[f"blocks.{i}.ffn.gate.{rest.rsplit('.', 1)[1]}"] = gate
                out[f"blocks.{i}.ffn.up.{rest.rsplit('.', 1)[1]}"] = up
            else:
                out[f"blocks.{i}.{rest}"] = value
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("tie", [True, False])
def test_mlx_folder_loads_with_the_same_logits(tmp_path, tie):
    block = BlockConfig(attention="gqa", ffn="gated", norm="rms_norm", position="rope", d_model=16, n_heads=4,
                        n_kv_heads=2, d_ff=32, bias=False)
    std = BlockConfig(attention="mha", ffn="standard", norm="layer_norm", position="rope", d_model=16, n_heads=4,
                      d_ff=32)
    config = LanguageModelConfig(vocab_size=40, blocks=[block, std], tie_embeddings=tie)
    torch.manual_seed(0)
    model = LanguageModel(config).eval()
    safetensors.torch.save_file(_mlx_keys(model, config), str(tmp_path / "model.safetensors"))
    (tmp_path / "metadata.json").write_text(json.dumps({"step": 7}))
    loaded = load_mlx_checkpoint(tmp_path, config)
    assert loaded.checkpoint_metadata == {"step": 7}
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits)
    wrong = LanguageModelConfig(vocab_size=40, blocks=[block, block], tie_embeddings=tie)
    with pytest.raises(ValueError, match="do not fit|lacks"):
        load_mlx_checkpoint(tmp_path, wrong)


# ---------------------------------------------------------------- the linear-RNN mixers of a backbone folder
#
# Each mixer's tensors are drawn at random under the folder's names and shapes, and its function is
# computed by a small sequential re-implementation of that code's math (``_REF``), written from its
# source: the loaded seqblocks mixer must give the same outputs.

H, N, M, E_CONV = 8, 4, 3, 4
F = torch.nn.functional


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def _file_params(kind: str, mode: str = "neck") -> dict[str, torch.Tensor]:
    if kind == "LRU":
        return {"nu_log": _randn(N, scale=0.5) - 1.0, "theta_log": _randn(N, scale=0.5), "B_re": _randn(N, H),
                "B_im": _randn(N, H), "C_re": _randn(H, N), "C_im": _randn(H, N), "D": _randn(H),
                "gamma_log": _randn(N, scale=0.1) - 0.5}
    if kind == "S5":
        return {"A": torch.stack((_randn(N), _randn(N, scale=3.0)), -1), "B": _randn(N, H),
                "log_dt": torch.linspace(-5, -1, N, dtype=torch.float64), "C": _randn(H, N, 2), "D": _randn(H, H)}
    if kind == "Centaurus":
        n = {"neck": N, "pointwise": N, "dws": H, "full": H * H}[mode]
        A = torch.complex(-0.1 - torch.rand(n, M, dtype=torch.float64), _randn(n, M))
        out = {"A": A, "E": _randn(n, M), "log_delta": torch.linspace(-3, -0.5, n, dtype=torch.float64)}
        out["B"], out["C"] = {"neck": (_randn(N, H), _randn(H, N)), "pointwise": (_randn(N * M, H), _randn(H, N * M)),
                              "dws": (_randn(H), _randn(H)), "full": (_randn(n), _randn(n))}[mode]
        if mode == "pointwise":
            del out["E"]
        return out
    if kind == "RGLRU":
        return {"gate_proj.weight": _randn(H, H, scale=0.3), "in_proj.weight": _randn(H, H, scale=0.3),
                "conv1d.weight": _randn(H, 1, E_CONV, scale=0.5), "conv1d.bias": _randn(H, scale=0.1),
                "recurrent_gate_proj.weight": _randn(H, H, scale=0.3), "recurrent_gate_proj.bias": _randn(H),
                "input_gate_proj.weight": _randn(H, H, scale=0.3), "input_gate_proj.bias": _randn(H),
                "a_log": _randn(H, 1), "out_proj.weight": _randn(H, H, scale=0.3)}
    if kind == "S7":
        return {"in_proj.weight": _randn(H, H, scale=0.3), "base_params": _randn(N) + 1.0,
                "x_proj.weight": _randn(N + 2 * H * N + H + N, H, scale=0.1),
                "gate_proj.weight": _randn(H, H, scale=0.3)}
    if kind == "S4D":
        n, n_ssm = N // 2, {"zoh": H, "bilinear": 2}[mode]
        out = {"A_real": _randn(n_ssm, n, scale=0.5) - 1.0, "A_imag": _randn(n_ssm, n, scale=2.0),
               "B": _randn(1, n_ssm, n, 2), "C": _randn(1, H, n, 2), "inv_dt": torch.linspace(-4, -1, H).double(),
               "D": _randn(1, H), "output_linear.0.weight": _randn(H, H, scale=0.3), "output_linear.0.bias": _randn(H)}
        # The convolution's kernel module holds the same parameters under its own names.
        out.update({f"layer.kernel.{k}": out[k] for k in ("A_real", "A_imag", "B", "C", "inv_dt")})
        return out
    raise AssertionError(kind)


def _ref_s4d(p, u, disc="zoh", **_):
    # A = -exp(A_real) - i A_imag repeated over H (h -> h mod n_ssm); kernel 2 Re sum_n (B C γ)_n λ_n^l;
    # y = K * u + D u, then GELU twice and the output map Linear -> GELU.
    rep = H // p["A_real"].shape[0]
    A = torch.complex(-torch.exp(p["A_real"]), -p["A_imag"]).repeat(rep, 1)
    B = torch.view_as_complex(p["B"].contiguous())[0].repeat(rep, 1)
    C = torch.view_as_complex(p["C"].contiguous())[0]
    dtA = torch.exp(p["inv_dt"])[:, None] * A
    if disc == "zoh":
        Cp, lam = B * C * (torch.exp(dtA) - 1) / A, torch.exp(dtA)
    else:
        Cp, lam = B * C * torch.exp(p["inv_dt"])[:, None] / (1 - dtA / 2), (1 + dtA / 2) / (1 - dtA / 2)
    T = u.shape[1]
    K = 2 * (Cp[..., None] * lam[..., None] ** torch.arange(T)).sum(1).real  # [H, T]
    y = torch.stack([sum(K[:, l] * u[:, t - l] for l in range(t + 1)) for t in range(T)], 1) + u * p["D"][0]
    y = F.gelu(F.gelu(y))
    return F.gelu(y @ p["output_linear.0.weight"].T + p["output_linear.0.bias"])


def _ref_lru(p, u, **_):
    lam = torch.exp(torch.complex(-torch.exp(p["nu_log"]), torch.exp(p["theta_log"])))
    B = torch.complex(p["B_re"], p["B_im"]) * torch.exp(p["gamma_log"])[:, None]
    C = torch.complex(p["C_re"], p["C_im"])
    h, ys = torch.zeros(u.shape[0], N, dtype=torch.complex128), []
    for t in range(u.shape[1]):
        h = lam * h + u[:, t].to(B.dtype) @ B.T
        ys.append((h @ C.T).real + u[:, t] * p["D"])
    return torch.stack(ys, 1)


def _ref_s5(p, u, discretization="zoh", **_):
    A = torch.complex(-F.softplus(p["A"][:, 0]), p["A"][:, 1])
    dt = torch.exp(p["log_dt"])
    if discretization == "no_discretization":
        A_bar, gamma = A, torch.ones_like(A)
    else:
        A_bar = torch.exp(dt * A)
        gamma = (A_bar - 1) / A if discretization == "zoh" else torch.ones_like(A)
    B = gamma[:, None] * p["B"]
    C = torch.complex(p["C"][..., 0], p["C"][..., 1])
    h, ys = torch.zeros(u.shape[0], N, dtype=torch.complex128), []
    for t in range(u.shape[1]):
        h = A_bar * h + u[:, t].to(B.dtype) @ B.T
        ys.append((h @ C.T).real + u[:, t] @ p["D"])
    return torch.stack(ys, 1)


def _ref_centaurus(p, u, mode="neck", **_):
    # B_eff = Δ B (dense, diagonal or one scalar per (out, in) channel), Ā = exp(Δ A); the state is
    # [N, M] complex (pointwise: N * M lanes without E), read out through E then C.
    delta = torch.exp(p["log_delta"])
    A_bar = torch.exp(delta[:, None] * p["A"])
    n = A_bar.shape[0]
    if mode == "neck":
        Bm, Cm = p["B"], p["C"]
    elif mode == "dws":
        Bm, Cm = torch.diag(p["B"]), torch.diag(p["C"])
    elif mode == "full":
        Bm = torch.zeros(n, H, dtype=torch.float64).scatter_(1, (torch.arange(n) % H)[:, None], p["B"][:, None])
        Cm = torch.zeros(H, n, dtype=torch.float64).scatter_(0, (torch.arange(n) // H)[None], p["C"][None])
    else:
        Bm, Cm = p["B"], p["C"]
    if mode == "pointwise":
        A_bar, Bm = A_bar.reshape(-1), delta.repeat_interleave(M)[:, None] * Bm
    else:
        Bm = delta[:, None] * Bm
    h, ys = torch.zeros(u.shape[0], *A_bar.shape, dtype=torch.complex128), []
    for t in range(u.shape[1]):
        s = u[:, t] @ Bm.T
        h = A_bar * h + (s if mode == "pointwise" else s[..., None])
        w = h.real if mode == "pointwise" else (h.real * p["E"]).sum(-1)
        ys.append(w @ Cm.T)
    return torch.stack(ys, 1)


def _ref_rglru(p, u, c=8.0, **_):
    gate = F.gelu(u @ p["gate_proj.weight"].T)
    x = (u @ p["in_proj.weight"].T).transpose(1, 2)
    x = F.conv1d(x, p["conv1d.weight"], p["conv1d.bias"], padding=E_CONV - 1, groups=H)[..., :u.shape[1]]
    x = x.transpose(1, 2)
    r = torch.sigmoid(x @ p["recurrent_gate_proj.weight"].T + p["recurrent_gate_proj.bias"])
    i = torch.sigmoid(x @ p["input_gate_proj.weight"].T + p["input_gate_proj.bias"])
    a_bar = torch.exp(c * r * torch.log(torch.sigmoid(p["a_log"][:, 0])))
    v = torch.sqrt(1 - a_bar * a_bar) * (i * x)
    h, hs = torch.zeros(u.shape[0], H, dtype=torch.float64), []
    for t in range(u.shape[1]):
        h = a_bar[:, t] * h + v[:, t]
        hs.append(h)
    return (gate * torch.stack(hs, 1)) @ p["out_proj.weight"].T


def _ref_s7(p, u, **_):
    x = u @ p["in_proj.weight"].T
    A, B, C, D, bias = (x @ p["x_proj.weight"].T).split([N, H * N, H * N, H, N], -1)
    A = A + p["base_params"]
    B = B.unflatten(-1, (H, N)).transpose(-1, -2)  # "(h n) -> n h"
    C = C.unflatten(-1, (H, N))
    A_bar = 1 - 1 / (A * A + 0.5)
    h, ys = torch.zeros(u.shape[0], N, dtype=torch.float64), []
    for t in range(u.shape[1]):
        h = A_bar[:, t] * h + torch.einsum("bnh,bh->bn", B[:, t], x[:, t]) + bias[:, t]
        ys.append(torch.einsum("bhn,bn->bh", C[:, t], h) + D[:, t] * x[:, t])
    y = torch.stack(ys, 1)
    return torch.sigmoid(F.gelu(y) @ p["gate_proj.weight"].T) * y + u


_REF = {"S4D": _ref_s4d, "LRU": _ref_lru, "S5": _ref_s5, "Centaurus": _ref_centaurus, "RGLRU": _ref_rglru,
        "S7": _ref_s7}

CASES = [("LRU", {}), ("S5", {"discretization": "zoh"}), ("S5", {"discretization": "dirac"}),
         ("S5", {"discretization": "no_discretization"}), ("Centaurus", {"sub_state_dim": M, "mode": "neck"}),
         ("Centaurus", {"sub_state_dim": M, "mode": "pointwise"}), ("Centaurus", {"sub_state_dim": M, "mode": "dws"}),
         ("Centaurus", {"sub_state_dim": M, "mode": "full"}), ("RGLRU", {"d_conv": E_CONV}), ("S7", {}),
         ("S4D", {"transposed": False}),
         ("S4D", {"transposed": False, "disc": "bilinear", "n_ssm": 2, "init": "diag-lin", "l_max": None})]


def _lrnn_folder(folder, kind, kwargs, d_state=N):
    """A two-layer folder (``kind`` then attention) in the backbone layout, with random mixer tensors."""
    torch.manual_seed(0)
    kw = {**KW, "d_model": H, "d_state": d_state, "mixer_types": [kind, "attn"]}
    # The embedding, norms, MLPs and attention come from a seqblocks model (their names carry over).
    mixer_kwargs = {"attn": {"num_heads": 2}, **({"Centaurus": {"sub_state_dim": M, "mode": kwargs.get("mode")}}
                                                 if kind == "Centaurus" else {})}
    base = LRNNLMHeadModel(**kw, mixer_kwargs=mixer_kwargs)
    folder.mkdir()
    state = {("backbone." + k if k != "lm_head.weight" else k): v.clone() for k, v in base.state_dict().items()
             if ".mixer." not in k or k.startswith("layers.1.")}
    params = _file_params(kind, kwargs.get("mode", kwargs.get("disc", "zoh") if kind == "S4D" else "neck"))
    state.update({f"backbone.layers.0.mixer.{k}": v.float() if not v.is_complex() else v.to(torch.complex64)
                  for k, v in params.items()})
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({**kw, "d_intermediate": 32}))
    return params, {"attn": {"num_heads": 2}, kind: dict(kwargs)}


@pytest.mark.parametrize("kind, kwargs", CASES, ids=[f"{k}-{'-'.join(map(str, v.values()))}" for k, v in CASES])
def test_lrnn_mixers_load_with_the_same_function(tmp_path, kind, kwargs):
    d_state = H * H if kwargs.get("mode") == "full" else (H if kwargs.get("mode") == "dws" else N)
    params, mixer_kwargs = _lrnn_folder(tmp_path / "ckpt", kind, kwargs, d_state)
    model = load_backbone_checkpoint(tmp_path / "ckpt", mixer_kwargs=mixer_kwargs, dtype=torch.float64)
    mixer = model.layers[0].mixer
    u = torch.randn(2, 7, H, dtype=torch.float64)
    params = {k: (v.float().double() if not v.is_complex() else v.to(torch.complex64).to(torch.complex128))
              for k, v in params.items()}  # the values as stored
    with torch.no_grad():
        assert_close(mixer(u), _REF[kind](params, u, **kwargs), rtol=1e-9, atol=1e-9)
        # In the whole model: the same logits as with the reference computing that layer.
        ids = torch.randint(0, 40, (2, 6))
        logits = model(ids).logits
        calls = []

        def reference_forward(x, *_args, **_kwargs):
            calls.append(x.shape)
            return _REF[kind](params, x, **kwargs)

        mixer.forward = reference_forward
        assert_close(model(ids).logits, logits, rtol=1e-9, atol=1e-9)
        assert calls, "the reference layer was not used"
        del mixer.forward
    # The forced options are in the model's config: rebuilding from it takes the same weights.
    LRNNLMHeadModel.from_config(model.config, dtype=torch.float64).load_state_dict(model.state_dict())
    # Decoding the loaded layer (prefill, then one token at a time) gives the same outputs.
    check_prefill_then_steps(mixer, u, prefill=3, atol=1e-9)
    check_causality(mixer, u, t=3, atol=1e-12)


def test_mixer_options_the_loader_uses():
    torch.manual_seed(0)
    x = torch.randn(2, 6, H, dtype=torch.float64)
    # S5's full D: a diagonal full D is the per-channel D.
    full = S5(H, N, full_D=True).double()
    diag = S5(H, N).double()
    diag.load_state_dict({**full.state_dict(), "D": torch.arange(H, dtype=torch.float64)})
    with torch.no_grad():
        full.D.copy_(torch.diag(torch.arange(H, dtype=torch.float64)))
        assert_close(full(x), diag(x))
    assert full.D.shape == (H, H)
    # S4D's double activation and Linear -> GELU output map.
    twice = S4D(H, N, activation="gelu", double_activation=True, final_act="gelu").double()
    once = S4D(H, N, activation="gelu", final_act="gelu").double()
    once.load_state_dict(twice.state_dict())
    with torch.no_grad():
        lin = twice.output_linear[0]
        assert lin.weight.shape == (H, H)
        once.output_linear, once.activation = torch.nn.Identity(), torch.nn.Identity()  # the bare SSM output
        assert_close(twice(x), F.gelu(lin(F.gelu(F.gelu(once(x))))))
    with pytest.raises(TypeError, match="double_activation"):
        S4D(H, N, double_activation="yes")
    # S7's input residual adds the input to the output.
    s7 = S7(H, N, input_residual=True).double()
    plain = S7(H, N).double()
    plain.load_state_dict(s7.state_dict())
    with torch.no_grad():
        assert_close(s7(x), plain(x) + x)
    with pytest.raises(TypeError, match="input_residual"):
        S7(H, N, input_residual=1)
    # RG-LRU's exact GeLU gate differs from the tanh form, and only those two are accepted.
    exact, tanh = RGLRU(H, gate_gelu="exact").double(), RGLRU(H).double()
    tanh.load_state_dict(exact.state_dict())
    with torch.no_grad():
        assert not torch.allclose(exact(x), tanh(x))
    check_prefill_then_steps(exact, x, prefill=2, atol=1e-10)
    with pytest.raises(ValueError, match="gate_gelu"):
        RGLRU(H, gate_gelu="erf")


def test_lrnn_folder_errors(tmp_path):
    _lrnn_folder(tmp_path / "s5", "S5", {})
    with pytest.raises(ValueError, match="discretization"):
        load_backbone_checkpoint(tmp_path / "s5", mixer_kwargs={"attn": {"num_heads": 2}})
    with pytest.raises(ValueError, match="'euler'"):
        load_backbone_checkpoint(tmp_path / "s5", mixer_kwargs={"attn": {"num_heads": 2},
                                                                "S5": {"discretization": "euler"}})
    with pytest.raises(TypeError, match="non-dict values"):
        load_backbone_checkpoint(tmp_path / "s5", mixer_kwargs={"attn": {"num_heads": 2}, "discretization": "zoh"})
    folder = tmp_path / "cent"
    _lrnn_folder(folder, "Centaurus", {"sub_state_dim": M, "mode": "neck"})
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    A = state["backbone.layers.0.mixer.A"]
    state["backbone.layers.0.mixer.A"] = torch.complex(A.real.abs(), A.imag)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="real part >= 0"):
        load_backbone_checkpoint(folder, mixer_kwargs={"attn": {"num_heads": 2},
                                                       "Centaurus": {"sub_state_dim": M, "mode": "neck"}})
    (folder / "config.json").write_text(json.dumps({**KW, "mixer_types": ["S4", "attn"]}))
    with pytest.raises(ValueError, match="S4 layers default to transposed=True"):
        load_backbone_checkpoint(folder, mixer_kwargs=HEADS)
    (folder / "config.json").write_text(json.dumps({**KW, "mixer_types": ["S4D", "attn"]}))
    with pytest.raises(ValueError, match="transposed=True"):
        load_backbone_checkpoint(folder, mixer_kwargs=HEADS)
    with pytest.raises(ValueError, match="gate=2 with channels=2"):
        load_backbone_checkpoint(folder, mixer_kwargs={**HEADS, "S4D": {"transposed": False, "channels": 2,
                                                                        "gate": 2}})
    with pytest.raises(ValueError, match="bottleneck=2"):
        load_backbone_checkpoint(folder, mixer_kwargs={**HEADS, "S4D": {"transposed": False, "bottleneck": 2}})
    with pytest.raises(ValueError, match="unknown S4D arguments \\['colour'\\]"):
        load_backbone_checkpoint(folder, mixer_kwargs={**HEADS, "S4D": {"transposed": False, "colour": 1}})


# ---------------------------------------------------------------- MoE FFNs of an MLX folder

D_MOE, F_MOE, E_MOE, L_MOE = 16, 12, 4, 6


def _mlx_moe_tensors(ffn: str, n_shared: int) -> dict[str, torch.Tensor]:
    """One block's MoE FFN under the MLX trainer's names: one module per expert, a list of shared experts."""
    g = torch.Generator().manual_seed(1)

    def w(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / shape[-1] ** 0.5

    out = {"router.weight": w(E_MOE, D_MOE)}
    if ffn == "latent_moe":
        out.update({"down_proj.weight": w(L_MOE, D_MOE), "up_proj.weight": w(D_MOE, L_MOE),
                    "score_correction_bias": torch.zeros(E_MOE, dtype=torch.float64),
                    "shared_expert.up.weight": w(F_MOE, D_MOE), "shared_expert.down.weight": w(D_MOE, F_MOE)})
        for e in range(E_MOE):
            out.update({f"experts.{e}.up.weight": w(F_MOE, L_MOE), f"experts.{e}.down.weight": w(L_MOE, F_MOE)})
        return out
    experts = [f"experts.{e}" for e in range(E_MOE)] + [f"shared_experts.{j}" for j in range(n_shared)]
    for name in experts:
        out.update({f"{name}.gate.weight": w(F_MOE, D_MOE), f"{name}.up.weight": w(F_MOE, D_MOE),
                    f"{name}.down.weight": w(D_MOE, F_MOE)})
    if ffn == "shared_moe":
        out["expert_bias"] = torch.zeros(E_MOE, dtype=torch.float64)
    return out


def _ref_mlx_moe(p, x, ffn, top_k, scaling=1.0, n_groups=1, topk_groups=1):
    """The MLX trainer's MoE forward, rewritten in torch (one token row at a time is not needed: masks)."""
    logits = x @ p["router.weight"].T
    if ffn == "latent_moe":
        scores = torch.sigmoid(logits) + p["score_correction_bias"]
        select = scores
        if n_groups > 1:
            grouped = scores.unflatten(-1, (n_groups, -1)).sum(-1)
            keep = grouped.topk(topk_groups, -1).indices
            mask = torch.zeros_like(grouped).scatter_(-1, keep, 1.0).repeat_interleave(E_MOE // n_groups, -1)
            select = torch.where(mask > 0, scores, torch.full_like(scores, -1e9))
        idx = select.topk(top_k, -1).indices
        top = scores.gather(-1, idx)
        weights = top / (top.sum(-1, keepdim=True) + 1e-20)
    else:
        idx = (logits + p.get("expert_bias", 0.0)).topk(top_k, -1).indices
        weights = logits.gather(-1, idx).softmax(-1)

    def expert(name, h):
        if ffn == "latent_moe":
            return F.relu(h @ p[f"{name}.up.weight"].T).square() @ p[f"{name}.down.weight"].T
        return (F.silu(h @ p[f"{name}.gate.weight"].T) * (h @ p[f"{name}.up.weight"].T)) @ p[f"{name}.down.weight"].T

    h = x @ p["down_proj.weight"].T if ffn == "latent_moe" else x
    routed = torch.zeros_like(x)
    for k in range(top_k):
        for e in range(E_MOE):
            out = expert(f"experts.{e}", h)
            out = out @ p["up_proj.weight"].T if ffn == "latent_moe" else out
            routed = routed + out * weights[..., k:k + 1] * (idx[..., k] == e)[..., None]
    if ffn == "latent_moe":
        return routed * scaling + expert("shared_expert", x)
    shared = [k.split(".")[1] for k in p if k.startswith("shared_experts.") and k.endswith(".gate.weight")]
    return routed + sum((expert(f"shared_experts.{j}", x) for j in shared), torch.zeros_like(x))


MOE_CASES = [("moe", {}), ("shared_moe", {"n_shared_experts": 2}),
             ("latent_moe", {"moe_routed_scaling_factor": 2.5, "moe_n_groups": 2, "moe_topk_groups": 1}),
             # Nonzero selection biases: lmxlab adds expert_bias to the logits (choice only) and
             # score_correction_bias to the sigmoid scores (choice and weights).
             ("shared_moe", {"n_shared_experts": 1, "moe_bias_mode": "logits"}),
             ("latent_moe", {"moe_routed_scaling_factor": 2.5, "moe_n_groups": 2, "moe_topk_groups": 1,
                             "moe_bias_mode": "corrected"})]
MOE_BIASES = {"shared_moe": ("expert_bias", [1.5, -1.0, 0.5, -0.25]),
              "latent_moe": ("score_correction_bias", [0.3, -0.2, 0.1, 0.25])}


@pytest.mark.parametrize("ffn, extra", MOE_CASES, ids=[f"{c[0]}-{c[1].get('moe_bias_mode', 'no_bias')}"
                                                       for c in MOE_CASES])
def test_mlx_moe_ffns_load_with_the_same_function(tmp_path, ffn, extra):
    kw = dict(attention="gqa", norm="rms_norm", position="rope", d_model=D_MOE, n_heads=4, n_kv_heads=2,
              d_ff=F_MOE, bias=False)
    moe = BlockConfig(**kw, ffn=ffn, n_experts=E_MOE, top_k_experts=2,
                      **({"moe_latent_size": L_MOE} if ffn == "latent_moe" else {}), **extra)
    config = LanguageModelConfig(vocab_size=40, blocks=[BlockConfig(**kw, ffn="gated"), moe], tie_embeddings=True)
    torch.manual_seed(0)
    model = LanguageModel(config).eval()
    keys = {k: v for k, v in _mlx_keys(model, config).items() if not k.startswith("blocks.1.ffn.")}
    params = _mlx_moe_tensors(ffn, extra.get("n_shared_experts", 0))
    biased = "moe_bias_mode" in extra
    if biased:
        name, values = MOE_BIASES[ffn]
        params[name] = torch.tensor(values, dtype=torch.float64)
    keys.update({f"blocks.1.ffn.{k}": v.float().contiguous() for k, v in params.items()})
    safetensors.torch.save_file(keys, str(tmp_path / "model.safetensors"))
    loaded = load_mlx_checkpoint(tmp_path, config, dtype=torch.float64)
    params = {k: v.float().double() for k, v in params.items()}  # the values as stored
    x = torch.randn(2, 9, D_MOE, dtype=torch.float64)
    ref = functools.partial(_ref_mlx_moe, ffn=ffn, top_k=2, scaling=extra.get("moe_routed_scaling_factor", 1.0),
                            n_groups=extra.get("moe_n_groups", 1), topk_groups=extra.get("moe_topk_groups", 1))
    with torch.no_grad():
        assert_close(loaded.layers[1].ffn(x), ref(params, x), rtol=1e-9, atol=1e-9)
        ids = torch.randint(0, 40, (2, 9))
        logits = loaded(ids).logits
        loaded.layers[1].ffn.forward = lambda h, *_a, **_k: ref(params, h)
        assert_close(loaded(ids).logits, logits, rtol=1e-9, atol=1e-9)
        del loaded.layers[1].ffn.forward
        if biased:  # the bias matters: without it the same weights route otherwise
            assert_close(loaded.layers[1].ffn.forward_dense(x), ref(params, x), rtol=1e-9, atol=1e-9)
            loaded.layers[1].ffn.expert_bias.zero_()
            assert not torch.allclose(loaded.layers[1].ffn(x), ref(params, x), rtol=1e-6, atol=1e-6)


def test_mlx_moe_errors(tmp_path):
    kw = dict(attention="mha", norm="rms_norm", position="rope", d_model=D_MOE, n_heads=4, d_ff=F_MOE, bias=False)
    config = LanguageModelConfig(vocab_size=40, blocks=[BlockConfig(**kw, ffn="shared_moe", n_experts=E_MOE,
                                                                    top_k_experts=2)])
    model = LanguageModel(config).eval()
    keys = {k: v for k, v in _mlx_keys(model, config).items() if not k.startswith("blocks.0.ffn.")}
    params = _mlx_moe_tensors("shared_moe", 1)
    params["expert_bias"] = torch.arange(E_MOE, dtype=torch.float64)
    keys.update({f"blocks.0.ffn.{k}": v.float().contiguous() for k, v in params.items()})
    safetensors.torch.save_file(keys, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="block 0: a nonzero expert_bias.*moe_bias_mode='logits'.*'scores'"):
        load_mlx_checkpoint(tmp_path, config)
    corrected = LanguageModelConfig(vocab_size=40, blocks=[BlockConfig(**kw, ffn="shared_moe", n_experts=E_MOE,
                                                                       top_k_experts=2, moe_bias_mode="corrected")])
    with pytest.raises(ValueError, match="moe_bias_mode='corrected'"):
        load_mlx_checkpoint(tmp_path, corrected)
    sigmoid = LanguageModelConfig(vocab_size=40, blocks=[BlockConfig(**kw, ffn="shared_moe", n_experts=E_MOE,
                                                                     top_k_experts=2, moe_router="sigmoid")])
    with pytest.raises(ValueError, match="moe_router='sigmoid'"):
        load_mlx_checkpoint(tmp_path, sigmoid)
