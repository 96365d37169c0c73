"""The spellings and arguments other libraries' code uses, each doing what it says."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import seqblocks.layers.mixer as mixer_module
from seqblocks import (
    MHA,
    S4,
    S5,
    S7,
    BlockConfig,
    ConfigurableBlock,
    EncoderBlock,
    LayerNorm,
    LRNNLMHeadModel,
    LRNNModel,
    RMSNorm,
)
from seqblocks.layers.mixers.mamba import Mamba
from seqblocks.layers.mixers.rglru import RGLRU
from seqblocks.layers.mixers.s4 import S4_INITS
from seqblocks.layers.mixers.s7 import s7_base_init
from seqblocks.registry import NORMS

B, T, D = 2, 11, 8


def _x(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.randn(B, T, D, dtype=dtype)


def _decode(m, x, split=4):
    """Prefill ``split`` tokens, then step the rest: the outputs, concatenated."""
    cache = m.allocate_inference_cache(x.shape[0], x.shape[1])
    out = [m(x[:, :split], cache)]
    out += [m(x[:, t : t + 1], cache) for t in range(split, x.shape[1])]
    return torch.cat(out, 1)


# ---------------------------------------------------------------- S4


def test_s4_transposed_returns_y_and_state():
    torch.manual_seed(0)
    plain = S4(D, 8).double()
    seed_style = S4(D, 8, transposed=True).double()
    seed_style.load_state_dict(plain.state_dict())
    x = _x()
    y, state = seed_style(x.transpose(1, 2))  # [B, H, T]
    assert state is None and y.shape == (B, D, T)
    assert_close(y.transpose(1, 2), plain(x))
    flat = S4(D, 8, transposed=False).double()
    flat.load_state_dict(plain.state_dict())
    cache = flat.allocate_inference_cache(B, T)
    y2, state = flat(x, cache)
    assert_close(y2, plain(x))
    assert state is cache.state and state.shape == (B, D, 8)
    with pytest.raises(TypeError, match="transposed"):
        S4(D, 8, transposed="yes")


def test_s4_transposed_inside_a_model_matches_the_contract():
    kw = dict(d_model=D, d_state=8, n_layer=2, vocab_size=32, mixer_types=["S4", "S4"])
    torch.manual_seed(1)
    plain = LRNNLMHeadModel(**kw).eval()
    torch.manual_seed(1)
    seed_style = LRNNLMHeadModel(**kw, mixer_kwargs={"S4": {"transposed": True}}).eval()
    seed_style.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 32, (B, T))
    with torch.no_grad():
        assert_close(seed_style(ids).logits, plain(ids).logits)
        caches = seed_style.allocate_inference_cache(B, T)
        seed_style(ids[:, :5], inference_params=caches)
        step = seed_style.step(ids[:, 5:6], caches).logits
    assert_close(step, plain(ids[:, :6]).logits[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", S4_INITS)
def test_s4_inits(init):
    torch.manual_seed(0)
    m = S4(D, 8, init=init).double()
    if init.startswith("diag"):
        assert m.P_re.abs().max() == 0 and m.P_im.abs().max() == 0
        assert_close(m.B_re, torch.ones_like(m.B_re))
    if init == "diag-real":
        assert m.A_imag.abs().max() == 0
        assert_close(m.A_real, torch.log(torch.arange(1.0, 5.0, dtype=torch.float64)).expand(D, -1))
    if init == "diag-lin":
        assert_close(m.A_imag[0], math.pi * torch.arange(4.0, dtype=torch.float64))
    if init == "random":
        assert m.A_imag.std() > 0 and m.P_re.abs().max() > 0
    x = _x()
    y = m(x)
    assert torch.isfinite(y).all()
    with torch.no_grad():
        assert_close(_decode(m, x), y)  # the recurrence and the convolution agree
    A_bar, _ = m.discrete_system(torch.float64)
    assert torch.linalg.eigvals(A_bar).abs().max() < 1  # stable


def test_s4_unknown_init():
    with pytest.raises(ValueError, match="diag-lin"):
        S4(D, 8, init="diag-nope")


@pytest.mark.parametrize(("channels", "gate"), [(3, None), (1, 2), (2, 3)])
def test_s4_channels_and_gate(channels, gate):
    torch.manual_seed(0)
    m = S4(D, 8, channels=channels, gate=gate).double()
    assert m.C_re.shape == ((D, 4) if channels == 1 else (channels, D, 4))
    x = _x()
    y = m(x)
    assert y.shape == x.shape
    assert m.kernel(T).shape == ((D, T) if channels == 1 else (channels, D, T))
    with torch.no_grad():
        assert_close(_decode(m, x), y)
    if gate is not None:
        assert m.input_gate.out_features == gate * D and m.output_gate.in_features == channels * D
        # the gate reads the input: zeroing its weights zeroes the output (before the GLU bias)
        with torch.no_grad():
            m.input_gate.weight.zero_()
            m.input_gate.bias.zero_()
        expected = m.output_linear(torch.zeros_like(y, dtype=torch.float64).new_zeros(B, T, gate * D))
        assert_close(m(x), expected)
    with pytest.raises(ValueError, match="final_act"):
        S4(D, 8, channels=2, final_act=None)


# ---------------------------------------------------------------- S5, S7, use_fast_path


def test_s5_step_rescale_scales_every_step():
    torch.manual_seed(0)
    a = S5(D, 8, step_rescale=2.0).double()
    b = S5(D, 8).double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.log_step.add_(math.log(2.0))
    x = _x()
    assert_close(a(x), b(x))
    unscaled = S5(D, 8).double()
    unscaled.load_state_dict(a.state_dict())
    assert not torch.allclose(a(x), unscaled(x))
    with torch.no_grad():
        assert_close(_decode(a, x), a(x))
    with pytest.raises(ValueError, match="step_rescale"):
        S5(D, 8, step_rescale=0.0)


def test_s5_discretization_names():
    torch.manual_seed(0)
    zoh = S5(D, 8, "zoh").double()
    async_ = S5(D, 8, "async").double()
    async_.load_state_dict(zoh.state_dict())
    x = _x()
    tau = torch.rand(B, T, dtype=torch.float64) * 2
    assert_close(async_(x), zoh(x))
    assert_close(async_(x, integration_timesteps=tau), zoh(x, integration_timesteps=tau))
    # no_discretization: the stored eigenvalues are the decays, B unscaled.
    raw = S5(D, 8, "no_discretization", mode="scan").double()
    with torch.no_grad():
        raw.Lambda_re_log.fill_(math.log(0.2))  # Λ = -0.2 + i θ: |Λ| < 1 for small θ
        raw.Lambda_im.uniform_(-0.5, 0.5)
    lam = raw.continuous_eigenvalues(torch.float64)
    Bm = torch.complex(raw.B_re, raw.B_im)
    C = torch.complex(raw.C_re, raw.C_im)
    h = torch.zeros(B, 8, dtype=torch.complex128)
    ys = []
    for t in range(T):
        h = lam * h + x[:, t].to(torch.complex128) @ Bm.T
        ys.append((h @ C.T).real + raw.D * x[:, t])
    assert_close(raw(x), torch.stack(ys, 1))
    conv = S5(D, 8, "no_discretization", mode="conv").double()
    conv.load_state_dict(raw.state_dict())
    assert_close(conv(x), raw(x))
    with pytest.raises(ValueError, match="no_discretization"):
        S5(D, 8, "euler")


def test_s7_J_blocks():
    m = S7(16, 8, 2, False)  # positional: d_model, d_state, J, use_fast_path
    assert m.J == 2 and not m.use_fast_path
    assert_close(m.lambda_base, s7_base_init(4, m.timescale_range).repeat(2))
    assert not torch.allclose(m.lambda_base, S7(16, 8).lambda_base)
    with pytest.raises(ValueError, match="multiple of J"):
        S7(16, 8, J=3)


@pytest.mark.parametrize("make", [lambda: S5(D, 8), lambda: S7(D, 8), lambda: Mamba(D), lambda: RGLRU(D)])
def test_use_fast_path_false_runs_the_torch_paths(make, monkeypatch):
    seen = []
    real = mixer_module.prefer_backend

    def spy(backend):
        seen.append(backend)
        return real(backend)

    monkeypatch.setattr(mixer_module, "prefer_backend", spy)
    torch.manual_seed(0)
    fast = make().double()
    slow = type(fast)(**{**fast_kwargs(fast), "use_fast_path": False}).double()
    slow.load_state_dict(fast.state_dict())
    x = _x()
    y_fast = fast(x)
    assert seen == []
    assert_close(slow(x), y_fast)
    assert seen == ["torch"]


def fast_kwargs(m):
    name = type(m).__name__
    return {"S5": dict(d_model=D, d_state=8), "S7": dict(d_model=D, d_state=8), "Mamba": dict(d_model=D),
            "RGLRU": dict(d_model=D)}[name]


def test_mixer_kwargs_reach_the_new_arguments_and_round_trip(tmp_path):
    model = LRNNLMHeadModel(d_model=D, d_state=8, n_layer=3, vocab_size=32, mixer_types=["S5", "S7", "S4"],
                            mixer_kwargs={"S5": {"step_rescale": 0.5, "discretization": "async"},
                                          "S7": {"J": 2, "use_fast_path": False},
                                          "S4": {"init": "diag-inv", "channels": 2, "gate": 2}})
    assert model.layers[0].mixer.step_rescale == 0.5 and model.layers[1].mixer.J == 2
    assert model.layers[2].mixer.channels == 2
    model.save_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    assert loaded.layers[0].mixer.discretization == "async" and not loaded.layers[1].mixer.use_fast_path
    ids = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits)


# ---------------------------------------------------------------- norms, attention types


def test_norm_type_spellings():
    assert NORMS.get("layer") is LayerNorm and NORMS.get("rms") is RMSNorm
    assert isinstance(EncoderBlock(16, 2, 32, norm_type="rms").ln1, RMSNorm)
    assert isinstance(EncoderBlock(16, 2, 32, norm_type="layer").ln2, LayerNorm)
    block = ConfigurableBlock(BlockConfig(norm="rms", d_model=16, n_heads=2, d_ff=32))
    assert isinstance(block.attn_norm, RMSNorm)
    with pytest.raises(ValueError, match="rms_norm"):
        EncoderBlock(16, 2, 32, norm_type="batch")


def test_pallas_flash_is_the_fastest_fused_path():
    torch.manual_seed(0)
    a = MHA(16, num_heads=2, attention_type="pallas_flash")
    b = MHA(16, num_heads=2, attention_type="auto")
    b.load_state_dict(a.state_dict())
    assert a.attention_type == "auto"
    x = torch.randn(2, 7, 16)
    assert_close(a(x), b(x))
    with pytest.raises(ValueError, match="pallas_flash"):
        MHA(16, num_heads=2, attention_type="triton_flash")


# ---------------------------------------------------------------- LRNNModel / backbone


def test_backbone_is_the_model_without_its_head():
    torch.manual_seed(0)
    lm = LRNNLMHeadModel(d_model=16, d_state=8, n_layer=2, vocab_size=40, mixer_types=["S5", "attn"],
                         mixer_kwargs={"attn": {"num_heads": 2}}).eval()
    ids = torch.randint(0, 40, (B, 7))
    backbone = lm.backbone
    assert isinstance(backbone, LRNNModel)
    assert backbone.layers is lm.layers and backbone.embedding is lm.embedding and backbone.norm_f is lm.norm_f
    assert "lm_head.weight" not in backbone.state_dict()
    with torch.no_grad():
        h = backbone(ids)
        assert_close(lm.head_logits(h), lm(ids).logits)
        caches = backbone.allocate_inference_cache(B, 8)
        backbone(ids[:, :6], caches)
        assert_close(backbone.step(ids[:, 6:7], caches), h[:, 6:7], atol=1e-5, rtol=1e-5)


def test_standalone_lrnn_model():
    torch.manual_seed(0)
    m = LRNNModel(16, 8, 2, 40, ["S5", "Mamba"], d_intermediate=32)
    keys = set(m.state_dict())
    assert {"embedding.weight", "norm_f.weight"} <= keys and all(k.split(".")[0] in
                                                                  {"embedding", "layers", "norm_f"} for k in keys)
    assert m.embedding.num_embeddings == 40
    ids = torch.randint(0, 40, (B, 5))
    assert m(ids).shape == (B, 5, 16)
    with pytest.raises(TypeError, match="declared by no mixer"):
        m(ids, nonsense=torch.ones(1))


# ---------------------------------------------------------------- ConfigurableBlock cache=None


@pytest.mark.parametrize("attention", ["gqa", "mamba", "s5", "sliding_window"])
def test_cache_none_outside_training_continues(attention):
    torch.manual_seed(0)
    cfg = BlockConfig(attention=attention, ffn="gated", norm="rms_norm", position="rope", d_model=16, n_heads=4,
                      n_kv_heads=2, d_ff=32, window_size=3 if attention == "sliding_window" else None)
    block = ConfigurableBlock(cfg).double().eval()
    x = _x().repeat(1, 1, 2)
    full, _ = block(x)
    head, cache = block(x[:, :6])
    assert cache is not None
    pieces = [head]
    for t in range(6, T):
        y, cache = block(x[:, t : t + 1], cache=cache)
        pieces.append(y)
    assert_close(torch.cat(pieces, 1), full)


def test_cache_none_in_training_allocates_nothing():
    block = ConfigurableBlock(BlockConfig(attention="gqa", d_model=16, n_heads=4, d_ff=32))
    x = torch.randn(2, 5, 16)
    assert block(x)[1] is None  # training mode, gradients on
    with torch.no_grad():
        assert block(x)[1] is not None  # gradients off counts as outside training
    block.eval()
    assert block(x, fresh_cache=False)[1] is None
    bidir = ConfigurableBlock(BlockConfig(attention="mha", causal=False, d_model=16, n_heads=4, d_ff=32)).eval()
    assert bidir(x)[1] is None  # a non-causal mixer keeps no cache
    with pytest.raises(ValueError, match="fresh_cache"):
        bidir(x, fresh_cache=True)


# ---------------------------------------------------------------- MHA mlp_dim / d_conv


def test_mha_fused_mlp():
    torch.manual_seed(0)
    m = MHA(16, num_heads=4, mlp_dim=100).double()
    assert m.mlp_dim == 256  # rounded up to a multiple of 256
    assert m.in_proj.out_features == 48 + 256 and m.out_proj.in_features == 16 + 128
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    plain = MHA(16, num_heads=4).double()
    with torch.no_grad():
        plain.in_proj.weight.copy_(m.in_proj.weight[:48])
        plain.in_proj.bias.copy_(m.in_proj.bias[:48])
        plain.out_proj.weight.copy_(m.out_proj.weight[:, :16])
        plain.out_proj.bias.zero_()
    up, gate = (x @ m.in_proj.weight[48:].T + m.in_proj.bias[48:]).chunk(2, -1)
    mlp = (up * torch.nn.functional.silu(gate)) @ m.out_proj.weight[:, 16:].T + m.out_proj.bias
    assert_close(m(x), plain(x) + mlp)


@pytest.mark.parametrize("kw", [dict(d_conv=4), dict(d_conv=3, mlp_dim=256, num_heads_kv=2),
                                dict(d_conv=4, window_size=3)])
def test_mha_conv_decodes_and_is_causal(kw):
    torch.manual_seed(0)
    m = MHA(16, num_heads=4, **kw).double().eval()
    assert m.conv_weight.shape == (16 * (4 + 2 * m.num_heads_kv) // 4, kw["d_conv"])
    x = torch.randn(2, T, 16, dtype=torch.float64)
    y = m(x)
    with torch.no_grad():
        assert_close(_decode(m, x), y)
    x2 = x.clone()
    x2[:, 6] += 1.0
    assert_close(m(x2)[:, :6], y[:, :6])
    assert not torch.allclose(m(x2)[:, 6:], y[:, 6:])
    with pytest.raises(ValueError, match="d_conv"):
        MHA(16, num_heads=4, d_conv=-1)


def test_lite_attention():
    torch.manual_seed(0)
    m = MHA(16, num_heads=4, num_heads_kv=2, attention_type="lite", causal=False).double()
    assert m.attention_type == "lite" and m.lite_gate.in_features == 4
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    q, k, v = m.in_proj(x).split((16, 8, 8), -1)
    q, k, v = q.view(2, 7, 4, 4), k.view(2, 7, 2, 4).repeat_interleave(2, 2), v.view(2, 7, 2, 4).repeat_interleave(2, 2)
    w = torch.softmax(m.lite_gate(q * k), dim=1)  # over the sequence, per head
    assert_close(m(x), m.out_proj((w * v).reshape(2, 7, 16)))
    lengths = torch.tensor([7, 4])
    y = m(x, lengths=lengths)
    assert y[1, 4:].abs().max() == 0
    assert_close(y[1, :4], m(x[1:, :4])[0])  # padding takes no weight
    with pytest.raises(ValueError, match="causal=False"):
        MHA(16, num_heads=4, attention_type="lite")
