"""The Triton kernels of ``mamba3``'s chunked scan against the sequential reference, forward and every
gradient, on the CPU under Triton's interpreter (``tests/interpreter.py`` says why the cases run in a
child process): SISO and MIMO, odd lengths with small chunks, initial state, lengths, cu_seqlens, bf16.

Shapes: B batch, T time, R rank, H heads, P head width, N state, S angles.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from test_mamba3 import make_inputs, outputs_and_grads, random_state, split  # noqa: E402

from seqblocks.ops.mamba3 import mamba3, mamba3_ref  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)

    @pytest.mark.gpu
    @pytest.mark.parametrize(("mimo", "R", "chunk"), [(False, 1, 64), (True, 4, 16)], ids=["siso", "mimo"])
    def test_triton_bf16_matches_torch_path_at_real_shape(mimo, R, chunk):
        """bf16 tl.dot operands (the interpreter runs them in fp32): B 2, T 2048, H 24, P 64, N 128."""
        torch.manual_seed(0)
        Bsz, T, H, P, N = 2, 2048, 24, 64, 128
        dev, bf = "cuda", torch.bfloat16
        dt = torch.nn.functional.softplus(torch.randn(Bsz, T, H, device=dev) - 3)
        args = [torch.randn(Bsz, T, R, 1, N, device=dev, dtype=bf), torch.randn(Bsz, T, R, 1, N, device=dev, dtype=bf),
                torch.randn(Bsz, T, H, P, device=dev, dtype=bf), -torch.rand(Bsz, T, H, device=dev) * dt, dt,
                torch.randn(Bsz, T, H, device=dev, dtype=bf), torch.ones(H, R, N, device=dev),
                torch.ones(H, R, N, device=dev), torch.randn(Bsz, T, H, N // 4, device=dev), torch.ones(H, device=dev),
                torch.randn(Bsz, T, H, P, device=dev, dtype=bf)]
        kw = {}
        if mimo:
            kw = {f"mimo_{n}": torch.rand(H, R, P, device=dev) for n in ("v", "z", "o")}
        leaves = [a.clone().requires_grad_() for a in args]
        y = mamba3(*leaves, **kw, backend="triton", chunk_size=chunk)
        cot = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, cot)
        ref_leaves = [a.clone().requires_grad_() for a in args]
        ref = mamba3(*ref_leaves, **kw, backend="torch", chunk_size=chunk)
        ref_grads = torch.autograd.grad(ref, ref_leaves, cot)
        tol = 3e-2
        assert (y.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
        for g, r in zip(grads, ref_grads):
            assert (g.float() - r.float()).abs().max() <= tol * r.float().abs().max()

else:

    def _fp32(inputs):
        return {k: v.float() for k, v in inputs.items()}

    def _check(inputs, state, atol=2e-4, **kw):
        ref_out, ref_grads = outputs_and_grads(mamba3_ref, inputs, state, **kw)
        st = None if state is None else type(state)(*(s.float() for s in state))
        out, grads = outputs_and_grads(mamba3, _fp32(inputs), st, backend="triton", chunk_size=16, **kw)
        for name, a, b in zip(("y", "angle", "ssm", "k", "v"), out, ref_out):
            assert_scaled(a, b, atol, name)
        for name, g in ref_grads.items():
            assert_scaled(grads[name], g, atol, f"d{name}")

    def assert_scaled(a, b, atol, name):
        scale = max(b.abs().max().item(), 1.0)
        err = (a.double() - b).abs().max().item()
        assert err <= atol * scale, f"{name}: max error {err:.2e} > {atol:.0e} * {scale:.2f}"

    @pytest.mark.parametrize(("mimo", "R"), [(False, 1), (True, 2)], ids=["siso", "mimo"])
    @pytest.mark.parametrize("T", [1, 7, 63, 65])
    def test_triton_equals_reference(mimo, R, T):
        _check(make_inputs(2, T, R, mimo=mimo), random_state(2, R) if T != 63 else None)

    def test_triton_lengths_and_cu_seqlens():
        _check(make_inputs(3, 21, 1), random_state(3, 1), lengths=torch.tensor([21, 0, 9]))
        _check(make_inputs(1, 20, 2, mimo=True), random_state(3, 2), cu_seqlens=torch.tensor([0, 5, 17, 20]))

    def test_triton_bf16():
        inputs = make_inputs(2, 33, 1)
        args, _ = split(inputs)
        ref = mamba3_ref(*args)
        low = [t.to(torch.bfloat16) if name not in ("adt", "dt") else t.float()
               for name, t in zip(("q", "k", "v", "adt", "dt", "trap", "qb", "kb", "ang", "D", "z"), args)]
        y = mamba3(*low, backend="triton", chunk_size=16)
        assert y.dtype == torch.bfloat16
        assert_scaled(y, ref, 0.1, "y")
