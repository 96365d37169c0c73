"""The Triton selective scan compiled on a GPU at real shapes (excluded from the default run: ``-m gpu``).

Checked against the float64 reference (moderate shapes, every option) and the PyTorch path in fp32
(mamba-130m's scan shape), forward and backward with random cotangents on y and the final state, for
the default tuning and other checkpoint intervals, with both kernel designs ("ring" and "chunked");
the chunked kernels against the ring kernels at mamba-130m's shape; and what the forward saves for
the backward.

Shapes: B batch, T time, D channels, N state, G groups.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("triton", reason="Triton is not installed")

from seqblocks.ops.selective_scan import SelectiveScanTuning, selective_scan, selective_scan_ref  # noqa: E402


def _inputs(Bsz, T, D, N, dtype, G=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, device="cuda", generator=g) * scale + shift

    gs = (G,) if G else ()
    return dict(u=r(Bsz, T, D).to(dtype), delta=r(Bsz, T, D, scale=0.5, shift=-1.0).to(dtype),
                A=-torch.rand(D, N, device="cuda", generator=g) * 4 - 0.5, B=r(Bsz, T, *gs, N).to(dtype),
                C=r(Bsz, T, *gs, N).to(dtype), D=r(D), z=r(Bsz, T, D).to(dtype), delta_bias=r(D, scale=0.3))


def _grads(fn, ins, gy, gh):
    leaves = {k: v.detach().requires_grad_() for k, v in ins.items()}
    y, hT = fn(leaves)
    grads = torch.autograd.grad([y, hT], list(leaves.values()), [gy.to(y.dtype), gh])
    return y, hT, dict(zip(leaves, grads))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kernel", ["ring", "chunked"])
@pytest.mark.parametrize("ckpt_t", [None, 16, 2048])
def test_mamba_130m_shape_against_the_torch_path(ckpt_t, kernel):
    Bsz, T, D, N = 8, 2048, 1536, 16
    ins = _inputs(Bsz, T, D, N, torch.bfloat16)
    gy = torch.randn(Bsz, T, D, device="cuda")
    gh = torch.randn(Bsz, D, N, device="cuda")
    tuning = SelectiveScanTuning(kernel=kernel, ckpt_t=ckpt_t)

    def run(backend, upcast):
        def fn(t):
            t = {k: (v.float() if upcast else v) for k, v in t.items()}
            return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                  delta_bias=t["delta_bias"], delta_softplus=True, backend=backend,
                                  tuning=tuning if backend == "triton" else None)
        return fn

    y, hT, g = _grads(run("triton", False), ins, gy, gh)
    yr, hTr, gr = _grads(run("torch", True), ins, gy, gh)
    assert _rel(y, yr) < 1e-2 and _rel(hT, hTr) < 1e-3
    for k in g:
        assert _rel(g[k], gr[k]) < 2e-2, (k, _rel(g[k], gr[k]))


@pytest.mark.parametrize("kernel", ["ring", "chunked"])
@pytest.mark.parametrize(("G", "dtype"), [(None, torch.float32), (4, torch.float32), (None, torch.bfloat16)])
def test_every_option_against_the_reference(G, dtype, kernel):
    Bsz, T, D, N = 3, 1000, 256, 16
    ins = _inputs(Bsz, T, D, N, dtype, G=G, seed=1)
    lengths = torch.tensor([1000, 517, 3], device="cuda")
    h0 = torch.randn(Bsz, D, N, device="cuda")
    gy = torch.randn(Bsz, T, D, device="cuda")
    gh = torch.randn(Bsz, D, N, device="cuda")

    def run(op, upcast):
        def fn(t):
            t = {k: (v.double() if upcast else v) for k, v in t.items()}
            return op(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], delta_bias=t["delta_bias"],
                      delta_softplus=True, initial_state=h0.double() if upcast else h0, lengths=lengths)
        return fn

    tuning = SelectiveScanTuning(kernel=kernel)
    y, hT, g = _grads(run(lambda *a, **k: selective_scan(*a, backend="triton", tuning=tuning, **k), False), ins, gy,
                      gh)
    yr, hTr, gr = _grads(run(selective_scan_ref, True), ins, gy, gh.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _rel(y, yr) < tol and _rel(hT, hTr) < tol
    for k in g:
        assert _rel(g[k], gr[k]) < 3 * tol, (k, _rel(g[k], gr[k]))


@pytest.mark.parametrize("tuning", [dict(), dict(chunk_t=8, fwd_chunk_t=16, bwd_maxnreg=255),
                                    dict(chunk_t=2, bwd_block_d=16, ckpt_t=8), dict(fwd_block_d=4, bwd_num_warps=2)])
def test_chunked_kernels_against_the_ring_kernels(tuning):
    """mamba-130m's scan (B8, T2048, D1536, N16, bf16, D skip, z gate, softplus + bias): the chunked
    kernels, at their defaults and other tunings, against the ring kernels, forward and backward."""
    Bsz, T, D, N = 8, 2048, 1536, 16
    ins = _inputs(Bsz, T, D, N, torch.bfloat16, seed=2)
    gy = torch.randn(Bsz, T, D, device="cuda")
    gh = torch.randn(Bsz, D, N, device="cuda")

    def run(t):
        def fn(x):
            return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                  delta_bias=x["delta_bias"], delta_softplus=True, backend="triton", tuning=t)
        return fn

    y, hT, g = _grads(run(SelectiveScanTuning(kernel="chunked", **tuning)), ins, gy, gh)
    yr, hTr, gr = _grads(run(SelectiveScanTuning()), ins, gy, gh)
    assert _rel(y, yr) < 1e-2 and _rel(hT, hTr) < 1e-3
    for k in g:
        assert _rel(g[k], gr[k]) < 2e-2, (k, _rel(g[k], gr[k]))


@pytest.mark.parametrize("kernel", ["ring", "chunked"])
def test_forward_saves_one_state_per_checkpoint_interval(kernel):
    """At mamba-130m's scan shape the saved state is [B, T / 128, D, N] fp32 (12.6 MB), not one per
    16 steps (101 MB): counted over every tensor the op saves that is not an input."""
    Bsz, T, D, N = 8, 2048, 1536, 16
    ins = {k: v.requires_grad_() for k, v in _inputs(Bsz, T, D, N, torch.bfloat16).items()}
    known = {t.untyped_storage().data_ptr() for t in ins.values()}
    extra = {}

    def pack(t):
        p = t.untyped_storage().data_ptr()
        if p not in known:
            extra[p] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], ins["D"], ins["z"],
                       delta_bias=ins["delta_bias"], delta_softplus=True, backend="triton",
                       tuning=SelectiveScanTuning(kernel=kernel))
    assert sum(extra.values()) < 16e6, sorted(extra.values())
