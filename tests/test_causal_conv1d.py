"""causal_conv1d / causal_conv1d_update: fast path vs the tap-by-tap reference."""

from __future__ import annotations

import pytest
import torch

from seqblocks.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from seqblocks.testing import assert_close

F64 = torch.float64


def make(B=3, T=9, D=5, W=4, dtype=F64, grad=False):
    ts = dict(x=torch.randn(B, T, D, dtype=dtype), weight=torch.randn(D, W, dtype=dtype),
              bias=torch.randn(D, dtype=dtype), initial_state=torch.randn(B, W - 1, D, dtype=dtype))
    if grad:
        for v in ts.values():
            v.requires_grad_(True)
    return ts


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("T", [1, 2, 9])
def test_matches_reference_forward_backward(W, activation, T):
    ts = make(T=T, W=W, grad=True)
    lengths = torch.tensor([T, T // 2, 0])
    y1, f1 = causal_conv1d(**ts, activation=activation, lengths=lengths)
    y2, f2 = causal_conv1d_ref(**ts, activation=activation, lengths=lengths)
    assert_close(y1, y2, atol=1e-12)
    assert_close(f1, f2, atol=0)
    cot = (torch.randn_like(y1), torch.randn_like(f1))
    leaves = list(ts.values())
    for name, a, b in zip(ts, torch.autograd.grad((y1, f1), leaves, cot),
                          torch.autograd.grad((y2, f2), leaves, cot)):
        assert_close(a, b, atol=1e-12, msg=f"grad of {name}")


def test_lengths_match_separate_runs():
    ts = make()
    lengths = torch.tensor([9, 2, 0])
    y, f = causal_conv1d(**ts, lengths=lengths)
    for b in range(3):
        n = int(lengths[b])
        ys, fs = causal_conv1d(ts["x"][b : b + 1, :n], ts["weight"], ts["bias"],
                               initial_state=ts["initial_state"][b : b + 1])
        assert_close(y[b : b + 1, :n], ys, atol=1e-12)
        assert torch.all(y[b, n:] == 0)
        assert_close(f[b : b + 1], fs, atol=0)


@pytest.mark.parametrize("split", [1, 2, 5])
def test_continuation_and_steps(split):
    ts = make()
    x, w, b = ts["x"], ts["weight"], ts["bias"]
    full, f_full = causal_conv1d(x, w, b, activation="silu")
    a, s = causal_conv1d(x[:, :split], w, b, activation="silu")
    rest, f_rest = causal_conv1d(x[:, split:], w, b, activation="silu", initial_state=s)
    assert_close(torch.cat((a, rest), 1), full, atol=1e-12)
    assert_close(f_rest, f_full, atol=0)
    state = s.clone()
    steps = [causal_conv1d_update(x[:, t], state, w, b, "silu") for t in range(split, x.shape[1])]
    assert_close(torch.stack(steps, 1), rest, atol=1e-12)
    assert_close(state, f_full, atol=0)  # updated in place


def test_width_one_update():
    ts = make(W=1)
    state = torch.zeros(3, 0, 5, dtype=F64)
    y = causal_conv1d_update(ts["x"][:, 0], state, ts["weight"], ts["bias"])
    assert_close(y, ts["x"][:, 0] * ts["weight"][:, 0] + ts["bias"], atol=1e-12)


def test_low_precision_and_autocast():
    ts = make(dtype=torch.float32)
    y32, _ = causal_conv1d(ts["x"], ts["weight"], ts["bias"], activation="silu")
    for dt in (torch.bfloat16, torch.float16):
        y, f = causal_conv1d(ts["x"].to(dt), ts["weight"].to(dt), ts["bias"].to(dt), activation="silu")
        assert y.dtype == dt and f.dtype == dt
        assert_close(y, y32, atol=0.05 * float(y32.abs().max()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = causal_conv1d(ts["x"], ts["weight"], ts["bias"], activation="silu")
    assert_close(y, y32, atol=1e-5)  # the op accumulates in fp32 even under autocast


def test_errors():
    ts = make()
    x, w = ts["x"], ts["weight"]
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, w[:3])
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match="state"):
        causal_conv1d(x, w, initial_state=torch.zeros(3, 2, 5, dtype=F64))
    with pytest.raises(ValueError, match="lengths"):
        causal_conv1d(x, w, lengths=torch.tensor([1, 2, 10]))
    with pytest.raises(ValueError, match="x must have shape"):
        causal_conv1d_update(x, torch.zeros(3, 3, 5, dtype=F64), w)
    with pytest.raises(TypeError, match="floating"):
        causal_conv1d(x.long(), w)


def test_runs_kernel_answers_for_auto():
    """``runs_kernel`` says what "auto" picks: the PyTorch path for CPU tensors (outside the interpreter)."""
    from seqblocks.ops.causal_conv1d import runs_kernel

    x, w = torch.randn(2, 5, 3), torch.randn(3, 4)
    assert runs_kernel(x, w) is False
    assert runs_kernel(x.double(), w.double()) is False


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("W", [1, 4])
def test_packed_conv_equals_each_sequence_alone(with_init, W):
    from seqblocks.ops.causal_conv1d import causal_conv1d

    g = torch.Generator().manual_seed(0)
    lens, D = [3, 0, 1, 7], 5
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x = torch.randn(1, sum(lens), D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, W, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D, generator=g, dtype=torch.float64, requires_grad=True)
    init = torch.randn(len(lens), W - 1, D, generator=g, dtype=torch.float64, requires_grad=True) if with_init \
        else None
    y, final = causal_conv1d(x, w, b, activation="silu", initial_state=init, cu_seqlens=cu)
    ys, finals = [], []
    for i, piece in enumerate(x.split(lens, 1)):
        yi, fi = causal_conv1d(piece, w, b, activation="silu", initial_state=None if init is None else init[i:i + 1])
        ys.append(yi)
        finals.append(fi)
    y_alone, final_alone = torch.cat(ys, 1), torch.cat(finals, 0)
    torch.testing.assert_close(y, y_alone)
    torch.testing.assert_close(final, final_alone)
    gy, gf = torch.randn_like(y), torch.randn_like(final)
    leaves = [t for t in (x, w, b, init) if t is not None]
    # With W = 1 the initial state is empty and unused: its gradient is materialised as zeros.
    got = torch.autograd.grad((y * gy).sum() + (final * gf).sum(), leaves, materialize_grads=True)
    want = torch.autograd.grad((y_alone * gy).sum() + (final_alone * gf).sum(), leaves, materialize_grads=True)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_packed_conv_checks_its_inputs():

    from seqblocks.ops.causal_conv1d import causal_conv1d

    x, w = torch.randn(1, 6, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match="batch of 1, got batch 2"):
        causal_conv1d(x.expand(2, 6, 3), w, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"state must have shape \[2, 3, 3\] \(\[num_seqs"):
        causal_conv1d(x, w, initial_state=torch.zeros(1, 3, 3), cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu", cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="rise from 0 to T=6"):
        causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="int32 / int64"):
        causal_conv1d(x, w, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="either lengths or cu_seqlens"):
        causal_conv1d(x, w, lengths=torch.tensor([6]), cu_seqlens=torch.tensor([0, 6]))
