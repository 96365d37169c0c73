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

from seqblocks.ops.mamba3 import Mamba3State, Mamba3Tuning, mamba3, mamba3_ref  # noqa: E402

SM90_SHARED = 232448  # bytes of shared memory per block on an H200, as Triton measured it there


def _compile_sm90(fn, pointers, constexprs, num_warps, num_stages):
    """Compile ``fn`` for sm_90 on the host (no GPU): the cubin, its shared memory and register use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _resources(cubin: bytes, tmp_path) -> dict[str, int]:
    """REG / STACK of a cubin from Triton's bundled cuobjdump (STACK > 0: spilled registers)."""
    import os
    import re
    import subprocess

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("Triton's cuobjdump is not bundled: cannot read register use")
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED):(\d+)", out)}

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)

    @pytest.mark.parametrize(("R", "chunk"), [(1, 64), (4, 16)], ids=["siso", "mimo4"])
    def test_kernels_fit_sm90(R, chunk, tmp_path):
        """The chunked-scan kernels at mamba3-130m's / mamba_ssm's shapes (N 128, P 64) and the default
        ``Mamba3Tuning``, compiled for sm_90 down to a cubin: shared memory within the H200's limit,
        registers within 255 and (almost) no spills. Compile only, no GPU."""
        pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
        from seqblocks.ops.mamba3 import triton as m3t

        tuning, N, P = Mamba3Tuning(), 128, 64
        block_t, fbn, fbp, bbn, bbp = m3t._blocks(R, N, P, chunk, tuning)
        bf, f32 = "*bf16", "*fp32"
        fwd_ptrs = {n: f32 for n in ("ADT", "SCALE", "GAMMA", "H0", "Y", "HF", "HC")} | {n: bf for n in "QKX"}
        bwd_ptrs = {n: f32 for n in ("ADT", "SCALE", "GAMMA", "HC", "DY", "DHF", "DQ", "DK", "DX", "DADT", "DSCALE",
                                     "DGAMMA", "DH0")} | {n: bf for n in "QKX"}
        kernels = [
            (m3t._chunk_fwd_kernel, fwd_ptrs, {"R": R, "BLOCK_T": block_t, "BLOCK_N": fbn, "BLOCK_P": fbp,
                                               "STORE_STATES": True, "PREC": None, "STATE_PREC": "tf32"},
             tuning.fwd_num_warps),
            (m3t._chunk_bwd_kernel, bwd_ptrs, {"R": R, "BLOCK_T": block_t, "BLOCK_N": bbn, "BLOCK_P": bbp,
                                               "PREC": None, "STATE_PREC": "tf32"}, tuning.bwd_num_warps),
        ]
        for fn, ptrs, constexprs, warps in kernels:
            compiled = _compile_sm90(fn, ptrs, constexprs, warps, tuning.num_stages)
            assert compiled.metadata.shared <= SM90_SHARED, (fn.__name__, compiled.metadata.shared)
            res = _resources(compiled.asm["cubin"], tmp_path)
            assert res["REG"] <= 255 and res["STACK"] <= 512, (fn.__name__, res)

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

    def test_triton_split_state_equals_torch_path():
        """N and P wider than the tuning's slices (2 x 2 programs per head, rows 16): the split state and
        the partial sums over slices of N, forward and every gradient, against the chunked torch path."""
        g = torch.Generator().manual_seed(3)
        Bsz, T, H, P, N, S = 2, 37, 2, 32, 32, 8
        tuning = Mamba3Tuning(rows=16, block_p=16, block_n=16)
        for mimo, R in ((False, 1), (True, 2)):
            dt = torch.nn.functional.softplus(torch.randn(Bsz, T, H, generator=g) - 1)
            inputs = {"q": torch.randn(Bsz, T, R, 1, N, generator=g), "k": torch.randn(Bsz, T, R, 1, N, generator=g),
                      "v": torch.randn(Bsz, T, H, P, generator=g), "adt": -torch.rand(Bsz, T, H, generator=g) * dt,
                      "dt": dt, "trap": torch.randn(Bsz, T, H, generator=g),
                      "q_bias": torch.randn(H, R, N, generator=g), "k_bias": torch.randn(H, R, N, generator=g),
                      "angles": torch.randn(Bsz, T, H, S, generator=g),
                      "D": torch.randn(H, generator=g), "z": torch.randn(Bsz, T, H, P, generator=g)}
            if mimo:
                inputs.update({f"mimo_{n}": torch.randn(H, R, P, generator=g) for n in "vzo"})
            state = Mamba3State(torch.rand(Bsz, H, S, generator=g), torch.randn(Bsz, H, P, N, generator=g),
                                torch.randn(Bsz, R, H, N, generator=g), torch.randn(Bsz, H, P, generator=g))
            ref_out, ref_grads = outputs_and_grads(mamba3, {k: v.double() for k, v in inputs.items()},
                                                   Mamba3State(*(s.double() for s in state)), backend="torch",
                                                   chunk_size=16)
            out, grads = outputs_and_grads(mamba3, inputs, state, backend="triton", chunk_size=16, tuning=tuning)
            for name, a, b in zip(("y", "angle", "ssm", "k", "v"), out, ref_out):
                assert_scaled(a, b, 2e-4, name)
            for name, gr in ref_grads.items():
                assert_scaled(grads[name], gr, 2e-4, f"d{name}")

    def test_triton_bf16():
        inputs = make_inputs(2, 33, 1)
        args, _ = split(inputs)
        ref = mamba3_ref(*args)
        low = [t.to(torch.bfloat16) if name not in ("adt", "dt") else t.float()
               for name, t in zip(("q", "k", "v", "adt", "dt", "trap", "qb", "kb", "ang", "D", "z"), args)]
        y = mamba3(*low, backend="triton", chunk_size=16)
        assert y.dtype == torch.bfloat16
        assert_scaled(y, ref, 0.1, "y")
