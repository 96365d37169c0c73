"""selective_scan / selective_state_update: fast path vs the sequential reference, forward and backward."""

from __future__ import annotations

import importlib

import pytest
import torch

from seqblocks.ops.selective_scan import selective_scan, selective_scan_ref, selective_state_update
from seqblocks.ops.selective_scan.torch import CHUNK, default_chunk, selective_scan_torch
from seqblocks.testing import assert_close

# The op's function shadows its package under ``seqblocks.ops``, so import the submodule by name.
ss_torch = importlib.import_module("seqblocks.ops.selective_scan.torch")
F64 = torch.float64


def make(B=2, T=13, D=4, N=3, *, complex_=False, groups=None, dtype=F64, grad=False):
    """Random, well-conditioned inputs (decaying A) as a dict of keyword arguments."""
    shape = (B, T, N) if groups is None else (B, T, groups, N)
    A = -(torch.rand(D, N, dtype=dtype) + 0.3)
    Bm, Cm = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    if complex_:
        A = torch.complex(A, torch.randn(D, N, dtype=dtype))
        Bm = torch.complex(Bm, torch.randn(shape, dtype=dtype))
        Cm = torch.complex(Cm, torch.randn(shape, dtype=dtype))
    args = dict(u=torch.randn(B, T, D, dtype=dtype), delta=torch.randn(B, T, D, dtype=dtype) * 0.5,
                A=A, B=Bm, C=Cm, D=torch.randn(D, dtype=dtype), z=torch.randn(B, T, D, dtype=dtype),
                delta_bias=torch.randn(D, dtype=dtype) * 0.3)
    if grad:
        for v in args.values():
            v.requires_grad_(True)
    return args


@pytest.mark.parametrize("discretization", ["mamba", "zoh", "bilinear", "dirac"])
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("groups", [None, 2])
def test_matches_reference_forward_backward(discretization, complex_, groups):
    args = make(complex_=complex_, groups=groups, grad=True)
    h0 = torch.randn(2, 4, 3, dtype=args["A"].dtype, requires_grad=True)
    extra = dict(delta_softplus=True, discretization=discretization, initial_state=h0,
                 lengths=torch.tensor([13, 6]))
    y1, h1 = selective_scan_torch(**args, **extra, chunk_size=4)  # odd T over several chunks
    y2, h2 = selective_scan_ref(**args, **extra)
    assert_close(y1, y2, atol=1e-10)
    assert_close(h1, h2, atol=1e-10)
    cot = (torch.randn_like(y1), torch.randn_like(h1))
    leaves = list(args.values()) + [h0]
    g1 = torch.autograd.grad((y1, h1), leaves, cot)
    g2 = torch.autograd.grad((y2, h2), leaves, cot)
    for name, a, b in zip(list(args) + ["initial_state"], g1, g2):
        assert_close(a, b, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("T", [1, 7, 65])
def test_odd_lengths_default_chunk(T):
    args = make(T=T)
    y1, h1 = selective_scan(**args, delta_softplus=True)
    y2, h2 = selective_scan_ref(**args, delta_softplus=True)
    assert_close(y1, y2, atol=1e-10)
    assert_close(h1, h2, atol=1e-10)


@pytest.mark.parametrize("shape", ["BT", "BTD"])
def test_separate_A_step(shape):
    args = make(grad=True)
    dA = torch.rand((2, 13) if shape == "BT" else (2, 13, 4), dtype=F64, requires_grad=True) * 2
    extra = dict(delta_softplus=True, delta_A=dA, discretization="zoh")
    y1, h1 = selective_scan_torch(**args, **extra, chunk_size=5)
    y2, h2 = selective_scan_ref(**args, **extra)
    assert_close(y1, y2, atol=1e-10)
    assert_close(h1, h2, atol=1e-10)
    cot = torch.randn_like(y1)
    assert_close(torch.autograd.grad(y1, dA, cot)[0], torch.autograd.grad(y2, dA, cot)[0], atol=1e-9)


def test_delta_A_equal_to_step_is_the_plain_scan():
    args = make()
    step = torch.nn.functional.softplus(args["delta"] + args["delta_bias"])
    y1, h1 = selective_scan(**{**args, "delta": step, "delta_bias": None}, delta_A=step)
    y2, h2 = selective_scan(**{**args, "delta": step, "delta_bias": None})
    assert torch.equal(y1, y2) and torch.equal(h1, h2)


def test_varlen_packed_matches_separate_runs():
    args = make(B=1, T=12, grad=True)
    cu = torch.tensor([0, 5, 5, 12])
    h0 = torch.randn(3, 4, 3, dtype=F64, requires_grad=True)
    y, h = selective_scan(**args, delta_softplus=True, initial_state=h0, cu_seqlens=cu)
    yr, hr = selective_scan_ref(**args, delta_softplus=True, initial_state=h0, cu_seqlens=cu)
    assert_close(y, yr, atol=1e-10)
    assert_close(h, hr, atol=1e-10)
    for i in range(3):
        s, e = int(cu[i]), int(cu[i + 1])
        part = {k: (v[:, s:e] if v.dim() >= 3 else v) for k, v in args.items()}
        ys, hs = selective_scan(**part, delta_softplus=True, initial_state=h0[i : i + 1])
        assert_close(y[:, s:e], ys, atol=1e-10)
        assert_close(h[i : i + 1], hs, atol=1e-10)
    cot = (torch.randn_like(y), torch.randn_like(h))
    leaves = list(args.values()) + [h0]
    for a, b in zip(torch.autograd.grad((y, h), leaves, cot), torch.autograd.grad((yr, hr), leaves, cot)):
        assert_close(a, b, atol=1e-9)


def test_lengths_final_state_and_zero_padding():
    args = make()
    lengths = torch.tensor([13, 0])
    y, h = selective_scan(**args, lengths=lengths)
    assert torch.all(y[1] == 0)
    assert torch.all(h[1] == 0)  # an empty row keeps its (zero) initial state
    alone, h_alone = selective_scan(**{k: (v[:1] if v.dim() == 3 and v.shape[0] == 2 else v)
                                       for k, v in args.items()})
    assert_close(y[:1], alone, atol=1e-12)
    assert_close(h[:1], h_alone, atol=1e-12)


def test_gradcheck_custom_function():
    for complex_ in (False, True):
        args = make(B=1, T=5, D=2, N=2, complex_=complex_, grad=True)
        h0 = torch.randn(1, 2, 2, dtype=args["A"].dtype, requires_grad=True)
        names = list(args)

        def fn(*tensors, names=names):
            kw = dict(zip(names, tensors[:-1]))
            return selective_scan_torch(**kw, initial_state=tensors[-1], delta_softplus=True,
                                        lengths=torch.tensor([4]), chunk_size=2)

        assert torch.autograd.gradcheck(fn, (*args.values(), h0), atol=1e-6)


def test_memory_bounded_by_chunk(monkeypatch):
    """The fast path only ever scans [B, chunk, D, N] blocks: the full state is never formed."""
    seen = []
    real = ss_torch.linear_scan

    def spy(a, b, h0=None, **kw):
        seen.append(tuple(b.shape))
        return real(a, b, h0, **kw)

    monkeypatch.setattr(ss_torch, "linear_scan", spy)
    args = make(B=2, T=40, D=4, N=3, grad=True)
    y, h = selective_scan_torch(**args, chunk_size=8)
    (y.sum() + h.sum()).backward()
    assert seen and all(s[1] <= 8 for s in seen), seen
    assert len(seen) == 2 * 5  # five chunks forward, five recomputed in backward


def test_state_update_matches_one_step_scan():
    for groups, complex_ in ((None, False), (2, True)):
        args = make(B=2, T=1, complex_=complex_, groups=groups)
        h0 = torch.randn(2, 4, 3, dtype=args["A"].dtype)
        dA = torch.rand(2, 1, dtype=F64)
        y_scan, h_scan = selective_scan(**args, delta_softplus=True, initial_state=h0, delta_A=dA,
                                        discretization="bilinear")
        state = h0.clone()
        one = {k: (v[:, 0] if k in ("u", "delta", "z", "B", "C") else v) for k, v in args.items()}
        y = selective_state_update(state, **one, delta_softplus=True, delta_A=dA[:, 0],
                                   discretization="bilinear")
        assert_close(y, y_scan[:, 0], atol=1e-12)
        assert_close(state, h_scan, atol=1e-12)


def test_low_precision_inputs_fp32_state():
    args = make(T=20, dtype=torch.float32)
    y32, h32 = selective_scan(**args, delta_softplus=True)
    for dt in (torch.bfloat16, torch.float16):
        low = {k: v.to(dt) for k, v in args.items()}
        y, h = selective_scan(**low, delta_softplus=True)
        assert y.dtype == dt and h.dtype == torch.float32
        assert_close(y, y32, atol=0.05 * float(y32.abs().max()))


def test_empty_sequence():
    args = make(T=0)
    h0 = torch.randn(2, 4, 3, dtype=F64)
    y, h = selective_scan(**args, initial_state=h0)
    assert y.shape == (2, 0, 4) and torch.equal(h, h0)


def test_errors():
    args = make()
    with pytest.raises(ValueError, match="discretization"):
        selective_scan(**args, discretization="euler")
    with pytest.raises(ValueError, match="delta"):
        selective_scan(**{**args, "delta": args["delta"][:, :3]})
    with pytest.raises(ValueError, match="groups"):
        g = make(groups=3)
        selective_scan(**{**args, "B": g["B"], "C": g["C"]})
    with pytest.raises(ValueError, match="lengths"):
        selective_scan(**args, lengths=torch.tensor([14, 1]))
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(**args, initial_state=torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="cu_seqlens"):
        selective_scan(**args, cu_seqlens=torch.tensor([0, 13]))
    with pytest.raises(TypeError, match="u must be real"):
        selective_scan(**{**args, "u": args["u"].to(torch.complex128)})
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**args, backend="cuda")
    with pytest.raises(ValueError, match="no Triton kernel"):
        selective_scan(**args, backend="triton")


def test_default_chunk_is_cache_sized_on_cpu_and_fixed_on_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_chunk(64, 128, 16, cpu) == 4  # 131072 state elements per step
    assert default_chunk(16, 128, 16, cpu) == 16
    assert default_chunk(1, 512, 16, cpu) == CHUNK  # capped
    assert default_chunk(1024, 1024, 64, cpu) == 4  # floored
    assert default_chunk(64, 128, 16, gpu) == CHUNK
    for b in (1, 3, 7, 50):
        c = default_chunk(b, 96, 12, cpu)
        assert 4 <= c <= CHUNK and c & (c - 1) == 0
