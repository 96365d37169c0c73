"""The grouped matrix product (``seqblocks.ops.grouped_gemm``) against its per-group reference:
forward and both gradients with random cotangents, every backend; the Triton kernels under
Triton's interpreter (``tests/interpreter.py``); ``torch._grouped_mm`` and CUDA cases marked gpu.

Shapes: M rows (sorted by group), K in-features, N out-features, E groups.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

from seqblocks.ops.grouped_gemm import grouped_mm, grouped_mm_ref
from seqblocks.ops.grouped_gemm.torch import grouped_mm_torch, grouped_wgrad_torch


def _offsets(sizes, device="cpu"):
    return torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)


def _case(sizes, K, N, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    M = sum(sizes)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(device, dtype)
    w = torch.randn(len(sizes), K, N, generator=g, dtype=torch.float64).to(device, dtype)
    dy = torch.randn(M, N, generator=g, dtype=torch.float64).to(device, dtype)
    return x, w, _offsets(sizes, device), dy


def _grads(fn, x, w, offs, dy, **kw):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w, offs, **kw)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


def _compare(x, w, offs, dy, atol, **kw):
    y, dx, dw = _grads(grouped_mm, x, w, offs, dy, **kw)
    yr, dxr, dwr = _grads(grouped_mm_ref, x.double(), w.double(), offs, dy.double())
    assert y.dtype == x.dtype and y.shape == yr.shape
    for got, want in ((y, yr), (dx, dxr), (dw, dwr)):
        scale = max(1.0, want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= atol * scale


if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        pytest.importorskip("triton")
        run_file_under_interpreter(__file__)

    @pytest.mark.parametrize("sizes", [[3, 0, 5, 1], [7], [0, 0, 4], [2, 2, 2, 2, 2, 2]])
    def test_torch_path_matches_reference_fp64(sizes):
        x, w, offs, dy = _case(sizes, 6, 5)
        _compare(x, w, offs, dy, 1e-12, backend="torch")

    def test_reference_is_per_group_loop():
        x, w, offs, _ = _case([2, 3], 4, 3)
        y = grouped_mm_ref(x, w, offs)
        assert torch.equal(y[:2], x[:2] @ w[0]) and torch.equal(y[2:], x[2:] @ w[1])

    def test_padded_wgrad_zero_for_empty_group():
        x, _, offs, dy = _case([3, 0, 2], 4, 3)
        dw = grouped_wgrad_torch(x, dy, offs)
        assert torch.equal(dw[1], torch.zeros_like(dw[1]))
        torch.testing.assert_close(dw[2], x[3:].T @ dy[3:])

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_torch_path_low_precision(dtype):
        x, w, offs, dy = _case([5, 3, 0, 8], 16, 8, dtype=dtype)
        _compare(x, w, offs, dy, 3e-2 if dtype != torch.float32 else 1e-5, backend="torch")

    def test_native_grouped_mm_on_cpu_bf16():
        """torch._grouped_mm (the sm90 path) also runs on CPU bf16 in recent torch: the same numbers."""
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("this torch has no _grouped_mm")
        x, w, offs, dy = _case([5, 3, 0, 8], 16, 8, dtype=torch.bfloat16)
        try:
            y = grouped_mm_torch(x, w, offs, native=True)
        except RuntimeError as err:  # a CPU build without the fallback
            pytest.skip(f"torch._grouped_mm does not run on CPU here: {err}")
        torch.testing.assert_close(y.double(), grouped_mm_ref(x.double(), w.double(), offs), atol=0.1, rtol=2e-2)
        dw = grouped_wgrad_torch(x, dy, offs, native=True)
        from seqblocks.ops.grouped_gemm import grouped_wgrad_ref
        torch.testing.assert_close(dw.double(), grouped_wgrad_ref(x.double(), dy.double(), offs), atol=0.2, rtol=2e-2)

    def test_errors_name_the_bad_value():
        x, w, offs, _ = _case([2, 3], 4, 3)
        with pytest.raises(ValueError, match="w must be"):
            grouped_mm(x, w[:, :3], offs)
        with pytest.raises(ValueError, match="offsets"):
            grouped_mm(x, w, torch.tensor([2, 4], dtype=torch.int32))
        with pytest.raises(TypeError, match="integer"):
            grouped_mm(x, w, offs.float())
        with pytest.raises(TypeError, match="dtype"):
            grouped_mm(x, w.float(), offs)
        with pytest.raises(ValueError, match="backend"):
            grouped_mm(x, w, offs, backend="cuda")

else:
    triton = pytest.importorskip("triton")

    @pytest.mark.parametrize("sizes,K,N", [([3, 0, 40, 1], 20, 36), ([0, 5, 0], 40, 17)])
    def test_triton_matches_reference(sizes, K, N):
        x, w, offs, dy = _case(sizes, K, N, dtype=torch.float32)
        _compare(x, w, offs, dy, 1e-5, backend="triton")

    def test_triton_bf16():
        x, w, offs, dy = _case([9, 0, 20], 16, 24, dtype=torch.bfloat16)
        _compare(x, w, offs, dy, 3e-2, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_reference(backend, dtype):
    if backend == "triton":
        pytest.importorskip("triton")
    sizes = [300, 0, 17, 1024, 5, 128, 64, 2]
    x, w, offs, dy = _case(sizes, 256, 512, dtype=dtype, device="cuda")
    _compare(x, w, offs, dy, 3e-2 if dtype == torch.bfloat16 else 1e-4, backend=backend)
