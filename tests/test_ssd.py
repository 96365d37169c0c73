"""The SSD op (Mamba-2's scan): the chunked PyTorch path against the sequential reference, forward and
every input gradient, over odd lengths, chunk sizes, groups, initial states, varlen, dt options and
bf16; the one-step state update against one step of the reference; input checks."""

from __future__ import annotations

import math

import pytest
import torch

from seqblocks.ops.ssd import ssd, ssd_ref, ssd_state_update


def inputs(Bsz=2, T=11, H=4, P=3, G=1, N=5, *, D="head", z=True, bias=True, h0=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    t = {"x": r(Bsz, T, H, P), "dt": r(Bsz, T, H, scale=0.5), "A": -torch.rand(H, generator=g, dtype=torch.float64)
         .mul(4).add(0.1).to(dtype), "B": r(Bsz, T, G, N), "C": r(Bsz, T, G, N)}
    t["D"] = None if D is None else r(H) if D == "head" else r(H, P)
    t["z"] = r(Bsz, T, H, P) if z else None
    t["dt_bias"] = r(H, scale=0.5) if bias else None
    t["initial_state"] = r(Bsz, H, P, N) if h0 else None
    return t


def run(fn, t, **kw):
    t = dict(t)
    args = [t.pop(k) for k in ("x", "dt", "A", "B", "C", "D", "z")]
    return fn(*args, return_final_state=True, **t, **kw)


def check_grads(t, chunk_size, **kw):
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items() if v is not None}
    full = {**t, **leaves}
    y, final = run(ssd, full, chunk_size=chunk_size, **kw)
    y_ref, final_ref = run(ssd_ref, full, **kw)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(final, final_ref, atol=1e-10, rtol=1e-8)
    g = torch.Generator().manual_seed(1)
    gy, gf = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(final.shape, generator=g, dtype=final.dtype)
    names = list(leaves)
    got = torch.autograd.grad((y * gy).sum() + (final * gf).sum(), [leaves[n] for n in names])
    want = torch.autograd.grad((y_ref * gy).sum() + (final_ref * gf).sum(), [leaves[n] for n in names])
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=lambda m, n=n: f"grad of {n}: {m}")


@pytest.mark.parametrize("T", [1, 7, 63, 65, 257])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_equals_reference_forward_and_grads(T, chunk_size):
    check_grads(inputs(Bsz=1 if T == 257 else 2, T=T, H=2 if T == 257 else 4, h0=True), chunk_size)


@pytest.mark.parametrize(("G", "D", "z", "bias", "softplus", "limit"), [
    (2, "head", True, True, True, (0.0, math.inf)),
    (2, "channel", False, False, True, (0.0, None)),
    (4, None, True, True, False, (0.0, math.inf)),
    (1, "channel", True, True, True, (0.05, 0.5)),
])
def test_options_equal_reference(G, D, z, bias, softplus, limit):
    t = inputs(T=23, H=4, G=G, D=D, z=z, bias=bias, h0=True)
    if not softplus:
        t["dt"] = t["dt"].abs()
    check_grads(t, 8, dt_softplus=softplus, dt_limit=limit)


def test_lengths_equal_reference_and_each_row_alone():
    t = inputs(Bsz=3, T=29, G=2, h0=True)
    lengths = torch.tensor([29, 0, 13])
    check_grads(t, 8, lengths=lengths)
    y, final = run(ssd, t, chunk_size=8, lengths=lengths)
    assert (y[1] == 0).all() and (y[2, 13:] == 0).all()
    torch.testing.assert_close(final[1], t["initial_state"][1])
    one = {k: (v[2:3, :13] if v.dim() >= 3 and k != "initial_state" else v[2:3] if k == "initial_state" else v)
           if v is not None else None for k, v in t.items()}
    y_alone, final_alone = run(ssd, one, chunk_size=8)
    torch.testing.assert_close(y[2:3, :13], y_alone)
    torch.testing.assert_close(final[2:3], final_alone)


def test_padding_ignores_nonfinite_and_nonfinite_poisons_forward_only():
    t = inputs(Bsz=2, T=20)
    t["x"][0, 15:] = math.nan  # padding of row 0: ignored
    t["x"][1, 9, 0, 0] = math.inf  # row 1, token 9: poisons 9 and later, never 0..8
    y, final = run(ssd, t, chunk_size=8, lengths=torch.tensor([15, 20]))
    y_ref, final_ref = run(ssd_ref, t, lengths=torch.tensor([15, 20]))
    assert torch.isfinite(y[0]).all() and torch.isfinite(final[0]).all()
    torch.testing.assert_close(y[0], y_ref[0])
    torch.testing.assert_close(y[1, :9], y_ref[1, :9])
    assert not torch.isfinite(y[1, 9:]).any() and not torch.isfinite(final[1]).any()


def test_cu_seqlens_equals_reference_and_resets_state():
    bounds = [0, 5, 5, 22, 31]
    t = inputs(Bsz=1, T=31, G=2)
    t["initial_state"] = torch.randn(4, 4, 3, 5, dtype=torch.float64)
    cu = torch.tensor(bounds, dtype=torch.int32)
    check_grads(t, 8, cu_seqlens=cu)
    y, final = run(ssd, t, chunk_size=8, cu_seqlens=cu)
    for i in range(4):
        a, b = bounds[i], bounds[i + 1]
        piece = {k: (v[:, a:b] if k not in ("A", "D", "dt_bias", "initial_state") else
                     v[i:i + 1] if k == "initial_state" else v) if v is not None else None for k, v in t.items()}
        y_i, f_i = run(ssd, piece, chunk_size=8)
        torch.testing.assert_close(y[:, a:b], y_i)
        torch.testing.assert_close(final[i:i + 1], f_i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_fp32_state(dtype):
    t = inputs(T=70, G=2, h0=True, dtype=dtype)
    t["initial_state"] = t["initial_state"].float()
    y, final = run(ssd, t, chunk_size=16)
    assert y.dtype == dtype and final.dtype == torch.float32
    t32 = {k: v.float() if v is not None else None for k, v in t.items()}
    y32, final32 = run(ssd_ref, t32)
    torch.testing.assert_close(final, final32, atol=1e-4, rtol=1e-4)  # same rounded inputs, fp32 inside
    torch.testing.assert_close(y.float(), y32, atol=2e-2, rtol=2e-2)  # only the output rounding differs


def test_state_update_equals_one_step_of_reference():
    t = inputs(Bsz=3, T=1, G=2, D="channel", h0=True)
    y_ref, final_ref = run(ssd_ref, t, dt_limit=(0.0, 0.7))
    state = t["initial_state"].clone()
    y = ssd_state_update(state, t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], t["D"],
                         t["z"][:, 0], dt_bias=t["dt_bias"], dt_limit=(0.0, 0.7))
    torch.testing.assert_close(y, y_ref[:, 0])
    torch.testing.assert_close(state, final_ref)


def test_steps_continue_a_chunked_prefill():
    t = inputs(Bsz=2, T=12, G=2)
    y_full, final_full = run(ssd, t, chunk_size=4)
    pre = {k: v[:, :9] if v is not None and k in ("x", "dt", "B", "C", "z") else v for k, v in t.items()}
    _, state = run(ssd, pre, chunk_size=4)
    for s in range(9, 12):
        y = ssd_state_update(state, t["x"][:, s], t["dt"][:, s], t["A"], t["B"][:, s], t["C"][:, s], t["D"],
                             t["z"][:, s], dt_bias=t["dt_bias"])
        torch.testing.assert_close(y, y_full[:, s])
    torch.testing.assert_close(state, final_full)


def test_empty_inputs():
    t = inputs(Bsz=2, T=0, h0=True)
    y, final = run(ssd, t)
    assert y.shape == (2, 0, 4, 3) and torch.equal(final, t["initial_state"])


def test_autocast_leaves_the_op_alone():
    t = inputs(T=9, dtype=torch.float32)
    y, final = run(ssd, t, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, final_ac = run(ssd, t, chunk_size=4)
    assert torch.equal(y, y_ac) and torch.equal(final, final_ac)


def test_bad_inputs_name_the_value():
    t = inputs()
    args = [t[k] for k in ("x", "dt", "A", "B", "C")]
    with pytest.raises(ValueError, match="dt must have shape"):
        ssd(args[0], args[1][..., :2], *args[2:])
    with pytest.raises(ValueError, match="groups G=3"):
        ssd(*args[:3], torch.randn(2, 11, 3, 5), torch.randn(2, 11, 3, 5))
    with pytest.raises(ValueError, match="dt_limit"):
        ssd(*args, dt_limit=(0.5, 0.1))
    with pytest.raises(TypeError, match="dt_limit"):
        ssd(*args, dt_limit=0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(*args, chunk_size=0)
    with pytest.raises(ValueError, match="lengths"):
        ssd(*args, lengths=torch.tensor([3, 12]))
    with pytest.raises(TypeError, match="A must be real floating point"):
        ssd(*args[:2], torch.arange(4), *args[3:])
    with pytest.raises(ValueError, match="no Triton kernel"):
        ssd(*args, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        ssd(*args, backend="cuda")
