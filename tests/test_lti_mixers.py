"""The LTI SSM mixers (LRU, S4, S4D, S5, Centaurus): conv == scan, the mixer contract (prefill + steps,
chunked prefill, causality, lengths), bidirectional, gradients, dtypes, initialisations, S5's event
time steps and long-sequence stability.

Shapes: B batch, T time, D model width.
"""

from __future__ import annotations

import math

import pytest
import torch

import seqblocks
from seqblocks import LRU, S4, S4D, S5, Centaurus
from seqblocks.config import BlockConfig
from seqblocks.layers.mixers import _lti
from seqblocks.layers.ssm_init import hippo, nplr
from seqblocks.ops.scan import linear_scan_ref
from seqblocks.registry import MIXERS
from seqblocks.testing import check_causality, check_chunked_prefill, check_lengths, check_prefill_then_steps

D = 3
CONFIGS = {
    "lru": (LRU, {"d_state": 4, "r_min": 0.3, "r_max": 0.95}),
    "s4-legs": (S4, {"d_state": 6}),
    "s4-legt": (S4, {"d_state": 4, "init": "legt"}),
    "s4-fourier": (S4, {"d_state": 4, "init": "fourier", "real_transform": "softplus"}),
    "s4d-legs": (S4D, {"d_state": 6}),
    "s4d-lin-bilinear": (S4D, {"d_state": 4, "init": "lin", "disc": "bilinear"}),
    "s4d-inv": (S4D, {"d_state": 4, "init": "inv", "final_act": "id", "activation": "silu"}),
    # A kernel cut after l_max = 5 steps (shorter than the test inputs), 2 channels, a gate.
    "s4d-trunc-channels-gate": (S4D, {"d_state": 4, "l_max": 5, "truncate_kernel": True, "channels": 2, "gate": 2,
                                      "gate_act": "gelu", "final_act": "gelu"}),
    "s4d-channels-double": (S4D, {"d_state": 4, "channels": 3, "final_act": "id", "double_activation": True}),
    "s4-trunc-gate": (S4, {"d_state": 4, "l_max": 4, "truncate_kernel": True, "gate": 2, "gate_act": "gelu"}),
    "s4-trunc-one": (S4, {"d_state": 4, "l_max": 1, "truncate_kernel": True, "double_activation": True}),
    "s5-zoh": (S5, {"d_state": 4}),
    "s5-bilinear-conj": (S5, {"d_state": 4, "discretization": "bilinear", "conj_sym": True}),
    "s5-dirac-blocks": (S5, {"d_state": 8, "discretization": "dirac", "blocks": 2}),
    "s5-softplus": (S5, {"d_state": 4, "real_transform": "softplus"}),
    "s5-bilinear-none": (S5, {"d_state": 4, "discretization": "bilinear", "real_transform": "none"}),
    "centaurus-neck": (Centaurus, {"d_state": 4, "sub_state_dim": 2}),
    "centaurus-pointwise": (Centaurus, {"d_state": 2, "sub_state_dim": 2, "mode": "pointwise",
                                        "discretization": "bilinear"}),
    "centaurus-dws": (Centaurus, {"sub_state_dim": 3, "variant": "dws", "discretization": "mamba"}),
    "centaurus-full": (Centaurus, {"sub_state_dim": 2, "variant": "full", "discretization": "dirac"}),
}
IDS = list(CONFIGS)


def build(name: str, **over) -> torch.nn.Module:
    cls, kw = CONFIGS[name]
    return cls(D, **{**kw, **over}).double().eval()


def _x(B: int = 2, T: int = 11) -> torch.Tensor:
    return torch.randn(B, T, D, dtype=torch.float64)


def _with_mode(m, mode):
    m.mode = mode
    return m


@pytest.mark.parametrize("name", IDS)
def test_lti_conv_equals_scan(name):
    m = build(name)
    x = _x(T=13)
    torch.testing.assert_close(_with_mode(m, "conv")(x), _with_mode(m, "scan")(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", IDS)
def test_lti_contract_prefill_steps_chunks_causality(name):
    m = build(name)
    x = _x()
    check_prefill_then_steps(m, x, prefill=4, atol=1e-10)
    check_prefill_then_steps(m, x, prefill=0, atol=1e-10)
    check_chunked_prefill(m, x, split=5, atol=1e-10)
    # A truncated kernel is a convolution in both modes (no recurrence reaches it exactly).
    check_causality(_with_mode(m, "scan"), x, t=5, atol=1e-12 if getattr(m, "truncate_kernel", False) else 0.0)
    # The FFT mixes rounding from every position into every output (1e-16 relative).
    check_causality(_with_mode(m, "conv"), x, t=5, atol=1e-12)


@pytest.mark.parametrize("name", IDS)
def test_lti_lengths_equal_separate_runs(name):
    m = build(name)
    x = _x(B=3)
    lengths = torch.tensor([11, 4, 1])
    for mode in ("conv", "scan"):
        check_lengths(_with_mode(m, mode), x, lengths, atol=1e-10)
    y = m(x, lengths=lengths)
    assert torch.all(y[1, 4:] == 0) and torch.all(y[2, 1:] == 0)


@pytest.mark.parametrize("name", ["lru", "s4-legs", "s4d-legs", "s5-zoh", "centaurus-neck"])
def test_lti_empty_sequences(name):
    m = build(name)
    for mode in ("conv", "scan"):
        assert _with_mode(m, mode)(_x(T=0)).shape == (2, 0, D)
    x = _x(T=6)
    cache = m.allocate_inference_cache(2, 6)
    m(x[:, :0], cache=cache)
    assert torch.all(cache.state == 0) and cache.seqlen_offset.tolist() == [0, 0]
    check_lengths(m, x, torch.tensor([0, 6]), atol=1e-10)


def test_lti_s4_dense_scan_chunks():
    m = build("s4-legs")
    x = _x(T=13)
    y = _with_mode(m, "conv")(x)
    for chunk in (1, 3, 4, 16):
        m.scan_chunk = chunk
        torch.testing.assert_close(_with_mode(m, "scan")(x), y, atol=1e-10, rtol=1e-10)
        check_lengths(m, x, torch.tensor([13, 5]), atol=1e-10)


def test_lti_prefill_leaves_exact_final_state():
    m = build("s5-zoh")
    x = _x(T=9)
    cache = m.allocate_inference_cache(2, 9)
    m(x, cache=cache)
    v = torch.einsum("bth,ph->btp", x.to(torch.complex128), _s5_B_bar(m))
    _, final = linear_scan_ref(_s5_A_bar(m), v)
    torch.testing.assert_close(cache.state, final, atol=1e-12, rtol=0)
    assert cache.seqlen_offset.tolist() == [9, 9]


@pytest.mark.parametrize("name", [n for n in IDS if "channels" not in CONFIGS[n][1] and "gate" not in CONFIGS[n][1]])
def test_lti_bidirectional_is_forward_plus_hand_written_reverse(name):
    extra = {"final_act": None, "activation": None, "double_activation": False} if CONFIGS[name][0] in (S4, S4D) \
        else {}
    bi = build(name, bidirectional=True, **extra)
    fwd = build(name, **extra)
    bwd = build(name, **extra)
    state = bi.state_dict()
    fwd.load_state_dict({k: v for k, v in state.items() if "C_bwd" not in k})
    swapped = {k.replace("C_bwd", "C"): v for k, v in state.items() if "C_bwd" in k}
    bwd.load_state_dict({**{k: v for k, v in state.items() if "C_bwd" not in k}, **swapped})
    x = _x()
    skip = fwd._skip(x)
    y_rev = bwd(x.flip(1)).flip(1) - (0 if skip is None else skip)
    expected = fwd(x) + y_rev
    assert not bi.causal
    for mode in ("conv", "scan"):
        torch.testing.assert_close(_with_mode(bi, mode)(x), expected, atol=1e-10, rtol=1e-10)
    # With lengths, each row's reversed pass starts at its own last valid position.
    lengths = torch.tensor([11, 6])
    for mode in ("conv", "scan"):
        y = _with_mode(bi, mode)(x, lengths=lengths)
        torch.testing.assert_close(y[1:, :6], bi(x[1:, :6]), atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="not causal"):
        bi.allocate_inference_cache(2, 11)


def _grads(m, x, cot):
    x = x.clone().requires_grad_()
    leaves = [x] + [p for p in m.parameters()]
    g = torch.autograd.grad((m(x) * cot).sum(), leaves, allow_unused=True)
    return [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, leaves)]


@pytest.mark.parametrize("name", IDS)
def test_lti_gradients_agree_across_paths(name, monkeypatch):
    m = build(name)
    x = _x(T=9)
    cot = torch.randn(2, 9, D, dtype=torch.float64)
    g_scan = _grads(_with_mode(m, "scan"), x, cot)
    g_conv = _grads(_with_mode(m, "conv"), x, cot)
    # The reference path: the sequential linear_scan_ref in place of the fast scan.
    monkeypatch.setattr(_lti, "linear_scan", lambda a, b, h0=None, **kw: linear_scan_ref(a, b, h0, **kw))
    import seqblocks.layers.mixers.s4d as s4d_module

    monkeypatch.setattr(s4d_module, "linear_scan", lambda a, b, h0=None, **kw: linear_scan_ref(a, b, h0, **kw))
    g_ref = _grads(_with_mode(m, "scan"), x, cot)
    for a, b, c in zip(g_scan, g_conv, g_ref):
        torch.testing.assert_close(a, c, atol=1e-9, rtol=1e-8)
        torch.testing.assert_close(b, c, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("name", ["lru", "s4-legs", "s4d-legs", "s5-zoh", "centaurus-neck"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lti_half_inputs(name, dtype):
    cls, kw = CONFIGS[name]
    m = cls(8, **kw).eval()  # fp32 parameters, fp32 / complex64 state and FFTs
    x = torch.randn(2, 40, 8)
    y = m(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), m(x.to(dtype).float()), atol=0.05, rtol=0.02)
    cache = m.allocate_inference_cache(2, 41, dtype=dtype)
    assert cache.state.dtype == torch.complex64
    m(x.to(dtype), cache=cache)
    assert m.step(x[:, :1].to(dtype), cache).dtype == dtype


def test_lti_registry_exports_and_from_config():
    for name, cls in [("LRU", LRU), ("s4", S4), ("S4D", S4D), ("s5", S5), ("centaurus", Centaurus)]:
        assert MIXERS.get(name) is cls and getattr(seqblocks, cls.__name__) is cls
        m = cls.from_config(BlockConfig(d_model=8, d_state=4, attention=name))
        assert m.d_model == 8 and m(torch.randn(1, 5, 8)).shape == (1, 5, 8)


def test_lti_errors():
    x = torch.randn(2, 5, D)
    m = LRU(D, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 5, D + 1))
    with pytest.raises(ValueError, match="lengths"):
        m(x, lengths=torch.tensor([6, 1]))
    with pytest.raises(ValueError, match="mode"):
        LRU(D, 4, mode="fft")
    with pytest.raises(ValueError, match="r_min"):
        LRU(D, 4, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="d_state"):
        S4(D, 5)
    with pytest.raises(ValueError, match="init"):
        S4D(D, 4, init="hippo")
    with pytest.raises(ValueError, match="discretization"):
        S5(D, 4, discretization="euler")
    with pytest.raises(ValueError, match="conflicts"):
        Centaurus(D, mode="dws", variant="full")
    with pytest.raises(ValueError, match="variant"):
        Centaurus(D, variant="wide")
    cache = m.allocate_inference_cache(3, 5)
    with pytest.raises(ValueError, match="batch_size=3"):
        m(x, cache=cache)
    with pytest.raises(ValueError, match="integration_timesteps"):
        S5(D, 4)(x, integration_timesteps=torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-negative"):
        S5(D, 4)(x, integration_timesteps=-torch.ones(2, 5))


def test_lti_lru_eigenvalues_inside_the_ring():
    m = LRU(4, 512, r_min=0.4, r_max=0.9, max_phase=math.pi / 2)
    lam = m.eigenvalues().detach()
    assert lam.abs().min() >= 0.4 - 1e-6 and lam.abs().max() <= 0.9 + 1e-6
    assert lam.angle().min() >= 0 and lam.angle().max() <= math.pi / 2 + 1e-6
    # Uniform in area on the ring: |λ|^2 uniform in [r_min^2, r_max^2].
    assert abs(float((lam.abs() ** 2).mean()) - (0.16 + 0.81) / 2) < 0.03
    torch.testing.assert_close(torch.exp(m.gamma_log).detach(), (1 - lam.abs() ** 2).sqrt(), atol=1e-5, rtol=1e-5)
    # |λ| = exp(-exp(ν)) < 1 for any ν (it rounds to 1 in fp32 only below ν ~ -16).
    with torch.no_grad():
        m.nu_log.uniform_(-12, 5)
    assert m.eigenvalues().abs().max() < 1
    with torch.no_grad():
        m.nu_log.uniform_(-60, 5)
    assert m.eigenvalues().abs().max() <= 1


def test_lti_hippo_nplr_reconstructs_and_inits():
    for measure in ("legs", "legt", "fourier"):
        A, B, P = hippo(measure, 8)
        lam, Pt, Bt, V = nplr(measure, 8)
        Vf = torch.cat((V, V.conj()), 1)
        Pf = torch.cat((Pt, Pt.conj()), -1)
        A_rec = Vf @ (torch.diag(torch.cat((lam, lam.conj()))) - Pf.T @ Pf.conj()) @ Vf.conj().T
        torch.testing.assert_close(A_rec, A.to(torch.complex128), atol=1e-12, rtol=0)
        torch.testing.assert_close(Vf @ torch.cat((Bt, Bt.conj())), B.to(torch.complex128), atol=1e-12, rtol=0)
    # S4D-Lin / -Inv closed forms; S4 and S5 start from LegS (Re Λ = -1/2).
    m = S4D(2, 8, init="lin")
    torch.testing.assert_close(m.A_imag[0].detach(), math.pi * torch.arange(4.0))
    m = S4D(2, 8, init="inv")
    torch.testing.assert_close(m.A_imag[0].detach(), 8 / math.pi * (8 / (2 * torch.arange(4.0) + 1) - 1))
    lam = S5(2, 8).continuous_eigenvalues().detach()
    torch.testing.assert_close(lam.real, torch.full((8,), -0.5))
    assert S5(2, 8, conj_sym=True).state_shape() == (4,)


def _s5_A_bar(m: S5, dt_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    A = m.continuous_eigenvalues(torch.float64).detach()
    z = torch.exp(m.log_step.detach()) * A
    zA = z * dt_scale
    return {"zoh": torch.exp(zA), "dirac": torch.exp(zA), "bilinear": (1 + zA / 2) / (1 - zA / 2)}[m.discretization]


def _s5_B_bar(m: S5) -> torch.Tensor:
    A = m.continuous_eigenvalues(torch.float64).detach()
    dt = torch.exp(m.log_step.detach())
    gamma = {"zoh": (torch.exp(dt * A) - 1) / A, "dirac": torch.ones_like(A),
             "bilinear": dt / (1 - dt * A / 2)}[m.discretization]
    return gamma[:, None] * torch.complex(m.B_re, m.B_im).detach()


@pytest.mark.parametrize("disc", ["zoh", "bilinear", "dirac"])
def test_lti_s5_integration_timesteps(disc):
    m = S5(D, 4, discretization=disc).double().eval()
    x = _x(T=10)
    # All ones: exactly the regular model.
    assert torch.equal(m(x, integration_timesteps=torch.ones(2, 10, dtype=torch.float64)), _with_mode(m, "scan")(x))
    # Irregular steps against a sequential reference written from the formulas.
    tau = torch.rand(2, 10, dtype=torch.float64) * 3
    y = m(x, integration_timesteps=tau)
    B_bar, C = _s5_B_bar(m), torch.complex(m.C_re, m.C_im).detach()
    h = torch.zeros(2, 4, dtype=torch.complex128)
    ref = []
    for t in range(10):
        h = _s5_A_bar(m, tau[:, t : t + 1]) * h + x[:, t].to(torch.complex128) @ B_bar.T
        ref.append((h @ C.T).real + m.D.detach() * x[:, t])
    torch.testing.assert_close(y, torch.stack(ref, 1), atol=1e-12, rtol=1e-12)
    # Decoding with the timesteps, and lengths.
    check_prefill_then_steps(m, x, prefill=3, atol=1e-12, integration_timesteps=tau)
    lengths = torch.tensor([10, 4])
    y_len = m(x, lengths=lengths, integration_timesteps=tau)
    torch.testing.assert_close(y_len[1:, :4], m(x[1:, :4], integration_timesteps=tau[1:, :4]), atol=1e-12, rtol=0)


def test_lti_s5_bidirectional_integration_timesteps_reverse_pass():
    m = S5(D, 4, bidirectional=True).double().eval()
    x, tau = _x(T=8), torch.rand(2, 8, dtype=torch.float64) + 0.5
    y = m(x, integration_timesteps=tau)
    # Reversed in time, the gap before event t is the interval that ended at t + 1.
    tau_rev = torch.cat((torch.ones(2, 1, dtype=torch.float64), tau[:, 1:].flip(1)), 1)
    fwd = S5(D, 4).double().eval()
    bwd = S5(D, 4).double().eval()
    state = m.state_dict()
    fwd.load_state_dict({k: v for k, v in state.items() if "C_bwd" not in k})
    bwd.load_state_dict({**{k: v for k, v in state.items() if "C_bwd" not in k},
                         **{k.replace("C_bwd", "C"): v for k, v in state.items() if "C_bwd" in k}})
    expected = fwd(x, integration_timesteps=tau) + bwd(x.flip(1), integration_timesteps=tau_rev).flip(1) - x * m.D
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)


def test_lti_s5_bilinear_bounded_at_16k():
    # lrnnx's inverted bilinear transform has |Ā| > 1 and its S5 output reaches 5e10 at T = 2048.
    m = S5(2, 8, discretization="bilinear").eval()
    with torch.no_grad():
        m.log_step.fill_(math.log(0.5))  # large steps: the regime where an inverted transform explodes
    x = torch.randn(1, 16384, 2)
    for mode in ("scan", "conv"):
        y = _with_mode(m, mode)(x)
        assert torch.isfinite(y).all() and y.abs().max() < 100, (mode, float(y.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("name", IDS)
def test_lti_gpu_matches_cpu(name):
    cls, kw = CONFIGS[name]
    m = cls(8, **kw).double().eval()
    x = torch.randn(2, 300, 8, dtype=torch.float64)
    lengths = torch.tensor([300, 123])
    expected = m(x, lengths=lengths)
    g = m.float().cuda()
    for mode in ("conv", "scan") if cls is not S4 else ("conv",):
        y = _with_mode(g, mode)(x.float().cuda(), lengths=lengths.cuda())
        torch.testing.assert_close(y.double().cpu(), expected, atol=2e-3, rtol=2e-3)
        y = g(x.cuda().bfloat16(), lengths=lengths.cuda())
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        y.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in g.parameters() if p.grad is not None)
    cache = g.allocate_inference_cache(2, 301)
    g(x[:, :50].float().cuda(), cache=cache)
    g.step(x[:, 50:51].float().cuda(), cache)


def test_s4_inference_memo_follows_parameter_updates():
    # Decoding reuses the discretised system; an in-place update (an optimizer step) must invalidate it.
    s4 = S4(8, d_state=4).double().eval()
    with torch.no_grad():
        first = s4.discrete_system(torch.float64)
        assert s4.discrete_system(torch.float64)[0] is first[0]  # memoised
        s4.log_dt.add_(0.1)
        second = s4.discrete_system(torch.float64)
    assert not torch.allclose(first[0], second[0])
    exact = s4.discrete_system(torch.float64)  # with autograd: recomputed, differentiable
    assert exact[0].requires_grad
    torch.testing.assert_close(exact[0].detach(), second[0])


@pytest.mark.parametrize("cls", [S4, S4D])
def test_lti_truncated_kernel_stops_after_l_max_steps(cls):
    kw = dict(d_state=4, final_act=None, activation=None)
    cut = cls(D, l_max=4, truncate_kernel=True, **kw).double().eval()
    full = cls(D, **kw).double().eval()
    full.load_state_dict(cut.state_dict())
    x = _x(T=10)
    K = full.kernel(4, dtype=torch.float64)  # the first 4 lags of the whole kernel
    ref = torch.stack([sum(K[:, l] * x[:, t - l] for l in range(min(t + 1, 4))) for t in range(10)], 1)
    ref = ref + x * cut.D.detach()
    for mode in ("conv", "scan"):
        torch.testing.assert_close(_with_mode(cut, mode)(x), ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(full(x)[:, :4], ref[:, :4], atol=1e-12, rtol=1e-12)
    assert not torch.allclose(full(x)[:, 4:], ref[:, 4:])
    # The cache is the window of the last l_max - 1 inputs (real), not the SSM state.
    cache = cut.allocate_inference_cache(2, 10)
    assert cache.state.shape == (2, 3, D) and cache.state.dtype == torch.float64
    cut(x[:, :6], cache=cache, lengths=torch.tensor([6, 2]))
    assert torch.equal(cache.state[0], x[0, 3:6]) and torch.equal(cache.state[1, 1:], x[1, :2])
    assert torch.all(cache.state[1, 0] == 0)


def test_lti_new_option_errors():
    with pytest.raises(ValueError, match="truncate_kernel=True needs l_max"):
        S4D(D, 4, truncate_kernel=True)
    with pytest.raises(TypeError, match="truncate_kernel must be a bool"):
        S4(D, 4, l_max=3, truncate_kernel=1)
    with pytest.raises(ValueError, match="gate_act='gelu' needs a gate"):
        S4D(D, 4, gate_act="gelu")
    with pytest.raises(ValueError, match="unknown gate_act 'swish'"):
        S4(D, 4, gate=2, gate_act="swish")
    with pytest.raises(ValueError, match="double_activation applies to the ungated path"):
        S4(D, 4, gate=2, double_activation=True)
    with pytest.raises(ValueError, match="final_act=None leaves the width at 6"):
        S4D(D, 4, channels=2, final_act=None)
    with pytest.raises(ValueError, match="real_transform 'cube'"):
        S5(D, 4, real_transform="cube")


def test_lti_s5_real_transforms_store_re_lambda():
    for transform in ("exp", "softplus", "relu", "none"):
        m = S5(D, 4, real_transform=transform).double()
        torch.testing.assert_close(m.continuous_eigenvalues(torch.float64).real.detach(),
                                   torch.full((4,), -0.5, dtype=torch.float64))  # the LegS start
    m = S5(D, 4, discretization="bilinear", real_transform="none").double().eval()
    with torch.no_grad():
        m.Lambda_re_log.fill_(0.5)  # Re Λ > 0: |Ā| > 1, which only "none" can hold
    assert (_s5_A_bar(m).abs() > 1).all()
    x = _x(T=8)
    torch.testing.assert_close(_with_mode(m, "conv")(x), _with_mode(m, "scan")(x), atol=1e-10, rtol=1e-10)
