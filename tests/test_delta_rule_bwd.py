"""The chunked backward of the Triton delta-rule kernels (``ops/delta_rule/triton.py``): every gradient
against the sequential reference's in float64, random cotangents on the output and the final state.

Under Triton's interpreter (``tests/interpreter.py`` says why the cases run in a child process), at the
forward's chunk of 64, in the paths the host picks by shape and dtype that
``tests/test_delta_rule_pipeline.py`` leaves out: backward 3 split over key blocks with the L2 norm
(dq finished by backward 4), several masked V tiles, fp16 inputs (fp32 buffers, the halved tiles), bf16
packed sequences, no initial state (no dh0), an unused final state, and the plain delta rule.

Shapes: B batch, T time, H heads, K key width, V value width, N packed sequences.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from seqblocks.ops.delta_rule import delta_rule, gated_delta_rule, gated_delta_rule_ref  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)

else:

    def _inputs(T, K, V, *, H=1, gated=True, rows=1, h0=True, seed=0):
        """Keys of norm ~1.5 at any K (wider unnormalised keys make I - b k k^T expand), beta in [0, 1],
        log decays in [-0.5, 0]."""
        gen = torch.Generator().manual_seed(seed)
        t = {"q": torch.randn(1, T, H, K, generator=gen), "k": torch.randn(1, T, H, K, generator=gen) * K ** -0.5,
             "v": torch.randn(1, T, H, V, generator=gen), "beta": torch.rand(1, T, H, generator=gen)}
        if gated:
            t["g"] = -torch.rand(1, T, H, generator=gen) * 0.5
        if h0:
            t["initial_state"] = torch.randn(rows, H, K, V, generator=gen)
        return t

    def _check(t, atol, *, dtype=torch.float32, final=True, **kw):
        """The Triton op's output, final state and every input's gradient against the reference's in
        float64; ``final=False`` leaves the final state out of the loss (its cotangent is zero)."""
        leaves = {n: (x if n == "initial_state" else x.to(dtype)).requires_grad_(True) for n, x in t.items()}
        wide = {n: x.detach().double().requires_grad_(True) for n, x in leaves.items()}
        gate = [leaves["g"]] if "g" in t else []
        op = gated_delta_rule if gate else delta_rule
        o, s = op(leaves["q"], leaves["k"], leaves["v"], *gate, leaves["beta"], backend="triton",
                  initial_state=leaves.get("initial_state"), output_final_state=True, **kw)
        o_ref, s_ref = gated_delta_rule_ref(wide["q"], wide["k"], wide["v"], wide.get("g"), wide["beta"],
                                            initial_state=wide.get("initial_state"), output_final_state=True, **kw)
        torch.testing.assert_close(o.double(), o_ref, atol=atol, rtol=atol)
        torch.testing.assert_close(s.double(), s_ref, atol=atol, rtol=atol)
        gen = torch.Generator().manual_seed(1)
        go = torch.randn(o.shape, generator=gen)
        gs = torch.randn(s.shape, generator=gen)
        if final:
            got = torch.autograd.grad((o, s), list(leaves.values()), (go.to(o.dtype), gs))
            want = torch.autograd.grad((o_ref, s_ref), list(wide.values()), (go.double(), gs.double()))
        else:
            got = torch.autograd.grad(o, list(leaves.values()), go.to(o.dtype))
            want = torch.autograd.grad(o_ref, list(wide.values()), go.double())
        for n, a, b in zip(leaves, got, want):
            assert a.dtype == leaves[n].dtype, (n, a.dtype)
            torch.testing.assert_close(a.double(), b, atol=atol * 10, rtol=atol * 10,
                                       msg=lambda m, n=n: f"grad of {n}: {m}")

    @pytest.mark.parametrize("gated", [False, True])
    def test_two_key_blocks_with_l2norm(gated):
        # K = 160: backward 3 runs three 64-wide key blocks (the last masked), backward 4 finishes dq
        # through the L2 norm
        _check(_inputs(70, 160, 24, gated=gated), 1e-4, use_qk_l2norm=True)

    def test_masked_value_tiles_and_scale():
        # V = 80: backward 3's 64-wide V tiles (two, the second masked), backward 1 / 4 at 64
        _check(_inputs(90, 32, 80, H=2), 1e-4, scale=0.3)

    def test_fp16_inputs():
        # fp32 buffers with backward 3 / 4's halved tiles (32 wide); outputs and gradients in fp16
        _check(_inputs(67, 64, 48), 2e-2, dtype=torch.float16, use_qk_l2norm=True)

    @pytest.mark.parametrize("gated", [False, True])
    def test_bf16_packed_sequences(gated):
        # documents of 40, 0, 70 and 1 tokens: spare chunk slots, an empty document, an odd tail
        t = _inputs(111, 32, 32, gated=gated, rows=4)
        _check(t, 3e-2, dtype=torch.bfloat16, use_qk_l2norm=True, cu_seqlens=torch.tensor([0, 40, 40, 110, 111]))

    @pytest.mark.parametrize("gated", [False, True])
    def test_no_initial_state_and_unused_final_state(gated):
        # no dh0 (backward 2 stores none); the final state's cotangent zero
        _check(_inputs(75, 16, 16, H=2, gated=gated, h0=False), 1e-4, final=False)
