"""The delta rule and the gated delta rule: the chunked PyTorch path against the sequential reference,
forward and every input gradient (random cotangents on o and the final state), over odd lengths and
small chunks, initial states, packed sequences, the q / k L2 norm and bf16; the reference against
fla's naive implementations; the decode step against one step of the op; input checks."""

from __future__ import annotations

import os

import pytest
import torch

from seqblocks.ops.delta_rule import (
    delta_rule,
    delta_rule_ref,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_ref,
    gated_delta_rule_step,
)


def inputs(Bsz=2, T=11, H=3, K=5, V=4, *, gated=True, h0=False, rows=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    t = {"q": r(Bsz, T, H, K), "k": r(Bsz, T, H, K, scale=K ** -0.5), "v": r(Bsz, T, H, V),
         "beta": torch.rand(Bsz, T, H, generator=gen, dtype=torch.float64)}
    if gated:
        t["g"] = -torch.rand(Bsz, T, H, generator=gen, dtype=torch.float64) * 0.7
    if h0:
        t["initial_state"] = r(Bsz if rows is None else rows, H, K, V)
    return {n: x.to(dtype) for n, x in t.items()}


def call(fn, t, **kw):
    t = dict(t)
    args = [t.pop(n) for n in ("q", "k", "v", "g", "beta") if n in t]
    return fn(*args, output_final_state=True, **t, **kw)


def check(t, gated, atol=1e-10, rtol=1e-8, **kw):
    """Forward and every gradient of the chunked op against the reference."""
    fast, ref = (gated_delta_rule, gated_delta_rule_ref) if gated else (delta_rule, delta_rule_ref)
    leaves = {n: x.clone().requires_grad_(True) for n, x in t.items()}
    ref_kw = {n: v for n, v in kw.items() if n != "chunk_size"}
    o, final = call(fast, leaves, **kw)
    o_ref, final_ref = call(ref, leaves, **ref_kw)
    torch.testing.assert_close(o, o_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(final, final_ref, atol=atol, rtol=rtol)
    gen = torch.Generator().manual_seed(1)
    go = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    gf = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    names = list(leaves)
    got = torch.autograd.grad((o.float() * go.float()).sum() + (final * gf).sum(), [leaves[n] for n in names])
    want = torch.autograd.grad((o_ref.float() * go.float()).sum() + (final_ref * gf).sum(),
                               [leaves[n] for n in names])
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol * 10, msg=lambda m, n=n: f"grad of {n}: {m}")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(("T", "chunk_size"), [(1, 4), (7, 4), (63, 16), (65, 16), (65, 64)])
def test_chunked_equals_reference_forward_and_grads(T, chunk_size, gated):
    check(inputs(T=T, gated=gated, h0=True), gated, chunk_size=chunk_size)


@pytest.mark.parametrize("gated", [False, True])
def test_l2norm_scale_and_no_initial_state(gated):
    t = inputs(T=19, gated=gated)
    t["k"] = t["k"] * 4  # l2norm makes the scale of q and k irrelevant
    check(t, gated, chunk_size=8, use_qk_l2norm=True, scale=0.3)


@pytest.mark.parametrize("gated", [False, True])
def test_packed_sequences_restart_and_match_the_reference(gated):
    cu = torch.tensor([0, 5, 5, 22, 30])  # an empty sequence included
    t = inputs(Bsz=1, T=30, gated=gated, h0=True, rows=4)
    check(t, gated, chunk_size=8, cu_seqlens=cu)
    # each packed sequence equals the same sequence run alone
    o, final = call(gated_delta_rule if gated else delta_rule, t, cu_seqlens=cu, chunk_size=8)
    for i in range(4):
        lo, hi = int(cu[i]), int(cu[i + 1])
        alone = {n: (x[i:i + 1] if n == "initial_state" else x[:, lo:hi]) for n, x in t.items()}
        o_i, f_i = call(gated_delta_rule if gated else delta_rule, alone, chunk_size=8)
        torch.testing.assert_close(o[:, lo:hi], o_i)
        torch.testing.assert_close(final[i:i + 1], f_i)


@pytest.mark.parametrize("gated", [False, True])
def test_bf16_inputs_accumulate_in_fp32(gated):
    t = inputs(T=40, gated=gated, h0=True, dtype=torch.bfloat16)
    t["initial_state"] = t["initial_state"].float()
    fast = gated_delta_rule if gated else delta_rule
    o, final = call(fast, t, chunk_size=16)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    o_ref, final_ref = call(gated_delta_rule_ref if gated else delta_rule_ref, t)
    torch.testing.assert_close(o.float(), o_ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(final, final_ref, atol=1e-4, rtol=1e-4)
    check(t, gated, atol=2e-2, rtol=2e-2, chunk_size=16)


def test_matches_fla_naive_recurrences():
    fla_gated = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    fla_delta = pytest.importorskip("fla.ops.delta_rule.naive")
    t = inputs(T=33, h0=True, dtype=torch.float32)
    o, final = gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["initial_state"],
                                output_final_state=True, chunk_size=8)
    o_fla, final_fla = fla_gated.naive_recurrent_gated_delta_rule(
        t["q"], t["k"], t["v"], t["beta"], t["g"], initial_state=t["initial_state"], output_final_state=True)
    torch.testing.assert_close(o, o_fla, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_fla, atol=1e-5, rtol=1e-5)
    o_chunk, final_chunk = fla_gated.naive_chunk_gated_delta_rule(
        t["q"], t["k"], t["v"], t["g"], t["beta"], chunk_size=16, initial_state=t["initial_state"],
        output_final_state=True)
    torch.testing.assert_close(o, o_chunk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_chunk, atol=1e-5, rtol=1e-5)
    # fla's ungated naive recurrence is head-first ([B, H, T, K])
    o, final = delta_rule(t["q"], t["k"], t["v"], t["beta"], initial_state=t["initial_state"],
                          output_final_state=True, chunk_size=8)
    o_fla, final_fla = fla_delta.delta_rule_recurrence(
        *(x.transpose(1, 2) for x in (t["q"], t["k"], t["v"], t["beta"])), initial_state=t["initial_state"])
    torch.testing.assert_close(o, o_fla.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_fla, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("l2", [False, True])
def test_decode_steps_equal_the_full_sequence(gated, l2):
    t = inputs(T=6, gated=gated, h0=True)
    o, final = call(gated_delta_rule if gated else delta_rule, t, use_qk_l2norm=l2, chunk_size=4)
    state = t["initial_state"].clone()
    for i in range(6):
        args = (state, t["q"][:, i], t["k"][:, i], t["v"][:, i])
        if gated:
            o_i = gated_delta_rule_step(*args, t["g"][:, i], t["beta"][:, i], use_qk_l2norm=l2)
        else:
            o_i = delta_rule_step(*args, t["beta"][:, i], use_qk_l2norm=l2)
        torch.testing.assert_close(o_i, o[:, i])
    torch.testing.assert_close(state, final)


def test_nonfinite_key_poisons_only_later_outputs_of_its_head():
    t = inputs(Bsz=1, T=20, h0=True)
    t["k"][0, 9, 1, 0] = float("nan")
    o, final = call(gated_delta_rule, t, chunk_size=8)
    o_ref, final_ref = call(gated_delta_rule_ref, t)
    torch.testing.assert_close(o, o_ref, equal_nan=True)
    assert torch.isfinite(o[0, :9]).all() and torch.isnan(o[0, 9:, 1]).all() and torch.isfinite(o[0, :, 0]).all()
    assert torch.isnan(final[0, 1]).all() and torch.isfinite(final[0, 0]).all()


def test_nonfinite_value_poisons_only_its_own_columns():
    t = inputs(Bsz=1, T=20, h0=True)
    t["v"][0, 9, 1, 2] = float("inf")
    o, final = call(gated_delta_rule, t, chunk_size=8)
    o_ref, final_ref = call(gated_delta_rule_ref, t)
    torch.testing.assert_close(o, o_ref, equal_nan=True)
    torch.testing.assert_close(final, final_ref, equal_nan=True)
    assert torch.isnan(o[0, 9:, 1, 2]).all() and torch.isfinite(o[0, :, 1, :2]).all()


def test_input_errors_name_the_value():
    t = inputs(T=5)
    q, k, v, g, beta = t["q"], t["k"], t["v"], t["g"], t["beta"]
    with pytest.raises(ValueError, match=r"beta .*per-channel"):
        gated_delta_rule(q, k, v, g, beta[..., None].expand(*beta.shape, 4))
    with pytest.raises(ValueError, match=r"k must have shape"):
        delta_rule(q, k[..., :3], v, beta)
    with pytest.raises(ValueError, match=r"g must have shape"):
        gated_delta_rule(q, k, v, g[:, :3], beta)
    with pytest.raises(TypeError, match=r"g must be a Tensor"):
        gated_delta_rule(q, k, v, None, beta)
    with pytest.raises(TypeError, match=r"q must be real floating point"):
        delta_rule(q.long(), k, v, beta)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[2, 3, 5, 4\]"):
        delta_rule(q, k, v, beta, initial_state=torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"packed in a batch of 1"):
        delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=5"):
        delta_rule(q[:1], k[:1], v[:1], beta[:1], cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        delta_rule(q, k, v, beta, chunk_size=0)
    with pytest.raises(ValueError, match=r"unknown backend"):
        delta_rule(q, k, v, beta, backend="cuda")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
            gated_delta_rule(q.float(), k.float(), v.float(), g.float(), beta.float(), backend="triton")
    with pytest.raises(TypeError, match=r"state must be fp32"):
        delta_rule_step(torch.zeros(2, 3, 5, 4, dtype=torch.bfloat16), q[:, 0], k[:, 0], v[:, 0], beta[:, 0])
    with pytest.raises(ValueError, match=r"v must have shape"):
        delta_rule_step(torch.zeros(2, 3, 5, 4), q[:, 0], k[:, 0], v[:, 0, :, :2], beta[:, 0])
