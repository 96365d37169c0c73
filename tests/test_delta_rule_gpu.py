"""GPU checks of the Triton delta-rule kernels at real shapes against the PyTorch chunked path in float64.

Marked ``gpu`` (excluded from the default run): ``python -m pytest -m gpu tests/test_delta_rule_gpu.py``.

Shapes: B batch, T time, H heads, K key width, V value width, N packed sequences.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


def _inputs(B, T, H, K, V, dtype, gen):
    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    beta = torch.rand(B, T, H, device="cuda", generator=gen)
    g = -torch.rand(B, T, H, device="cuda", generator=gen) * 0.3
    return [t.to(dtype) for t in (q, k, v, g, beta)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("mode", ["dense", "cu_seqlens"])
# (16, 16) / (16, 48): narrow heads (MQAR's d_model 64 / 4 heads), whose 16-wide tiles once made Triton 3.6
# address shared memory out of range on sm_90 (triton._MIN_TILE).
@pytest.mark.parametrize(("K", "V"), [(128, 128), (256, 512), (16, 16), (16, 48)])
def test_delta_rule_triton_gpu(dtype, gated, mode, K, V):
    from seqblocks.ops.delta_rule import delta_rule, gated_delta_rule

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, H = (2, 2048, 4) if mode == "dense" else (1, 4000, 4)
    q, k, v, g, beta = _inputs(B, T, H, K, V, dtype, gen)
    cu = None if mode == "dense" else torch.tensor([0, 17, 1000, 1001, 3333, 4000], device="cuda")
    N = B if cu is None else cu.numel() - 1
    h0 = torch.randn(N, H, K, V, device="cuda", generator=gen) * 0.1
    leaves = [t.requires_grad_() for t in (q, k, v, g, beta, h0)]
    wide = [t.detach().double().requires_grad_() for t in leaves]

    def run(ts, backend):
        qq, kk, vv, gg, bb, hh = ts
        kw = {"initial_state": hh, "output_final_state": True, "cu_seqlens": cu, "use_qk_l2norm": True,
              "backend": backend}
        return gated_delta_rule(qq, kk, vv, gg, bb, **kw) if gated else delta_rule(qq, kk, vv, bb, **kw)

    o, final = run(leaves, "triton")
    o_ref, final_ref = run(wide, "torch")
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    assert _rel(o, o_ref) < tol and _rel(final, final_ref) < tol
    go, gf = torch.randn_like(o_ref), torch.randn_like(final_ref)
    got = torch.autograd.grad((o, final), leaves if gated else [t for i, t in enumerate(leaves) if i != 3],
                              (go.to(o.dtype), gf.float()))
    want = torch.autograd.grad((o_ref, final_ref), wide if gated else [t for i, t in enumerate(wide) if i != 3],
                               (go, gf))
    for a, b in zip(got, want):
        assert _rel(a, b) < tol * 3


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_step_triton_gpu(gated):
    from seqblocks.ops.delta_rule import gated_delta_rule_step

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, K, V = 64, 16, 128, 128
    q, k, v, g, beta = (t[:, 0] for t in _inputs(B, 1, H, K, V, torch.bfloat16, gen))
    state = torch.randn(B, H, K, V, device="cuda", generator=gen)
    ref_state = state.clone()
    o = gated_delta_rule_step(state, q, k, v, g if gated else None, beta, use_qk_l2norm=True, backend="triton")
    o_ref = gated_delta_rule_step(ref_state, q, k, v, g if gated else None, beta, use_qk_l2norm=True,
                                  backend="torch")
    assert _rel(o, o_ref) < 1e-2 and _rel(state, ref_state) < 1e-5


def test_gated_deltanet_mixer_runs_the_kernel_and_matches_torch():
    from seqblocks.layers.mixers import GatedDeltaNet

    torch.manual_seed(0)
    layer = GatedDeltaNet(1024, head_dim=128, num_heads=8, num_v_heads=16, expand_v=1.0, device="cuda",
                          dtype=torch.bfloat16)
    x = torch.randn(2, 1500, 1024, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    cache = layer.allocate_inference_cache(2, 2048)
    y_pre = layer(x[:, :1499], cache)
    y_last = layer(x[:, 1499:], cache)
    assert _rel(torch.cat([y_pre, y_last], dim=1), y) < 3e-2
