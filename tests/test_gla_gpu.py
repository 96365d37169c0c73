"""GPU checks of the GLA / simple GLA Triton kernels at real shapes: against the chunked PyTorch path
in float64 (forward, final state and every input gradient), against fla 0.6.0's kernels where
installed, and the decode step against the one-token sequence.

Marked ``gpu`` (excluded from the default run): ``python -m pytest -m gpu tests/test_gla_gpu.py``.

Shapes: B batch, T time, H heads, K key width, V value width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from seqblocks.ops.gla import gla, gla_step, simple_gla, simple_gla_step  # noqa: E402

OPS = {"gla": (gla, gla_step), "simple_gla": (simple_gla, simple_gla_step)}


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


def _inputs(name, B, T, H, K, V, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    q, k, v = r(B, T, H, K) * K**-0.5, r(B, T, H, K) * K**-0.5, r(B, T, H, V)
    g = F.logsigmoid(r(*((B, T, H) if name == "simple_gla" else (B, T, H, K))) + 3) / 4
    h0 = r(B, H, K, V) * 0.1
    return [t.to(dtype) for t in (q, k, v, g)], h0


def _run(fn, inputs, h0, cu=None, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    h = h0.detach().clone().requires_grad_()
    o, s = fn(*leaves, initial_state=h, output_final_state=True, cu_seqlens=cu, **kw)
    gen = torch.Generator(device="cuda").manual_seed(7)
    do, ds = torch.randn(o.shape, device="cuda", generator=gen), torch.randn(s.shape, device="cuda", generator=gen)
    (o.double() * do).sum().add((s.double() * ds).sum()).backward()
    return [o, s] + [t.grad for t in leaves] + [h.grad]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(2, 4096, 4, 128, 128), (1, 1000, 3, 64, 96), (4, 32, 4, 16, 16)])
def test_triton_equals_torch_path(name, dtype, tol, shape):
    fn = OPS[name][0]
    inputs, h0 = _inputs(name, *shape, dtype)
    ours = _run(fn, inputs, h0[: shape[0]], backend="triton")
    ref = _run(fn, [t.double() for t in inputs], h0[: shape[0]].double(), backend="torch")
    names = ["o", "final", "dq", "dk", "dv", "dg", "dh0"]
    errors = {n: _rel(a, b) for n, a, b in zip(names, ours, ref, strict=True)}
    assert all(e < tol for e in errors.values()), errors


@pytest.mark.parametrize("name", OPS)
def test_triton_packed(name):
    fn = OPS[name][0]
    cu = torch.tensor([0, 100, 100, 1337, 3000], device="cuda", dtype=torch.int32)
    inputs, h0 = _inputs(name, 1, 3000, 4, 128, 128, torch.bfloat16)
    h0 = torch.randn(4, 4, 128, 128, device="cuda") * 0.1
    ours = _run(fn, inputs, h0, cu, backend="triton")
    ref = _run(fn, [t.double() for t in inputs], h0.double(), cu, backend="torch")
    # bf16 inputs: the tolerance of the unpacked bf16 case (an H200 run measured dg of simple_gla at
    # 2.1e-2, every other output under 3.3e-3)
    names = ["o", "final", "dq", "dk", "dv", "dg", "dh0"]
    errors = {n: _rel(a, b) for n, a, b in zip(names, ours, ref, strict=True)}
    assert all(e < 3e-2 for e in errors.values()), errors


@pytest.mark.parametrize("name", OPS)
def test_triton_matches_fla(name):
    fla_chunk = pytest.importorskip("fla.ops.gla" if name == "gla" else "fla.ops.simple_gla")
    inputs, h0 = _inputs(name, 2, 2048, 4, 128, 128, torch.bfloat16)
    ours = _run(OPS[name][0], inputs, h0, backend="triton")
    fla_fn = fla_chunk.chunk_gla if name == "gla" else fla_chunk.chunk_simple_gla
    theirs = _run(lambda q, k, v, g, **kw: fla_fn(q, k, v, g, initial_state=kw["initial_state"],
                                                  output_final_state=True), inputs, h0)
    # Both against the float64 PyTorch path: ours must be as close as fla's kernel is (a first H200 run
    # had ours within 3e-2 of float64 but not within 3e-2 of fla, so compare each with the exact value).
    ref = _run(OPS[name][0], [t.double() for t in inputs], h0.double(), backend="torch")
    for i, (a, b, r) in enumerate(zip(ours, theirs, ref, strict=True)):
        ours_err, fla_err = _rel(a, r), _rel(b, r)
        assert ours_err <= max(1.25 * fla_err, 3e-2), (i, ours_err, fla_err)


@pytest.mark.parametrize("name", OPS)
def test_triton_step(name):
    fn, step = OPS[name]
    inputs, h0 = _inputs(name, 16, 1, 16, 128, 128, torch.bfloat16)
    o, s = fn(*inputs, initial_state=h0, output_final_state=True, backend="torch")
    state = h0.clone()
    o_step = step(state, *(t[:, 0] for t in inputs), backend="triton")
    assert _rel(o_step, o[:, 0]) < 1e-2 and _rel(state, s) < 1e-5


def test_strong_decay_stays_finite():
    inputs, h0 = _inputs("gla", 1, 4096, 2, 128, 128, torch.float32)
    inputs[3] = torch.full_like(inputs[3], -8.0)  # e^-512 over a chunk
    ours = _run(gla, inputs, h0[:1], backend="triton")
    ref = _run(gla, [t.double() for t in inputs], h0[:1].double(), backend="torch")
    assert all(torch.isfinite(a).all() for a in ours)
    names = ["o", "final", "dq", "dk", "dv", "dg", "dh0"]
    errors = {n: _rel(a, b) for n, a, b in zip(names, ours, ref, strict=True)}
    # dg comes from the identity dG_t = q_t dq_t - k_t dk_t and suffix sums (as fla's kernels get it too):
    # under this decay the true dg (norm 6e-3) is a difference of terms of norm ~27, so dq / dk's fp32
    # rounding leaves it ~20 % off relative to itself. Measure it against the size of those terms (an H200
    # run: 5.1e-5; the chunked PyTorch path, which never forms the difference, 2.1e-7).
    q, k = (t.double() for t in inputs[:2])
    terms = ((q * ref[2]).norm() + (k * ref[3]).norm()).item()
    errors["dg"] = (ours[5].double() - ref[5]).norm().item() / terms
    assert all(e < 1e-4 for e in errors.values()), errors


@pytest.mark.parametrize("name", ["gla", "retnet"])
def test_mixer_on_cuda_equals_cpu(name):
    from seqblocks.layers.mixers import GatedLinearAttention, MultiScaleRetention

    torch.manual_seed(0)
    cls = GatedLinearAttention if name == "gla" else MultiScaleRetention
    cpu = cls(512, num_heads=4)
    gpu = cls(512, num_heads=4, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 700, 512)
    xg = x.cuda().requires_grad_()
    xc = x.clone().requires_grad_()
    y_gpu, y_cpu = gpu(xg), cpu(xc)  # "auto": Triton on CUDA, the chunked PyTorch path on CPU
    cot = torch.randn_like(y_cpu)
    y_gpu.backward(cot.cuda())
    y_cpu.backward(cot)
    assert _rel(y_gpu.cpu(), y_cpu) < 1e-4 and _rel(xg.grad.cpu(), xc.grad) < 1e-4
    cache = gpu.allocate_inference_cache(2, 701)
    with torch.no_grad():
        gpu(x[:, :699].cuda(), cache)
        step = gpu(x[:, 699:].cuda(), cache)  # the decode step kernel
    assert _rel(step.cpu(), y_cpu[:, 699:].detach()) < 1e-4
