"""Mamba (with STREAM's event form), RG-LRU (Griffin's recurrent block) and S7: the mixer contract,
paper-level sequential references, the reference op path, initialisation and low precision."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import seqblocks
from seqblocks import testing
from seqblocks.config import BlockConfig
from seqblocks.layers.mixer import run_mixer
from seqblocks.layers.mixers import mamba as mamba_mod
from seqblocks.layers.mixers import rglru as rglru_mod
from seqblocks.layers.mixers import s7 as s7_mod
from seqblocks.layers.mixers.mamba import Mamba, MambaCache
from seqblocks.layers.mixers.rglru import RGLRU, _SqrtBoundedGrad
from seqblocks.layers.mixers.s7 import S7
from seqblocks.ops.causal_conv1d import causal_conv1d_ref
from seqblocks.ops.scan import linear_scan_ref
from seqblocks.ops.selective_scan import selective_scan_ref
from seqblocks.registry import MIXERS
from seqblocks.testing import assert_close

F64 = torch.float64
D_MODEL = 8

FACTORIES = {
    "mamba": functools.partial(Mamba, D_MODEL, d_state=4),
    "mamba_zoh": functools.partial(Mamba, D_MODEL, d_state=4, discretization="zoh"),
    "mamba_bilinear": functools.partial(Mamba, D_MODEL, d_state=4, discretization="bilinear", dt_rank=3),
    "rglru": functools.partial(RGLRU, D_MODEL, num_heads=2, expand=2),
    "s7": functools.partial(S7, D_MODEL, d_state=6),
}
MAIN = ["mamba", "rglru", "s7"]


def build(name: str, dtype=F64) -> torch.nn.Module:
    return FACTORIES[name]().to(dtype).eval()


def x64(B=2, T=11):
    return torch.randn(B, T, D_MODEL, dtype=F64)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_contract(name):
    m, x = build(name), x64()
    testing.check_prefill_then_steps(m, x, prefill=0, atol=1e-10)
    testing.check_prefill_then_steps(m, x, prefill=5, atol=1e-10)
    testing.check_chunked_prefill(m, x, split=4, atol=1e-10)
    testing.check_causality(m, x, t=5)
    testing.check_lengths(m, x, torch.tensor([11, 6]), atol=1e-10)


@pytest.fixture
def reference_ops(monkeypatch):
    """Swap the reference ops into the mixers (the sequential specs of the scan and conv)."""
    def ss_ref(*args, backend="auto", **kw):
        return selective_scan_ref(*args, **kw)

    def conv_ref(*args, backend="auto", **kw):
        return causal_conv1d_ref(*args, **kw)

    def scan_ref(*args, backend="auto", **kw):
        return linear_scan_ref(*args, **kw)

    monkeypatch.setattr(mamba_mod, "selective_scan", ss_ref)
    for mod in (mamba_mod, rglru_mod):
        monkeypatch.setattr(mod, "causal_conv1d", conv_ref)
    for mod in (rglru_mod, s7_mod):
        monkeypatch.setattr(mod, "linear_scan", scan_ref)


def _run_with_grads(m, x, **kw):
    y = m(x, **kw)
    cot = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
    params = [p for p in m.parameters()]
    return y, torch.autograd.grad(y, [x, *params], cot)


@pytest.mark.parametrize("name", MAIN)
def test_gradients_match_reference_path(name, request):
    m = build(name)
    x = x64().requires_grad_(True)
    lengths = torch.tensor([11, 7])
    y_fast, g_fast = _run_with_grads(m, x, lengths=lengths)
    request.getfixturevalue("reference_ops")
    y_ref, g_ref = _run_with_grads(m, x, lengths=lengths)
    assert_close(y_fast, y_ref, atol=1e-10)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, g_fast, g_ref):
        assert_close(a, b, atol=1e-9, msg=f"grad of {n}")


@pytest.mark.parametrize("name", MAIN)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_close_to_fp32(name, dtype):
    m32 = FACTORIES[name]().eval()
    low = FACTORIES[name]().to(dtype).eval()
    low.load_state_dict(m32.state_dict())
    x = torch.randn(2, 40, D_MODEL)
    y32 = m32(x)
    y = low(x.to(dtype))
    assert y.dtype == dtype
    assert_close(y, y32, atol=0.03 * float(y32.abs().max()))
    cache = low.allocate_inference_cache(2, 40, dtype=dtype)
    assert all(t.dtype == torch.float32 for n, t in cache.tensors() if n in ("ssm_state", "rnn_state", "state"))
    y_cached = torch.cat([low(x[:, :30].to(dtype), cache)] + [low.step(x[:, t : t + 1].to(dtype), cache)
                                                              for t in range(30, 40)], 1)
    assert_close(y_cached, y32, atol=0.03 * float(y32.abs().max()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = m32(x)
    assert_close(ya, y32, atol=0.03 * float(y32.abs().max()))


# Mamba / STREAM ------------------------------------------------------------------------------------


def mamba_sequential(m: Mamba, x: torch.Tensor, ts: torch.Tensor | None) -> torch.Tensor:
    """Mamba written as the paper's per-step recurrence (event form when ``ts`` is given)."""
    xs, z = m.in_proj(x).chunk(2, dim=-1)
    xc, _ = causal_conv1d_ref(xs, m.conv_weight, m.conv_bias, activation="silu")
    dt_low, Bm, Cm = m.x_proj(xc).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(m.dt_proj(dt_low))  # [B, T, E]
    A = -torch.exp(m.A_log)
    h = torch.zeros(x.shape[0], m.d_inner, m.d_state, dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        step_A = dt[:, t] if ts is None else dt[:, t] * ts[:, t, None]
        h = torch.exp(A * step_A[..., None]) * h + (dt[:, t, :, None] * Bm[:, t, None, :]) * xc[:, t, :, None]
        y = (h * Cm[:, t, None, :]).sum(-1) + m.D * xc[:, t]
        ys.append(y * F.silu(z[:, t]))
    return m.out_proj(torch.stack(ys, 1))


def test_mamba_matches_sequential_and_event_form():
    m, x = build("mamba"), x64()
    assert_close(m(x), mamba_sequential(m, x, None), atol=1e-10)
    ts = torch.rand(2, 11, dtype=F64) * 3  # irregular intervals between events
    y_event = m(x, integration_timesteps=ts)
    assert_close(y_event, mamba_sequential(m, x, ts), atol=1e-10)
    assert not torch.allclose(y_event, m(x))
    testing.check_prefill_then_steps(m, x, prefill=4, atol=1e-10, integration_timesteps=ts)
    testing.check_chunked_prefill(m, x, split=6, atol=1e-10, integration_timesteps=ts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mamba_unit_timesteps_are_exactly_the_regular_model(dtype):
    m = Mamba(D_MODEL, d_state=4).to(dtype)
    x = torch.randn(2, 70, D_MODEL, dtype=dtype)
    ones = torch.ones(2, 70, dtype=dtype)
    assert torch.equal(m(x, integration_timesteps=ones), m(x))
    cache_a, cache_b = m.allocate_inference_cache(2, 71), m.allocate_inference_cache(2, 71)
    m(x, cache_a)
    m(x, cache_b, integration_timesteps=ones)
    step = torch.randn(2, 1, D_MODEL, dtype=dtype)
    assert torch.equal(m.step(step, cache_a), m.step(step, cache_b, integration_timesteps=ones[:, :1]))
    assert torch.equal(m.step(step, cache_a), m.step(step, cache_b, integration_timesteps=ones[:, 0]))


@torch.no_grad()
def test_mamba_init():
    m = Mamba(32, d_state=5, dt_min=0.01, dt_max=0.05)
    assert m.dt_rank == 2 and m.d_inner == 64
    assert torch.equal(-torch.exp(m.A_log), -torch.arange(1, 6.0).expand(64, 5))  # S4D-real
    dt = F.softplus(m.dt_proj.bias.detach())  # inverse-softplus bias: dt lies in [dt_min, dt_max]
    assert float(dt.min()) >= 0.01 * (1 - 1e-5) and float(dt.max()) <= 0.05 * (1 + 1e-5)
    assert torch.all(m.D == 1) and m.A_log.dtype == torch.float32
    const = Mamba(32, dt_init="constant", dt_scale=2.0)
    assert torch.all(const.dt_proj.weight == 2.0 * const.dt_rank ** -0.5)


# RG-LRU ---------------------------------------------------------------------------------------------


def rglru_sequential(m: RGLRU, x: torch.Tensor) -> torch.Tensor:
    """Griffin's recurrent block, written from the paper's equations."""
    g = F.gelu(m.gate_proj(x), approximate="tanh")
    xc, _ = causal_conv1d_ref(m.in_proj(x), m.conv_weight, m.conv_bias)
    Wa, Wi = (torch.block_diag(*m.gate_weight[k]) for k in range(2))  # dense [E, E] block-diagonal
    r = torch.sigmoid(xc @ Wa + m.gate_bias[0].flatten())
    i = torch.sigmoid(xc @ Wi + m.gate_bias[1].flatten())
    a = torch.sigmoid(m.a_param) ** (m.c * r)
    h = torch.zeros(x.shape[0], m.d_inner, dtype=x.dtype)
    hs = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + torch.sqrt(1 - a[:, t] ** 2) * (i[:, t] * xc[:, t])
        hs.append(h)
    return m.out_proj(torch.stack(hs, 1) * g)


def test_rglru_matches_paper_equations():
    m, x = build("rglru"), x64()
    assert_close(m(x), rglru_sequential(m, x), atol=1e-10)


@torch.no_grad()
def test_rglru_initial_decay_range():
    m = RGLRU(256, c=8.0)
    a_c = m.decay_at_full_gate()  # a^c: the per-step decay at a fully open recurrence gate
    assert float(a_c.min()) >= 0.9 - 1e-6 and float(a_c.max()) <= 0.999 + 1e-6
    assert float(a_c.min()) < 0.91 and float(a_c.max()) > 0.99  # spread over the range (uniform)
    assert abs(float(a_c.mean()) - 0.9495) < 0.01
    assert_close(torch.sigmoid(m.a_param) ** 8, a_c, atol=1e-6)
    narrow = RGLRU(64, a_init_range=(0.5, 0.6), c=4.0).decay_at_full_gate()
    assert float(narrow.min()) >= 0.5 - 1e-6 and float(narrow.max()) <= 0.6 + 1e-6


def test_rglru_sqrt_gradient_is_bounded():
    x = torch.rand(6, dtype=F64) * 0.5 + 0.1
    assert torch.autograd.gradcheck(_SqrtBoundedGrad.apply, (x.requires_grad_(True),))
    tiny = torch.tensor([0.0, 1e-12], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(_SqrtBoundedGrad.apply(tiny).sum(), tiny)
    assert torch.all(torch.isfinite(g)) and float(g.max()) <= 1000.0 + 1e-9


# S7 -------------------------------------------------------------------------------------------------


def s7_sequential(m: S7, x: torch.Tensor) -> torch.Tensor:
    D, N = m.d_model, m.d_state
    xs = m.in_proj(x)
    lam, Bm, Cm, Dt, beta = m.x_proj(xs).split([N, N * D, D * N, D, N], dim=-1)
    h = torch.zeros(x.shape[0], N, dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        a = 1 - 1 / ((lam[:, t] + m.lambda_base) ** 2 + 0.5)
        h = a * h + (Bm[:, t].view(-1, N, D) @ xs[:, t, :, None])[..., 0] + beta[:, t]
        ys.append((Cm[:, t].view(-1, D, N) @ h[..., None])[..., 0] + (Dt[:, t] + m.d_base) * xs[:, t])
    y = torch.stack(ys, 1)
    return y * torch.sigmoid(m.gate_proj(F.gelu(y)))


def test_s7_matches_sequential():
    m, x = build("s7"), x64()
    assert_close(m(x), s7_sequential(m, x), atol=1e-10)


@torch.no_grad()
def test_s7_base_init_is_a_spread_of_timescales():
    m = S7(16, d_state=12)
    base = m.decay(m.lambda_base)
    assert base.unique().numel() == 12  # not a constant
    memory = 1 / (1 - base)  # steps of memory of each state, geometric over timescale_range
    assert_close(memory[0], torch.tensor(1.0), atol=1e-4)
    assert_close(memory[-1], torch.tensor(1000.0), atol=0.1)
    ratios = memory[1:] / memory[:-1]
    assert_close(ratios, ratios[0].expand_as(ratios), atol=1e-3)
    assert torch.all(torch.diff(base) > 0)
    # At initialisation the input-dependent part keeps each decay near its base.
    x = torch.randn(4, 20, 16)
    lam = m.x_proj(m.in_proj(x))[..., :12] + m.lambda_base
    assert float((m.decay(lam) - base).abs().mean()) < 0.05
    # The reparameterisation keeps every decay in [-1, 1) for any Lambda.
    anything = m.decay(torch.randn(1000) * 100)
    assert float(anything.min()) >= -1 and float(anything.max()) < 1


@pytest.mark.parametrize("name", MAIN)
def test_inside_a_block(name):
    """The seed-000 Block drives each mixer, cached prefill included."""
    block = seqblocks.Block(D_MODEL, mixer_cls=lambda d: FACTORIES[name](), mlp_cls=None,
                            norm_cls=seqblocks.RMSNorm).to(F64)
    x = x64()
    h, r = block(x)
    cache = block.allocate_inference_cache(2, 11)
    h1, r1 = block(x[:, :4], inference_params=cache)
    h2, r2 = block(x[:, 4:], inference_params=cache)
    assert_close(torch.cat((h1, h2), 1), h, atol=1e-10)
    assert_close(torch.cat((r1, r2), 1), r, atol=1e-12)


# Registry, construction, errors --------------------------------------------------------------------


def test_registry_and_exports():
    assert seqblocks.Mamba is Mamba and seqblocks.RGLRU is RGLRU and seqblocks.S7 is S7
    for key, cls in (("Mamba", Mamba), ("mamba", Mamba), ("RGLRU", RGLRU), ("rg_lru", RGLRU), ("S7", S7)):
        assert MIXERS.get(key) is cls
    m = MIXERS.get("mamba").from_config(BlockConfig(attention="mamba", d_model=16, d_state=8, bias=False))
    assert isinstance(m, Mamba) and m.d_state == 8 and m.d_model == 16
    r = MIXERS.get("rg_lru").from_config(BlockConfig(attention="rg_lru", d_model=16, mixer_kwargs={"expand": 2}))
    assert r.d_inner == 32
    s = MIXERS.get("s7").from_config(BlockConfig(attention="s7", d_model=16, d_state=4))
    y = run_mixer(s, torch.randn(1, 3, 16))
    assert y.shape == (1, 3, 16)


def test_errors():
    with pytest.raises(ValueError, match="discretization"):
        Mamba(8, discretization="euler")
    with pytest.raises(ValueError, match="dt_min"):
        Mamba(8, dt_min=0.2, dt_max=0.1)
    with pytest.raises(ValueError, match="a_init_range"):
        RGLRU(8, a_init_range=(0.9, 1.0))
    with pytest.raises(ValueError, match="num_heads"):
        RGLRU(8, num_heads=3)
    with pytest.raises(ValueError, match="timescale_range"):
        S7(8, timescale_range=(0.5, 10.0))
    m = Mamba(8)
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="integration_timesteps"):
        m(torch.randn(2, 3, 8), integration_timesteps=torch.ones(2, 4))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 3, 8), lengths=torch.tensor([4, 1]))
    with pytest.raises(TypeError, match="MambaCache"):
        m(torch.randn(2, 3, 8), RGLRU(8).allocate_inference_cache(2, 3))
    with pytest.raises(ValueError, match="batch_size"):
        m(torch.randn(2, 3, 8), m.allocate_inference_cache(3, 3))
    with pytest.raises(ValueError, match="step expects"):
        m.step(torch.randn(2, 2, 8), m.allocate_inference_cache(2, 3))
    for cls in (RGLRU, S7):  # no event form: the keyword is rejected, not ignored
        with pytest.raises(TypeError, match="integration_timesteps"):
            run_mixer(cls(8), torch.randn(1, 2, 8), inputs={"integration_timesteps": torch.ones(1, 2)})
    assert isinstance(m.allocate_inference_cache(2, 5), MambaCache)
