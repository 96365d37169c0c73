"""``rope_nonfinite_qkv``: the Triton kernel (interpreter on CPU, the GPU with ``-m gpu``) against the
PyTorch reference, which is checked against ``RotaryEmbedding`` and the non-finite helpers it fuses."""

from __future__ import annotations

import itertools

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

from seqblocks.layers.finite import nonfinite_tokens, zero_nonfinite
from seqblocks.layers.position import RotaryEmbedding
from seqblocks.ops._backend import triton_available
from seqblocks.ops.attention.prologue import rope_nonfinite_qkv

needs_kernel = pytest.mark.skipif(not INTERPRETER, reason="runs in the interpreter child process")

if not INTERPRETER and triton_available():

    def test_kernel_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)

SHAPES = [(4, 2, 16, 16, 16), (3, 1, 12, 8, 8), (2, 2, 8, 6, None)]  # H, Hkv, K, V, rotary_dim


def _inputs(B, T, H, Hkv, K, V, dtype, device="cpu", poison=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=g).to(device, dtype)
    k = torch.randn(B, T, Hkv, K, generator=g).to(device, dtype)
    v = torch.randn(B, T, Hkv, V, generator=g).to(device, dtype)
    if poison:
        q[0, 1, 0, 1] = float("nan")
        k[B - 1, T - 1, 0, K - 1] = float("inf")
        v[B - 1, 0, Hkv - 1, 0] = float("-inf")
    return q, k, v


def _angles(rope: RotaryEmbedding | None, x, B, T):
    if rope is None:
        return None, None
    pos = torch.arange(3, 3 + T)[None].expand(B, T).to(x.device)
    return rope.cos_sin(x, pos)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("H,Hkv,K,V,R", SHAPES)
def test_reference_is_rotary_then_the_nonfinite_rule(H, Hkv, K, V, R, interleaved):
    B, T = 2, 3
    q, k, v = _inputs(B, T, H, Hkv, K, V, torch.float64)
    rope = None if R is None else RotaryEmbedding(K, rotary_dim=R, interleaved=interleaved).double()
    cos, sin = _angles(rope, q, B, T)
    got = rope_nonfinite_qkv(q, k, v, cos, sin, rotary_dim=R, interleaved=interleaved, backend="torch")
    pos = torch.arange(3, 3 + T)[None].expand(B, T)
    qr, kr = (q, k) if rope is None else (rope.rotate(q, pos), rope.rotate(k, pos))
    want = (zero_nonfinite(qr), zero_nonfinite(kr), zero_nonfinite(v), nonfinite_tokens(qr), nonfinite_tokens(kr, v))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[3].tolist() == [[False, True, False], [False, False, False]]
    assert got[4].tolist() == [[False, False, False], [True, False, True]]


@needs_kernel
@pytest.mark.parametrize("dtype,interleaved,rows", list(itertools.product([torch.float32, torch.bfloat16],
                                                                          [False, True], [1, 2])))
@pytest.mark.parametrize("H,Hkv,K,V,R", SHAPES)
def test_triton_matches_reference(H, Hkv, K, V, R, dtype, interleaved, rows):
    B, T = 2, 3
    q, k, v = _inputs(B, T, H, Hkv, K, V, dtype)
    rope = None if R is None else RotaryEmbedding(K, rotary_dim=R, interleaved=interleaved)
    cos, sin = _angles(rope, q, B, T)
    if cos is not None and rows == 1:
        cos, sin = cos[:1], sin[:1]  # angles shared by the batch
    # a strided view, as the layers pass q / k / v split from one projection
    qkv = torch.cat((q.flatten(2), k.flatten(2), v.flatten(2)), dim=-1)
    qs, ks, vs = qkv.split((H * K, Hkv * K, Hkv * V), dim=-1)
    qs, ks, vs = qs.view(B, T, H, K), ks.view(B, T, Hkv, K), vs.view(B, T, Hkv, V)
    want = rope_nonfinite_qkv(qs, ks, vs, cos, sin, rotary_dim=R, interleaved=interleaved, backend="torch")
    got = rope_nonfinite_qkv(qs, ks, vs, cos, sin, rotary_dim=R, interleaved=interleaved, backend="triton")
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:  # rounding of the fp32 rotation (fused multiply-adds) may differ by an ulp of the output
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_auto_keeps_autograd_on_the_reference():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 2, 1, 8, 8, torch.float32, poison=False))
    rope = RotaryEmbedding(8)
    cos, sin = _angles(rope, q, 1, 2)
    out = rope_nonfinite_qkv(q, k, v, cos, sin)
    sum(o.sum() for o in out[:3]).backward()
    assert q.grad is not None and k.grad is not None and torch.equal(v.grad, torch.ones_like(v))


def test_errors_name_the_bad_argument():
    q, k, v = _inputs(1, 2, 2, 1, 8, 8, torch.float32, poison=False)
    cos, sin = _angles(RotaryEmbedding(8), q, 1, 2)
    with pytest.raises(ValueError, match="rotary_dim=3"):
        rope_nonfinite_qkv(q, k, v, cos, sin, rotary_dim=3)
    with pytest.raises(ValueError, match="both cos and sin"):
        rope_nonfinite_qkv(q, k, v, cos, None)
    with pytest.raises(ValueError, match="cos must have shape"):
        rope_nonfinite_qkv(q, k, v, cos[:, :1], sin[:, :1])
    with pytest.raises(ValueError, match="share B, T"):
        rope_nonfinite_qkv(q, k[:, :1], v, cos, sin)
    with pytest.raises(TypeError, match="floating point"):
        rope_nonfinite_qkv(q, k, v.long(), cos, sin)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,T,H,Hkv,K,R", [(8, 1, 32, 8, 128, 128), (2, 333, 12, 12, 64, 32), (1, 17, 16, 2, 96, 96)])
def test_gpu_kernel_matches_reference(B, T, H, Hkv, K, R, dtype):
    q, k, v = _inputs(B, T, H, Hkv, K, K, dtype, device="cuda")
    cos, sin = _angles(RotaryEmbedding(K, rotary_dim=R).cuda(), q, B, T)
    with torch.no_grad():
        want = rope_nonfinite_qkv(q, k, v, cos, sin, rotary_dim=R, backend="torch")
        got = rope_nonfinite_qkv(q, k, v, cos, sin, rotary_dim=R)
    for a, b in zip(got, want):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
