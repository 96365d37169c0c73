"""The Triton kernels of ``mamba3``'s chunked scan against the sequential reference, forward and every
gradient, on the CPU under Triton's interpreter (``tests/interpreter.py`` says why the cases run in a
child process): SISO and MIMO, odd lengths with small chunks, initial state, lengths, cu_seqlens, bf16.

Shapes: B batch, T time, R rank, H heads, P head width, N state, S angles.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter
from layouts import time_innermost

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from test_mamba3 import TIMED, make_inputs, outputs_and_grads, random_state, split  # noqa: E402

from seqblocks.ops.mamba3 import Mamba3State, Mamba3Tuning, mamba3, mamba3_ref, mamba3_step  # noqa: E402

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
        registers within 255 and (almost) no spills. Compile only, no GPU. The decode step (SISO and
        MIMO 4) compiles with the SISO case."""
        pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
        from seqblocks.ops.mamba3 import step_triton
        from seqblocks.ops.mamba3 import triton as m3t

        tuning, N, P = Mamba3Tuning(), 128, 64
        block_t, fbn, fbp, bbn, bbp = m3t._blocks(R, N, P, chunk, tuning)
        bf, f32 = "*bf16", "*fp32"
        fwd_ptrs = {n: f32 for n in ("ADT", "SCALE", "GAMMA", "H0", "D", "MZ", "MO", "Y", "YPRE", "HF", "HC")}
        bwd_ptrs = {n: f32 for n in ("ADT", "SCALE", "GAMMA", "HC", "D", "DY", "DHF", "DQ", "DK", "DX", "DADT",
                                     "DSCALE", "DGAMMA", "DH0")}
        epi_ptrs = {n: f32 for n in ("D", "MZ", "MO", "YPRE", "DY", "DYPRE", "DZ", "DD", "DMZ", "DMO")}
        for ptrs in (fwd_ptrs, bwd_ptrs, epi_ptrs):
            ptrs.update({n: bf for n in "XZ"} | {n: f32 for n in ("Q", "K", "QB", "KB", "TH")})
        epilogue = {"HAS_D": True, "HAS_Z": True, "MIMO": R > 1, "FOLD": R > 1}  # everything the layer uses
        kernels = [
            (m3t._chunk_fwd_kernel, fwd_ptrs, {"R": R, "BLOCK_T": block_t, "BLOCK_N": fbn, "BLOCK_P": fbp,
                                               "STORE_STATES": True, "PREC": None, "STATE_PREC": "tf32",
                                               "STORE_YPRE": True, "HALVES": R > 1, **epilogue},
             tuning.fwd_num_warps),
            (m3t._chunk_bwd_kernel, bwd_ptrs, {"R": R, "BLOCK_T": block_t, "BLOCK_N": bbn, "BLOCK_P": bbp,
                                               "PREC": None, "STATE_PREC": "tf32", "HAS_D": True,
                                               "HALVES": R > 1}, tuning.bwd_num_warps),
            (m3t._epilogue_bwd_kernel, epi_ptrs, {"R": R, "BLOCK_T": block_t, "BLOCK_P": bbp, "WRITE_DYPRE": True,
                                                  **epilogue}, 4),
            (m3t._unrotate_kernel, {n: f32 for n in ("Q", "K", "QB", "KB", "TH", "DQ", "DK", "DQP", "DKP", "DTH")},
             {"R": R, "BLOCK_T": m3t._unrotate_rows(R), "BLOCK_N": fbn, "HALVES": R > 1}, 4),
        ]
        if R == 1:
            step_ptrs = {n: f32 for n in ("ANGLE", "SSM", "KST", "VST", "ADT", "DT", "TRAP", "QB", "KB", "ANG", "D",
                                          "MV", "MZ", "MO")} | {n: bf for n in ("Q", "K", "V", "Z", "Y")}
            for mimo in (False, True):
                kernels.append((step_triton._mamba3_step_kernel, step_ptrs,
                                {"R": 4 if mimo else 1, "HALVES": mimo, "HAS_D": True, "HAS_Z": True, "MIMO": mimo,
                                 "FOLD": mimo, "BLOCK_N": N, "BLOCK_P": tuning.step_block_p}, tuning.step_num_warps))
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

    @pytest.mark.gpu
    @pytest.mark.parametrize("R", [1, 4], ids=["siso", "mimo4"])
    def test_triton_decode_step_at_real_shape(R):
        """The decode-step kernel against the PyTorch step at B 8, H 24, P 64, N 128, bf16 inputs, 4 steps."""
        torch.manual_seed(0)
        Bsz, H, P, N, S, dev, bf = 8, 24, 64, 128, 32, "cuda", torch.bfloat16
        mimo = R > 1
        state = Mamba3State(torch.rand(Bsz, H, S, device=dev) * 6, torch.randn(Bsz, H, P, N, device=dev),
                            torch.randn(Bsz, R, H, N, device=dev), torch.randn(Bsz, H, P, device=dev))
        ours, theirs = Mamba3State(*(s.clone() for s in state)), Mamba3State(*(s.clone() for s in state))
        kw = {f"mimo_{n}": torch.rand(H, R, P, device=dev) for n in "vzo"} if mimo else {}
        for _ in range(4):
            dt = torch.nn.functional.softplus(torch.randn(Bsz, H, device=dev) - 3)
            args = [torch.randn(Bsz, R, 1, N, device=dev, dtype=bf), torch.randn(Bsz, R, 1, N, device=dev, dtype=bf),
                    torch.randn(Bsz, H, P, device=dev, dtype=bf), -torch.rand(Bsz, H, device=dev) * dt, dt,
                    torch.randn(Bsz, H, device=dev), torch.ones(H, R, N, device=dev), torch.ones(H, R, N, device=dev),
                    torch.randn(Bsz, H, S, device=dev), torch.ones(H, device=dev),
                    torch.randn(Bsz, H, P, device=dev, dtype=bf)]
            y = mamba3_step(ours, *args, **kw, backend="triton")
            ref = mamba3_step(theirs, *args, **kw, backend="torch")
            assert (y.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
            for a, b in zip(ours, theirs):
                assert (a - b).abs().max() <= 1e-4 * b.abs().max()

else:

    def _fp32(inputs):
        return {k: v.float() for k, v in inputs.items()}

    def _check(inputs, state, atol=2e-4, chunk_size=16, **kw):
        ref_out, ref_grads = outputs_and_grads(mamba3_ref, inputs, state, **kw)
        st = None if state is None else type(state)(*(s.float() for s in state))
        out, grads = outputs_and_grads(mamba3, _fp32(inputs), st, backend="triton", chunk_size=chunk_size, **kw)
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

    @pytest.mark.parametrize(("mimo", "R"), [(False, 1), (True, 2)], ids=["siso", "mimo"])
    def test_triton_groups(mimo, R):
        """Two groups of q / k over four heads: the kernels read each head's group raw and bias and rotate it."""
        _check(make_inputs(2, 19, R, G=2, mimo=mimo, heads=4), random_state(2, R, heads=4))

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

    @pytest.mark.parametrize(("mimo", "drop"), [(False, ("D", "z")), (False, ("D",)), (True, ("mimo_o",)),
                                                 (True, ("z", "mimo_z", "mimo_o"))],
                             ids=["siso-bare", "siso-gate", "mimo-ranks", "mimo-ranks-nogate"])
    def test_triton_epilogue_options(mimo, drop):
        """The fused epilogue without the skip, the gate or the fold, forward and every gradient."""
        R = 2 if mimo else 1
        inputs = make_inputs(2, 19, R, mimo=mimo)
        names = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z")

        def run(fn, cast, **kw):
            leaves = {k: cast(v).requires_grad_() for k, v in inputs.items() if k not in drop}
            args = [leaves.get(k) for k in names]
            y = fn(*args, **{k: leaves[k] for k in ("mimo_v", "mimo_z", "mimo_o") if k in leaves}, **kw)
            cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            return y, dict(zip(leaves, torch.autograd.grad((y * cot.to(y.dtype)).sum(), list(leaves.values()))))

        ref, ref_grads = run(mamba3_ref, lambda t: t.detach().clone())
        y, grads = run(mamba3, lambda t: t.detach().float(), backend="triton", chunk_size=16)
        assert y.shape == ref.shape
        assert_scaled(y, ref, 2e-4, "y")
        for name, g in ref_grads.items():
            assert_scaled(grads[name], g, 2e-4, f"d{name}")

    @pytest.mark.parametrize(("mimo", "R", "G", "drop"),
                             [(False, 1, 1, ()), (True, 2, 1, ()), (False, 1, 2, ("D", "z")), (True, 4, 1, ("mimo_o",)),
                              (True, 2, 2, ("z", "mimo_z"))],
                             ids=["siso", "mimo", "siso-groups-bare", "mimo4-ranks", "mimo-groups-nogate"])
    def test_triton_decode_step_equals_torch_step(mimo, R, G, drop):
        """The one-launch decode step against the PyTorch step over 3 + 3 tokens from a random state, in
        place (y, angle, h, k, v), P walked in slices of 2, fp32 then bf16 inputs with an fp32 state."""
        heads = 4 if G == 2 else 2
        inputs = make_inputs(3, 5, R, G, mimo, dtype=torch.float32, heads=heads)
        for name in drop:
            inputs.pop(name)
        state = Mamba3State(*(s.float() for s in random_state(3, R, heads=heads)))
        ours, theirs = Mamba3State(*(s.clone() for s in state)), Mamba3State(*(s.clone() for s in state))
        tuning = Mamba3Tuning(step_block_p=2)
        for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            for t in range(3):
                step = {k: (v[:, t] if k in TIMED else v) for k, v in inputs.items()}
                step = {k: (v.to(dtype) if k in ("q", "k", "v", "z") else v) for k, v in step.items()}
                args = [step.get(k) for k in ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D",
                                              "z")]
                kwargs = {k: step[k] for k in ("mimo_v", "mimo_z", "mimo_o") if k in step}
                y = mamba3_step(ours, *args, **kwargs, backend="triton", tuning=tuning)
                ref = mamba3_step(theirs, *args, **kwargs, backend="torch")
                assert y.dtype == dtype and y.shape == ref.shape
                assert_scaled(y.float(), ref.double(), atol, f"y[{t}]")
                for name, a, b in zip(Mamba3State._fields, ours, theirs):
                    assert_scaled(a, b.double(), 1e-5, f"{name}[{t}]")


    @pytest.mark.parametrize(("T", "chunk", "mimo", "R", "case"), [(20, 64, False, 1, "strong"),
                                                                   (45, 16, True, 2, "strong"),
                                                                   (45, 16, False, 1, "strided")])
    def test_triton_partial_chunk_strong_decay_and_strided_inputs(T, chunk, mimo, R, case):
        """Forward and every gradient against the float64 reference where the sequence ends inside a chunk
        (20 of the default 64; 45 = 16 + 16 + 13) under decay of -4 .. -10 a step (padded rows must repeat
        the last valid cumulative decay, or exp of their differences overflows into NaN as in the delta
        rule's kernels), and with q, k, v, adt, dt, trap, angles, z as views with T innermost (which the
        kernels must not read as if contiguous)."""
        inputs = make_inputs(2, T, R, mimo=mimo)
        if case == "strong":
            g = torch.Generator().manual_seed(3)
            inputs["adt"] = -(torch.rand(inputs["adt"].shape, generator=g, dtype=torch.float64) * 6 + 4)
        else:  # the float32 copies keep the strides
            for n in ("q", "k", "v", "adt", "dt", "trap", "angles", "z"):
                inputs[n] = time_innermost(inputs[n])
        _check(inputs, random_state(2, R), chunk_size=chunk)

    def test_triton_bf16():
        inputs = make_inputs(2, 33, 1)
        args, _ = split(inputs)
        ref = mamba3_ref(*args)
        low = [t.to(torch.bfloat16) if name not in ("adt", "dt") else t.float()
               for name, t in zip(("q", "k", "v", "adt", "dt", "trap", "qb", "kb", "ang", "D", "z"), args)]
        y = mamba3(*low, backend="triton", chunk_size=16)
        assert y.dtype == torch.bfloat16
        assert_scaled(y, ref, 0.1, "y")
