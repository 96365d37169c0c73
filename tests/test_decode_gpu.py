"""Decode step kernels at real shapes and the cached CUDA-graph decoder, on a GPU.

Run on a GPU machine: ``python -m pytest tests/test_decode_gpu.py -m gpu -s``.

Shapes: B batch, E channels, N state.
"""

from __future__ import annotations

import pytest
import torch

from seqblocks import generate
from seqblocks.generation import clear_graph_cache, count_kernels, graph_decoder
from seqblocks.ops.scan.step import linear_scan_step, rglru_step
from seqblocks.ops.selective_scan import selective_state_update
from seqblocks.ops.selective_scan.step import conv_step
from seqblocks.presets import build_model, get_preset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEV = torch.device("cuda")


@pytest.mark.parametrize("Bsz", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mamba_step_kernels_at_130m_shapes(Bsz, dtype):
    E, N, W, R = 1536, 16, 4, 48
    xz = torch.randn(Bsz, 2 * E, device=DEV).to(dtype)
    x_dbl = torch.randn(Bsz, R + 2 * N, device=DEV).to(dtype)
    delta = torch.randn(Bsz, E, device=DEV).to(dtype)
    A_log = torch.log(torch.arange(1, N + 1, device=DEV, dtype=torch.float32)).expand(E, N).contiguous()
    D, bias = torch.randn(E, device=DEV), torch.randn(E, device=DEV) * 0.5 - 4
    state = torch.randn(Bsz, E, N, device=DEV)
    ref = state.clone()
    kw = {"D": D, "z": xz[:, E:], "delta_bias": bias, "delta_softplus": True}
    Bm, Cm = x_dbl[:, R:R + N], x_dbl[:, R + N:]
    y_ref = selective_state_update(ref, xz[:, :E], delta, -torch.exp(A_log), Bm, Cm, backend="torch", **kw)
    y = selective_state_update(state, xz[:, :E], delta, A_log, Bm, Cm, a_is_log=True, backend="triton", **kw)
    torch.testing.assert_close(state, ref, atol=1e-5, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), y_ref.float(), atol=tol, rtol=tol)

    weight, cbias = torch.randn(E, W, device=DEV).to(dtype), torch.randn(E, device=DEV).to(dtype)
    cs = torch.randn(Bsz, W - 1, E, device=DEV).to(dtype)
    cs_ref, off, off_ref = cs.clone(), torch.zeros(Bsz, dtype=torch.long, device=DEV), torch.zeros(
        Bsz, dtype=torch.long, device=DEV)
    c_ref = conv_step(xz[:, :E], cs_ref, weight, cbias, "silu", seqlen_offset=off_ref, backend="torch")
    c = conv_step(xz[:, :E], cs, weight, cbias, "silu", seqlen_offset=off, backend="triton")
    assert torch.equal(cs, cs_ref) and torch.equal(off, off_ref)
    torch.testing.assert_close(c.float(), c_ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("Bsz", [1, 8])
def test_scan_step_kernels_at_real_shapes(Bsz):
    E = 1536
    state = torch.randn(Bsz, E, device=DEV)
    x, ga, gi = (torch.randn(Bsz, E, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    a_param = torch.linspace(-3, 9, E, device=DEV)
    ref = state.clone()
    rglru_step(ref, x, ga, gi, a_param, 8.0, backend="torch")
    rglru_step(state, x, ga, gi, a_param, 8.0, backend="triton")
    # The kernel's exp / sqrt differ from CUDA's libdevice ones by an ulp or two, which the decay's
    # power (a ** (8 * r)) amplifies: one element in 12288 reached 1.2e-5 on an H200.
    torch.testing.assert_close(state, ref, atol=5e-5, rtol=1e-4)
    for complex_ in (False, True):
        dt = torch.complex64 if complex_ else torch.float32
        h = torch.randn(Bsz, 768, 64, device=DEV, dtype=dt)
        a = torch.randn(768, 64, device=DEV, dtype=dt) * 0.5
        b = torch.randn(Bsz, 768, 64, device=DEV, dtype=dt)
        want = linear_scan_step(h, a, b, inplace=False, backend="torch")
        got = linear_scan_step(h, a, b, inplace=False, backend="triton")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Bsz", [1, 8, 4096])
@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_add_norm_kernel_at_real_shapes(Bsz, residual_in_fp32):
    from seqblocks.ops.add_norm import add_norm

    x = torch.randn(Bsz, 1, 768, device=DEV, dtype=torch.bfloat16)
    res = torch.randn(Bsz, 1, 768, device=DEV, dtype=torch.float32 if residual_in_fp32 else torch.bfloat16)
    w = torch.randn(768, device=DEV, dtype=torch.bfloat16)
    kw = {"is_rms": True, "residual_in_fp32": residual_in_fp32, "prenorm": True}
    with torch.no_grad():
        y_ref, r_ref = add_norm(x, res, w, backend="torch", **kw)
        y, r = add_norm(x, res, w, backend="triton", **kw)
    assert torch.equal(r, r_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)


def _model(preset="mamba-130m", n_layer=4, vocab=1024):
    cfg = dict(get_preset(preset)["model"], vocab_size=vocab)
    cfg["n_layer"] = n_layer
    cfg["mixer_types"] = cfg["mixer_types"][:n_layer]
    torch.manual_seed(0)
    return build_model(cfg, device=DEV, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("preset", ["mamba-130m", "hybrid-130m"])
def test_graph_tokens_equal_eager_and_the_cached_graph_equals_a_fresh_capture(preset):
    model = _model(preset, n_layer=6)
    clear_graph_cache()
    p1 = torch.randint(0, 1024, (8, 9), device=DEV)
    p2 = torch.randint(0, 1024, (8, 9), device=DEV)
    eager = generate(model, p2, 40, temperature=0).tokens
    generate(model, p1, 40, temperature=0, cuda_graph=True)  # captures
    decoder = graph_decoder(model, 8, 49, DEV)
    reused = generate(model, p2, 40, temperature=0, cuda_graph=True).tokens  # replays the same graph
    assert graph_decoder(model, 8, 49, DEV) is decoder
    clear_graph_cache(model)
    fresh = generate(model, p2, 40, temperature=0, cuda_graph=True).tokens
    assert torch.equal(reused, fresh)
    assert torch.equal(fresh, eager)
    # Sampled tokens: the sampling options live outside the graph and change freely between calls.
    a = generate(model, p2, 20, temperature=1.0, top_p=0.9, seed=5, cuda_graph=True).tokens
    b = generate(model, p2, 20, temperature=1.0, top_p=0.9, seed=5).tokens
    assert torch.equal(a, b)


def test_changed_parameters_are_picked_up():
    model = _model()
    prompt = torch.randint(0, 1024, (1, 5), device=DEV)
    generate(model, prompt, 16, temperature=0, cuda_graph=True)
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.A_log.mul_(1.5)
            layer.mixer.out_proj.weight.mul_(-1)
    graph = generate(model, prompt, 16, temperature=0, cuda_graph=True).tokens
    assert torch.equal(graph, generate(model, prompt, 16, temperature=0).tokens)
    model.float()
    graph = generate(model, prompt, 16, temperature=0, cuda_graph=True).tokens
    assert torch.equal(graph, generate(model, prompt, 16, temperature=0).tokens)


def test_kernels_per_captured_step():
    model = _model(n_layer=24, vocab=50277)
    decoder = graph_decoder(model, 1, 64, DEV)
    kernels = count_kernels(decoder.graph.replay)
    print(f"\nmamba-130m captured decode step: {kernels} kernels ({kernels / 24:.1f} per layer)")
    assert 0 < kernels <= 24 * 12 + 16
