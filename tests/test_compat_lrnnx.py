"""lrnnx checkpoint folders with S4 (DPLR), the wider S4D options (l_max, channels, gate, per-state steps,
is_real) and S5's bilinear / async discretizations load into seqblocks models with the same outputs.

Each folder's layer-0 tensors are drawn at random under lrnnx's names and shapes (``lrnnx/models/lti/s4.py``,
``s4d.py``, ``s5.py`` and ``lrnnx/ops/s4_utils.py`` / ``s4_kernel_interface.py``), and the layer's function
is computed by small re-implementations of that code's math written here: S4's kernel as lrnnx computes
it (the Cauchy sums at the roots of unity of its kernel length, the Woodbury correction, the bilinear
factor, an inverse FFT), S4D's Vandermonde kernel, the direct causal sum, GELUs, gates and output maps.
The loaded seqblocks mixer must give the same outputs, in the model too, and decode step by step alike.

Shapes: B batch, T time, H model width, n stored states (half of each conjugate pair), c channels.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from seqblocks import LRNNLMHeadModel
from seqblocks.compat import load_backbone_checkpoint
from seqblocks.testing import check_causality, check_prefill_then_steps

F = torch.nn.functional
H, T, VOCAB = 6, 7, 40
HEADS = {"attn": {"num_heads": 2}}
POS = {"none": lambda p: p, "exp": torch.exp, "softplus": F.softplus, "sigmoid": torch.sigmoid,
       "relu": lambda p: torch.relu(p) + 1e-4}


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


# ---------------------------------------------------------------- the file's tensors


def _s4_family_params(kind: str, kw: dict, d_state: int, l_kernel: int = 0) -> dict[str, torch.Tensor]:
    """One lrnnx S4 / S4D layer's state dict (names and shapes as its code registers them)."""
    n, c, g = d_state // 2, kw.get("channels", 1), kw.get("gate")
    n_ssm = kw.get("n_ssm", H)
    real = kw.get("is_real", False)
    pair = () if real else (2,)
    out = {"A_real": _randn(n_ssm, n, scale=0.3) - 0.7, "B": _randn(1, n_ssm, n, *pair),
           "C": _randn(c, H, n, *pair, scale=0.5), "D": _randn(c, H)}
    if not real:
        out["A_imag"] = _randn(n_ssm, n, scale=2.0)
    # Steps log-uniform in [1e-3, 0.1], stored as lrnnx's init_dt stores them (its inverse transform, asinh
    # under dt_fast).
    dt = torch.exp(torch.rand(H, n if kw.get("dt_tie", True) is False else 1, dtype=torch.float64) * 4.6 - 6.9)
    inv = {"exp": torch.log, "softplus": lambda d: torch.log(torch.expm1(d)), "sigmoid": torch.logit,
           "relu": lambda d: d, "none": lambda d: d}[kw.get("dt_transform", "exp")](dt)
    out["inv_dt"] = torch.asinh(inv) if kw.get("dt_fast", False) else inv
    if kind == "S4":
        out["P"] = _randn(kw.get("rank", 1), n_ssm, n, 2, scale=0.4)
    width = c * H
    if g is not None:
        out["input_gate.0.weight"], out["input_gate.0.bias"] = _randn(g * H, H, scale=0.4), _randn(g * H, scale=0.1)
        if not (kind == "S4" and c == g):  # lrnnx's S4 uses an identity output gate when channels == gate
            d_in = H if kind == "S4" else c * H
            out["output_gate.weight"], out["output_gate.bias"] = _randn(g * H, d_in, scale=0.4), _randn(g * H)
        width = g * H
    out["output_linear.0.weight"], out["output_linear.0.bias"] = _randn(H, width, scale=0.3), _randn(H, scale=0.1)
    # The kernel module holds the same parameters under its own names (and S4 its kernel length).
    out.update({f"layer.kernel.{k}": out[k] for k in ("A_real", "A_imag", "B", "C", "inv_dt", "P") if k in out})
    if kind == "S4":
        out["layer.kernel.l_kernel"] = torch.tensor(l_kernel)
    return out


def _s5_params(P: int) -> dict[str, torch.Tensor]:
    return {"A": torch.stack((_randn(P, scale=0.5), _randn(P, scale=3.0)), -1), "B": _randn(P, H),
            "log_dt": torch.linspace(-4, -1.5, P, dtype=torch.float64), "C": _randn(H, P, 2), "D": _randn(H, H)}


# ---------------------------------------------------------------- lrnnx's math, re-implemented


def _system(p: dict, kw: dict):
    """(Λ [H, n], B [H, n], C [c, H, n], dt [H, 1] or [H, n], the repeat factor) as lrnnx processes them."""
    rep = H // p["A_real"].shape[0]
    re = -POS[kw.get("real_transform", "exp")](p["A_real"])
    real = kw.get("is_real", False)
    im = torch.zeros_like(re) if real else -POS[kw.get("imag_transform", "none")](p["A_imag"])
    lam = torch.complex(re, im).repeat(rep, 1)

    def cplx(t):
        return t.to(torch.complex128) if real else torch.view_as_complex(t.contiguous())

    B, C = cplx(p["B"])[0].repeat(rep, 1), cplx(p["C"])
    inv_dt = torch.sinh(p["inv_dt"]) if kw.get("dt_fast", False) else p["inv_dt"]
    return lam, B, C, POS[kw.get("dt_transform", "exp")](inv_dt), rep


def _s4d_kernel(p: dict, kw: dict, L: int) -> torch.Tensor:
    """lrnnx's S4DKernel: K [c, H, L] = 2 Re sum_n (B C) B̄-factor λ^l."""
    lam, B, C, dt, _ = _system(p, kw)
    dtA = dt * lam
    if kw.get("disc", "zoh") == "zoh":
        w, log_lam = B * C * (torch.exp(dtA) - 1) / lam, dtA
    else:
        w, log_lam = B * C * dt / (1 - dtA / 2), torch.log((1 + dtA / 2) / (1 - dtA / 2))
    powers = torch.exp(log_lam[..., None] * torch.arange(L, dtype=torch.float64))  # [H, n, L]
    return 2 * torch.einsum("chn,hnl->chl", w, powers).real


def _dense_bilinear(lam, P, B, dt):
    """The dense bilinear system of A = Λ - P P^* (conjugate-completed), x' = Δ A x + Δ B u with Δ diagonal."""
    full = lambda t: torch.cat((t, t.conj()), -1)  # noqa: E731
    Pf = full(P)  # [H, r, N]
    A = torch.diag_embed(full(lam)) - torch.einsum("hri,hrj->hij", Pf, Pf.conj())
    N = A.shape[-1]
    delta = full(dt.expand(-1, N // 2).to(A.dtype))  # [H, N]
    left = torch.eye(N, dtype=A.dtype) - delta[..., None] * A / 2
    A_bar = torch.linalg.solve(left, torch.eye(N, dtype=A.dtype) + delta[..., None] * A / 2)
    B_bar = torch.linalg.solve(left, (delta * full(B)).unsqueeze(-1)).squeeze(-1)
    return A_bar, B_bar


def _s4_kernel(p: dict, kw: dict, L: int) -> torch.Tensor:
    """lrnnx's S4Kernel at its kernel length M (the file's l_kernel, else l_max, else L): for every channel,
    the Cauchy sums r_ij(z) = sum v_ij / (z - w) over the conjugate-completed states at the M-th roots of
    unity (z = 2 (1 - ω) / (1 + ω), w = Δ Λ, v = row_i col_j Δ for rows [B, P] and columns [C̃, Q = conj P]),
    the Woodbury correction, the bilinear factor 2 / (1 + ω), an inverse real FFT of length M, cut at L."""
    lam, B, Ct, dt, rep = _system(p, kw)
    P = torch.view_as_complex(p["P"].contiguous()).repeat(1, rep, 1)  # [r, H, n]
    M = int(p["layer.kernel.l_kernel"]) or (kw.get("l_max") or L)
    if int(p["layer.kernel.l_kernel"]) == 0:  # a fresh layer: its first forward turns C into C̃ = C (I - Ā^M)
        A_bar, _ = _dense_bilinear(lam, P.transpose(0, 1), B, dt)
        Cf = torch.cat((Ct, Ct.conj()), -1)
        Ct = (Cf - torch.einsum("chi,hij->chj", Cf, torch.linalg.matrix_power(A_bar, M)))[..., : lam.shape[-1]]
    omega = torch.exp(-2j * torch.pi * torch.arange(M // 2 + 1, dtype=torch.float64) / M)
    z = 2 * (1 - omega) / (1 + omega)  # [F]
    w = dt * lam  # [H, n]

    def r(row, col):  # [..., H, n] x [..., H, n] -> [..., H, F]
        v = (row * col * dt)[..., None]
        return (v / (z - w[..., None]) + v.conj() / (z - w.conj()[..., None])).sum(-2)

    Q = P.conj()
    r_bc = r(B, Ct)  # [c, H, F]
    r_bq = r(B, Q)  # [r, H, F]
    r_pc = r(P[:, None], Ct[None])  # [r, c, H, F]
    r_pq = r(P[:, None], Q[None])  # [r (P row), r (Q col), H, F]
    rank = P.shape[0]
    inv = torch.linalg.inv(torch.eye(rank, dtype=z.dtype) + r_pq.permute(2, 3, 0, 1))  # [H, F, r, r]
    corr = torch.einsum("jhf,hfjk,kchf->chf", r_bq, inv, r_pc)
    k_f = (r_bc - corr) * 2 / (1 + omega)
    return torch.fft.irfft(k_f, n=M)[..., :L]


def _ref_s4_family(kind: str, p: dict, u: torch.Tensor, kw: dict) -> torch.Tensor:
    """The lrnnx S4 / S4D layer: y = K * u + D u over c channels ("c h" flattened), GELU; ungated another
    GELU, gated gelu(W_o y * gelu(W_i u)); then Linear and GELU."""
    Tn = u.shape[1]
    L = Tn if kw.get("l_max") is None else min(Tn, kw["l_max"])
    K = (_s4_kernel if kind == "S4" else _s4d_kernel)(p, kw, L)  # [c, H, L]
    ys = []
    for t in range(Tn):
        acc = sum(K[:, :, l] * u[:, None, t - l] for l in range(min(t + 1, L)))  # [B, c, H]
        ys.append(acc + u[:, None, t] * p["D"])
    y = F.gelu(torch.stack(ys, 1).flatten(2))  # [B, T, c * H]
    if kw.get("gate") is not None:
        v = F.gelu(u @ p["input_gate.0.weight"].T + p["input_gate.0.bias"])
        if "output_gate.weight" in p:
            y = y @ p["output_gate.weight"].T + p["output_gate.bias"]
        y = y * v
    y = F.gelu(y)
    return F.gelu(y @ p["output_linear.0.weight"].T + p["output_linear.0.bias"])


def _ref_s5(p: dict, u: torch.Tensor, discretization: str, tau: torch.Tensor | None = None) -> torch.Tensor:
    """lrnnx's LTI S5: Λ = -softplus(A[:, 0]) + i A[:, 1]; its bilinear Ā = (1 - ΔΛ/2) / (1 + ΔΛ/2),
    B̄ = Δ / (1 + ΔΛ/2) B; async Ā_t = exp(Δ τ_t Λ) with B̄ by ZOH over Δ; y = Re(C x) + u D."""
    lam = torch.complex(-F.softplus(p["A"][:, 0]), p["A"][:, 1])
    dt = torch.exp(p["log_dt"])
    C = torch.complex(p["C"][..., 0], p["C"][..., 1])
    h, ys = torch.zeros(u.shape[0], lam.shape[0], dtype=torch.complex128), []
    for t in range(u.shape[1]):
        if discretization == "bilinear":
            A_bar, gamma = (1 - dt * lam / 2) / (1 + dt * lam / 2), dt / (1 + dt * lam / 2)
            A_bar = A_bar.expand(u.shape[0], -1)
        else:
            step = dt if tau is None else dt * tau[:, t : t + 1]
            A_bar, gamma = torch.exp(step * lam), (torch.exp(dt * lam) - 1) / lam
        h = A_bar * h + u[:, t].to(torch.complex128) @ (gamma[:, None] * p["B"]).T
        ys.append((h @ C.T).real + u[:, t] @ p["D"])
    return torch.stack(ys, 1)


# ---------------------------------------------------------------- folders


def _folder(path, kind: str, params: dict[str, torch.Tensor], d_state: int) -> None:
    """A two-layer backbone folder (``kind`` then attention): layer 0's mixer holds ``params``."""
    kw = dict(d_model=H, d_state=d_state, n_layer=2, vocab_size=VOCAB, mixer_types=[kind, "attn"], d_intermediate=12)
    base = LRNNLMHeadModel(**kw, mixer_kwargs=HEADS)  # the embedding, norms, MLPs and attention
    state = {("backbone." + k if k != "lm_head.weight" else k): v.clone() for k, v in base.state_dict().items()
             if not k.startswith("layers.0.mixer.")}
    state.update({f"backbone.layers.0.mixer.{k}": v.float() if v.is_floating_point() else v
                  for k, v in params.items()})
    path.mkdir()
    torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(kw))


def _stored(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float().double() if v.is_floating_point() else v for k, v in params.items()}


def _check_loaded(model, ref, u, ids, atol, **inputs):
    """The mixer and the model agree with the reference; decoding and causality hold."""
    mixer = model.layers[0].mixer
    with torch.no_grad():
        assert_close(mixer(u, **inputs), ref(u, **inputs), rtol=1e-9, atol=atol)
        logits = model(ids, **{k: v[:, : ids.shape[1]] for k, v in inputs.items()}).logits
        calls = []

        def reference_forward(x, *_args, **kwargs):
            calls.append(x.shape)
            return ref(x, **{k: kwargs[k] for k in inputs})

        mixer.forward = reference_forward
        assert_close(model(ids, **{k: v[:, : ids.shape[1]] for k, v in inputs.items()}).logits, logits,
                     rtol=1e-9, atol=atol)
        assert calls, "the reference layer was not used"
        del mixer.forward
    LRNNLMHeadModel.from_config(model.config, dtype=torch.float64).load_state_dict(model.state_dict())
    check_prefill_then_steps(mixer, u, prefill=3, atol=atol, **inputs)
    check_causality(mixer, u, t=3, atol=1e-12, **inputs)


# ---------------------------------------------------------------- S4D

S4D_CASES = [
    {"transposed": False, "l_max": 5},
    {"transposed": False, "channels": 2, "disc": "bilinear"},
    {"transposed": False, "gate": 2},
    {"transposed": False, "channels": 2, "gate": 3, "l_max": 4, "n_ssm": 2, "final_act": "id"},
    {"transposed": False, "dt_tie": False, "real_transform": "softplus", "disc": "bilinear"},
    {"transposed": False, "is_real": True, "dt_transform": "softplus", "postact": "glu", "final_act": None},
]


def _case_id(v) -> str:
    return "-".join(f"{k}={x}" for k, x in v.items() if k != "transposed") if isinstance(v, dict) else f"l_kernel={v}"


@pytest.mark.parametrize("kw", S4D_CASES, ids=_case_id)
def test_s4d_options_load_with_the_same_function(tmp_path, kw):
    params = _s4_family_params("S4D", kw, d_state=4)
    _folder(tmp_path / "ckpt", "S4D", params, d_state=4)
    model = load_backbone_checkpoint(tmp_path / "ckpt", mixer_kwargs={**HEADS, "S4D": kw}, dtype=torch.float64)
    p = _stored(params)
    u = torch.randn(2, T, H, dtype=torch.float64)
    _check_loaded(model, lambda x: _ref_s4_family("S4D", p, x, kw), u, torch.randint(0, VOCAB, (2, 6)), 1e-9)
    mixer = model.layers[0].mixer
    assert mixer.truncate_kernel == (kw.get("l_max") is not None) and mixer.channels == kw.get("channels", 1)


# ---------------------------------------------------------------- S4

S4_CASES = [  # (kwargs, the file's l_kernel)
    ({"transposed": False}, 9),
    ({"transposed": False, "l_max": 5}, 5),
    ({"transposed": False, "rank": 2, "channels": 2, "n_ssm": 2, "dt_tie": False}, 8),
    ({"transposed": False, "gate": 2, "l_max": 6}, 0),
    ({"transposed": False, "channels": 2, "gate": 2, "real_transform": "softplus", "imag_transform": "exp",
      "dt_transform": "softplus", "dt_fast": True}, 7),
    ({"transposed": False, "dt_tie": False, "real_transform": "sigmoid"}, 0),
]


@pytest.mark.parametrize("kw, l_kernel", S4_CASES, ids=_case_id)
def test_s4_loads_with_the_same_function(tmp_path, kw, l_kernel):
    params = _s4_family_params("S4", kw, d_state=4, l_kernel=l_kernel)
    _folder(tmp_path / "ckpt", "S4", params, d_state=4)
    model = load_backbone_checkpoint(tmp_path / "ckpt", mixer_kwargs={**HEADS, "S4": kw}, dtype=torch.float64)
    p = _stored(params)
    u = torch.randn(2, T, H, dtype=torch.float64)
    # The recovered C carries the conditioning of I - Ā^M (float64 solves): 1e-8 leaves room for it.
    _check_loaded(model, lambda x: _ref_s4_family("S4", p, x, kw), u, torch.randint(0, VOCAB, (2, 6)), 1e-8)


def test_s4_file_kernel_matches_the_direct_powers():
    # The frequency-domain reference itself: with the file's C̃ = C (I - Ā^M), its kernel is C Ā^l B̄.
    kw = {"rank": 2, "dt_tie": False}
    p = _s4_family_params("S4", kw, d_state=6, l_kernel=0)
    p["layer.kernel.l_kernel"] = torch.tensor(0)
    lam, B, C, dt, rep = _system(p, kw)
    P = torch.view_as_complex(p["P"].contiguous()).repeat(1, rep, 1)
    A_bar, B_bar = _dense_bilinear(lam, P.transpose(0, 1), B, dt)
    Cf = torch.cat((C, C.conj()), -1)
    direct = torch.stack([torch.einsum("chi,hij,hj->ch", Cf, torch.linalg.matrix_power(A_bar, l), B_bar).real
                          for l in range(9)], -1)
    assert_close(_s4_kernel(p, kw, 9), direct, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- S5


@pytest.mark.parametrize("disc", ["bilinear", "async"])
def test_s5_bilinear_and_async_load_with_the_same_function(tmp_path, disc):
    params = _s5_params(4)
    _folder(tmp_path / "ckpt", "S5", params, d_state=4)
    model = load_backbone_checkpoint(tmp_path / "ckpt", mixer_kwargs={**HEADS, "S5": {"discretization": disc}},
                                     dtype=torch.float64)
    p = _stored(params)
    u = torch.randn(2, T, H, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (2, 6))
    _check_loaded(model, lambda x: _ref_s5(p, x, disc), u, ids, 1e-9)
    if disc == "bilinear":
        assert model.layers[0].mixer.real_transform == "none"
        assert (model.layers[0].mixer.continuous_eigenvalues(torch.float64).real > 0).all()  # Λ' = -Λ
    else:  # the event time steps
        tau = torch.rand(2, T, dtype=torch.float64) * 2
        _check_loaded(model, lambda x, integration_timesteps: _ref_s5(p, x, disc, integration_timesteps), u, ids,
                      1e-9, integration_timesteps=tau)


# ---------------------------------------------------------------- damaged folders


def _load(folder, kind, kw):
    return load_backbone_checkpoint(folder, mixer_kwargs={**HEADS, kind: kw}, dtype=torch.float64)


def test_damaged_s4_folders_raise(tmp_path):
    kw = {"transposed": False}
    good = _s4_family_params("S4", kw, d_state=4, l_kernel=9)
    cases = {
        "copy": ({**good, "layer.kernel.C": good["C"] + 1}, "layer.kernel.C is not a copy"),
        "P": ({**good, "P": good["P"][..., :1, :], "layer.kernel.P": good["P"][..., :1, :]}, "P has shape"),
        "no_l_kernel": ({k: v for k, v in good.items() if k != "layer.kernel.l_kernel"}, "missing.*l_kernel"),
    }
    # A pole at -1e-12 (real, no low-rank part): I - Ā^9 is singular to 1e-11, so C̃ does not fix C.
    singular = {**good, "A_real": good["A_real"].clone(), "A_imag": good["A_imag"].clone(),
                "P": torch.zeros_like(good["P"])}
    singular["A_real"][:, 0], singular["A_imag"][:, 0] = -27.6, 0.0
    singular.update({f"layer.kernel.{k}": singular[k] for k in ("A_real", "A_imag", "P")})
    cases["singular"] = (singular, "amplifies rounding")
    for name, (params, match) in cases.items():
        _folder(tmp_path / name, "S4", params, d_state=4)
        with pytest.raises(ValueError, match=match):
            _load(tmp_path / name, "S4", kw)
    _folder(tmp_path / "ok", "S4", good, d_state=4)
    for bad, match in [({"transposed": True}, "transposed=True"), ({**kw, "bottleneck": 2}, "bottleneck=2"),
                       ({**kw, "is_real": True}, "is_real=True"),
                       ({**kw, "channels": 2, "gate": 3}, "gate=3 with channels=2"),
                       ({**kw, "channels": 2, "final_act": None}, "final_act=None"),
                       ({**kw, "dt_tie": False}, "dt_tie=False"), ({**kw, "colour": 1}, "unknown S4 arguments"),
                       ({**kw, "real_transform": "cube"}, "unknown real_transform 'cube'")]:
        with pytest.raises(ValueError, match=match):
            _load(tmp_path / "ok", "S4", bad)


def test_damaged_s4d_folders_raise(tmp_path):
    kw = {"transposed": False, "channels": 2, "gate": 3}
    good = _s4_family_params("S4D", kw, d_state=4)
    _folder(tmp_path / "one_channel", "S4D", _s4_family_params("S4D", {}, d_state=4), d_state=4)
    with pytest.raises(ValueError, match=r"channels=2"):
        _load(tmp_path / "one_channel", "S4D", {"transposed": False, "channels": 2})
    _folder(tmp_path / "no_gate", "S4D", {k: v for k, v in good.items() if not k.startswith("output_gate")}, 4)
    with pytest.raises(ValueError, match="missing.*output_gate"):
        _load(tmp_path / "no_gate", "S4D", kw)
    with pytest.raises(ValueError, match="no output_gate"):
        _load(tmp_path / "no_gate", "S4D", {**kw, "gate": 2})
    with pytest.raises(ValueError, match="disc='euler'"):
        _load(tmp_path / "no_gate", "S4D", {**kw, "disc": "euler"})
    with pytest.raises(ValueError, match="postact='glu' with final_act='glu'"):
        _load(tmp_path / "no_gate", "S4D", {**kw, "postact": "glu", "final_act": "glu"})


def test_damaged_s5_folders_raise(tmp_path):
    params = _s5_params(4)
    _folder(tmp_path / "ltv", "S5", {**params, "B": _randn(4, H, 2), "D": _randn(H)}, d_state=4)
    with pytest.raises(ValueError, match="time-varying S5"):
        _load(tmp_path / "ltv", "S5", {"discretization": "bilinear"})
    with pytest.raises(ValueError, match="discretization='euler'"):
        _load(tmp_path / "ltv", "S5", {"discretization": "euler"})
    with pytest.raises(ValueError, match="conj_sym"):
        _load(tmp_path / "ltv", "S5", {"discretization": "zoh", "conj_sym": True})
