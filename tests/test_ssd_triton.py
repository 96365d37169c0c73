"""The SSD Triton kernels against the sequential reference and the chunked PyTorch path, forward and
every input gradient (random cotangents on y and on the final state), on the CPU.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``); ``tests/interpreter.py`` says why
the cases run in a child process. Small chunks (16 / 32) and odd lengths cross chunk boundaries; the
launch-option variants (``launch_options``: split / fused state passes, CB shared or per kernel, head
blocks, mixed tiles) compute the same function, and the CB / dCB scratch tiles above the diagonal,
which no kernel writes, never reach a result (filled with NaN here).

Shapes: B batch, T time, H heads, P head width, N state, G groups.
"""

from __future__ import annotations

import math

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter
from layouts import time_innermost

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from seqblocks.ops.ssd import ssd, ssd_ref, ssd_state_update  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)


NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def inputs(Bsz=2, T=11, H=4, P=3, G=1, N=5, *, D="head", z=True, bias=True, h0=False, dtype=torch.float32,
           device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    t = {"x": r(Bsz, T, H, P), "dt": r(Bsz, T, H, scale=0.5),
         "A": (-torch.rand(H, generator=g).mul(4).add(0.1)).to(device), "B": r(Bsz, T, G, N), "C": r(Bsz, T, G, N)}
    t["D"] = None if D is None else r(H) if D == "head" else r(H, P)
    t["z"] = r(Bsz, T, H, P) if z else None
    t["dt_bias"] = r(H, scale=0.5) if bias else None
    t["initial_state"] = r(Bsz, H, P, N).float() if h0 else None
    return t


def _call(fn, t, **kw):
    return fn(*(t[k] for k in NAMES[:7]), dt_bias=t["dt_bias"], initial_state=t["initial_state"],
              return_final_state=True, **kw)


def _triton(*args, block_len=None, options=None, **kw):
    from seqblocks.ops.ssd.triton import ssd_triton

    kw.pop("backend")
    return ssd_triton(*args, block_len=block_len, options=options, **kw)


def check(t, *, chunk_size=16, tol=2e-4, compare_torch=True, block_len=None, options=None, **kw):
    """Triton == reference (float64) forward and in every gradient; also == the chunked torch path.
    ``block_len`` below the chunk makes each chunk span several programs' tiles; ``options`` are
    launch-option overrides (``launch_options``)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items() if v is not None}
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    full, ref = {**dict.fromkeys(NAMES), **leaves}, {**dict.fromkeys(NAMES), **ref_leaves}
    if block_len is None and options is None:
        y, final = _call(ssd, full, chunk_size=chunk_size, backend="triton", **kw)
    else:
        y, final = _call(_triton, full, chunk_size=chunk_size, backend="triton", block_len=block_len,
                         options=options, **kw)
    y_r, final_r = _call(ssd_ref, ref, **kw)
    assert y.dtype == t["x"].dtype and final.dtype == torch.float32
    g = torch.Generator().manual_seed(1)
    gy, gf = torch.randn(y.shape, generator=g, dtype=torch.float64), torch.randn(final.shape, generator=g,
                                                                                  dtype=torch.float64)
    names = list(leaves)
    got = torch.autograd.grad((y.double() * gy).sum() + (final.double() * gf).sum(), [leaves[n] for n in names])
    want = torch.autograd.grad((y_r * gy).sum() + (final_r * gf).sum(), [ref_leaves[n] for n in names])

    def close(a, b, what):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, atol=tol * scale, rtol=0, msg=lambda m: f"{what}: {m}")

    close(y, y_r, "y")
    close(final, final_r, "final state")
    for n, a, b in zip(names, got, want):
        assert a.dtype == leaves[n].dtype, n
        close(a, b, f"grad of {n}")
    if compare_torch:
        y_t, final_t = _call(ssd, full, chunk_size=chunk_size, backend="torch", **kw)
        close(y, y_t.double(), "y vs torch path")
        close(final, final_t.double(), "final vs torch path")


@pytest.mark.parametrize("T", [1, 7, 63, 65, 257])
def test_forward_and_grads_over_lengths(T):
    check(inputs(Bsz=1 if T == 257 else 2, T=T, H=2, h0=True), chunk_size=16 if T < 257 else 32)


@pytest.mark.parametrize(("G", "D", "z", "bias", "softplus", "limit"), [
    (2, "head", True, True, True, (0.0, float("inf"))),
    (2, "channel", False, False, True, (0.0, None)),
    (4, None, True, True, False, (0.0, float("inf"))),
    (1, "channel", True, True, True, (0.05, 0.6)),
])
def test_options(G, D, z, bias, softplus, limit):
    t = inputs(Bsz=1, T=37, H=4, P=5, G=G, N=6, D=D, z=z, bias=bias)
    if not softplus:
        t["dt"] = t["dt"].abs()
    check(t, chunk_size=16, dt_softplus=softplus, dt_limit=limit)


@pytest.mark.parametrize("T", [7, 100])
def test_chunk_of_several_blocks(T):
    check(inputs(Bsz=1, T=T, H=2, G=2, D="channel", h0=True), chunk_size=64, block_len=16)


def test_lengths():
    t = inputs(Bsz=3, T=40, h0=True)
    check(t, chunk_size=16, lengths=torch.tensor([40, 17, 0]))


def test_cu_seqlens():
    t = inputs(Bsz=1, T=50, H=2, G=2)
    t["initial_state"] = torch.randn(3, 2, 3, 5)
    check(t, chunk_size=16, cu_seqlens=torch.tensor([0, 9, 9, 50]))


def test_bf16():
    t = inputs(Bsz=2, T=45, H=2, P=16, N=16, dtype=torch.bfloat16, h0=True)
    check(t, chunk_size=32, tol=3e-2, compare_torch=False)


def test_default_chunk_and_width_above_block():
    check(inputs(Bsz=1, T=70, H=2, P=20, N=17), chunk_size=64)


# Launch-option variants (seqblocks.ops.ssd.triton.launch_options) on a chunk of 64 with four heads in
# two groups, P = 20 and N = 17 (masked lanes; two P blocks of 16), T = 100 (a partial last chunk).
_MIXED = dict(state_bl=16, state_bp=16, cb_block=32, scan_bl=32, scan_bs=16, scan_bp=16, dstate_bl=32, dstate_bp=16,
              dx_bs=32, dx_bl=16, dcb_block=16, db_bs=16, db_bl=32, dc_bl=16, dc_bs=32)
VARIANTS = {
    "split_passes": dict(state_fused=False, dstate_fused=False, pass_block=128),
    "mixed_tiles_shared_cb": dict(_MIXED, cb_shared=True),
    "mixed_tiles_private_cb": dict(_MIXED, cb_shared=False),
    "one_head_per_block": dict(dcb_heads=1, dbc_heads=1, cb_shared=True),
    "wide_rows": dict(scan_bl=64, scan_bs=16, dx_bs=16, dx_bl=64, db_bs=16, db_bl=64, dc_bl=64, dc_bs=16,
                      cb_block=16, dcb_block=32),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_launch_option_variants(variant):
    t = inputs(Bsz=1, T=100, H=4, P=20, G=2, N=17, D="channel", h0=True)
    check(t, chunk_size=64, options=VARIANTS[variant])


def test_launch_option_variants_bf16():
    t = inputs(Bsz=1, T=80, H=4, P=16, G=1, N=32, dtype=torch.bfloat16, h0=True)
    for opts in ({"cb_shared": False, "dcb_heads": 3}, {"state_fused": False, "dstate_fused": False, "dbc_heads": 3}):
        check(t, chunk_size=32, tol=3e-2, compare_torch=False, options=opts)


@pytest.mark.parametrize("readers", ["cb", "dcb"])
def test_scratch_tiles_above_the_diagonal_never_reach_a_result(monkeypatch, readers):
    """CB / dCB are written for the tiles on and below the diagonal at the writer's tile size; readers with
    larger tiles select the entries above it away. NaN-filled scratch must leave every result as it was.
    "cb": CB in tiles of 16 read by the output, dx and dCB kernels in tiles of 32; "dcb": dCB in tiles of
    16 read by the dB and dC kernels in tiles of 32."""
    from seqblocks.ops.ssd import triton as kernels

    monkeypatch.setattr(kernels, "_scratch", lambda *shape, device: torch.full(shape, math.nan, device=device))
    t = inputs(Bsz=1, T=70, H=2, P=5, N=6, h0=True)
    small = dict(cb_shared=True, cb_block=16, dcb_block=16)
    tiles = dict(scan_bl=16, scan_bs=32, dx_bs=16, dx_bl=32, dcb_block=32) if readers == "cb" else \
        dict(db_bs=16, db_bl=32, dc_bl=16, dc_bs=32)
    check(t, chunk_size=64, options={**small, **tiles})


def test_launch_options_reject_bad_values():
    from seqblocks.ops.ssd.triton import launch_options

    o = launch_options(torch.bfloat16, 64, 128, 24, 1)
    assert o["cb_shared"] and o["scan_bl"] == 64 and o["dcb_heads"] == 24
    assert not launch_options(torch.bfloat16, 64, 128, 8, 8)["cb_shared"]  # each head its own B / C
    assert launch_options(torch.float32, 64, 128, 8, 8)["cb_shared"]
    assert launch_options(torch.bfloat16, 64, 128, 24, 1, 32)["scan_bl"] == 32  # clipped to the chunk
    for bad, err in (({"scan_tile": 64}, ValueError), ({"scan_bl": 48}, ValueError), ({"dx_bs": 8}, ValueError),
                     ({"scan_warps": 3}, ValueError), ({"dbc_heads": 0}, ValueError),
                     ({"cb_shared": 1}, TypeError), ({"scan_bl": 64.0}, TypeError)):
        with pytest.raises(err, match="ssd launch options"):
            launch_options(torch.bfloat16, 64, 128, 24, 1, overrides=bad)


@pytest.mark.slow
def test_sweep_variants_equal_the_defaults():
    """Every point of ``benchmarks/ssd.py --sweep`` at Mamba-2's P 64, N 128, chunk 256 (bf16, T 300)
    gives the default launch's results, forward and backward."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import ssd as bench

    from seqblocks.ops.ssd.triton import ssd_triton

    t = inputs(Bsz=1, T=300, H=2, P=64, N=128, z=False, dtype=torch.bfloat16, h0=True)
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(1, 300, 2, 64, generator=g)

    def run(opts):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items() if v is not None}
        y, final = ssd_triton(*(leaves.get(k) for k in NAMES[:7]), dt_bias=leaves["dt_bias"],
                              initial_state=leaves["initial_state"], return_final_state=True, options=opts)
        grads = torch.autograd.grad((y.float() * gy).sum() + final.sum(), list(leaves.values()))
        return [y, final, *grads]

    want = run(None)
    for group, over in bench.sweep_variants():
        for a, b in zip(run(over), want):
            scale = b.float().abs().max().item()
            assert (a.float() - b.float()).abs().max().item() <= 2e-2 * scale, (group, over)


@pytest.mark.parametrize(("name", "value"), [("x", math.nan), ("x", math.inf), ("B", math.nan), ("dt", math.nan)])
def test_nonfinite_reaches_no_earlier_output(name, value):
    """A non-finite input at step k leaves every output before k (and every other row) as without it,
    and the outputs from k on are non-finite exactly where the reference's are."""
    t = inputs(Bsz=2, T=40, H=2, P=3, N=4)
    t[name] = t[name].clone()
    t[name][0, 21, 0] = value  # inside the second chunk of 16, not at its start
    y = _call(ssd, {**dict.fromkeys(NAMES), **t}, chunk_size=16, backend="triton")[0]
    y_r = _call(ssd_ref, {**dict.fromkeys(NAMES), **{k: v.double() for k, v in t.items() if v is not None}})[0]
    assert torch.isfinite(y[:, :21]).all() and torch.isfinite(y[1]).all()
    assert torch.equal(torch.isfinite(y), torch.isfinite(y_r))
    ok = torch.isfinite(y_r)
    torch.testing.assert_close(y[ok].double(), y_r[ok], atol=2e-4 * y_r[ok].abs().max().item(), rtol=0)


@pytest.mark.parametrize(("D", "z", "limit", "G"), [("head", True, (0.0, float("inf")), 1),
                                                    ("channel", False, (0.1, 0.5), 2), (None, True, (0.0, None), 4)])
def test_state_update_equals_torch(D, z, limit, G):
    t = inputs(Bsz=3, T=1, H=4, P=5, G=G, N=6, D=D, z=z)
    state = torch.randn(3, 4, 5, 6)
    args = [t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], t["D"],
            None if t["z"] is None else t["z"][:, 0]]
    s_tri, s_torch = state.clone(), state.clone()
    y_tri = ssd_state_update(s_tri, *args, dt_bias=t["dt_bias"], dt_limit=limit, backend="triton")
    y_torch = ssd_state_update(s_torch, *args, dt_bias=t["dt_bias"], dt_limit=limit, backend="torch")
    torch.testing.assert_close(y_tri, y_torch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_tri, s_torch, atol=1e-5, rtol=1e-5)


def test_state_update_bf16_inputs_fp32_state():
    t = inputs(Bsz=2, T=1, H=2, P=8, N=16, dtype=torch.bfloat16)
    state = torch.randn(2, 2, 8, 16)
    args = [t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], t["D"], t["z"][:, 0]]
    s_tri, s_torch = state.clone(), state.clone()
    y_tri = ssd_state_update(s_tri, *args, dt_bias=t["dt_bias"], backend="triton")
    y_torch = ssd_state_update(s_torch, *args, dt_bias=t["dt_bias"], backend="torch")
    assert y_tri.dtype == torch.bfloat16 and s_tri.dtype == torch.float32
    torch.testing.assert_close(y_tri.float(), y_torch.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(s_tri, s_torch, atol=1e-5, rtol=1e-5)


def test_state_update_reads_strided_inputs():
    """A and dt_bias as strided [H] views (columns of larger tensors), x, B, C and z with their last two
    dimensions' strides swapped: the kernel reads contiguous copies. A and dt_bias used to be passed as
    given, and the kernel read them at the wrong heads (here y off by 1.2, the state by 2.1)."""
    t = inputs(Bsz=3, T=1, H=4, P=5, G=2, N=6)
    g = torch.Generator().manual_seed(4)
    A = torch.cat([t["A"][:, None], -torch.rand(4, 1, generator=g)], 1)[:, 0]            # stride 2
    bias = torch.cat([torch.randn(4, 2, generator=g), t["dt_bias"][:, None]], 1)[:, 2]   # stride 3
    assert A.stride() == (2,) and bias.stride() == (3,)
    args = [t["x"][:, 0], t["dt"][:, 0], A, t["B"][:, 0], t["C"][:, 0], t["D"], t["z"][:, 0]]
    views = [a if a.dim() != 3 else a.transpose(1, 2).contiguous().transpose(1, 2) for a in args]
    assert all(torch.equal(a, b) for a, b in zip(args, views)) and not views[0].is_contiguous()
    state = torch.randn(3, 4, 5, 6, generator=g)
    s_tri, s_torch = state.clone(), state.clone()
    y_tri = ssd_state_update(s_tri, *views, dt_bias=bias, backend="triton")
    y_torch = ssd_state_update(s_torch, *(a.contiguous() for a in args), dt_bias=bias.contiguous(), backend="torch")
    torch.testing.assert_close(y_tri, y_torch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_tri, s_torch, atol=1e-5, rtol=1e-5)




@pytest.mark.parametrize(("T", "chunk", "case"), [(20, None, "strong"), (45, 16, "strong"), (45, 16, "strided")])
def test_partial_chunk_strong_decay_and_strided_inputs(T, chunk, case):
    """Forward and every gradient against the float64 reference where the sequence ends inside a chunk
    (20 of the default 256; 45 = 16 + 16 + 13) under decay of -40 .. -240 a step (padded rows must
    repeat the last valid cumulative decay, or exp of their differences overflows into NaN as in the
    delta rule's kernels), and with x, dt, B, C, z as views with T innermost (which the kernels must
    not read as if contiguous)."""
    t = inputs(Bsz=2, T=T, H=2, P=5, N=6, h0=True)
    if case == "strong":
        t["A"] = -torch.tensor([20.0, 40.0])
        t["dt"] = torch.rand(2, T, 2, generator=torch.Generator().manual_seed(3)) * 4 + 2  # softplus: ~2 .. 6
    else:
        for n in ("x", "dt", "B", "C", "z"):
            t[n] = time_innermost(t[n])
    check(t, chunk_size=chunk)


def test_float64_is_not_served():
    t = inputs(T=5, dtype=torch.float64)
    with pytest.raises(ValueError, match="no Triton kernel"):
        ssd(*(t[k] for k in NAMES[:7]), backend="triton")


if not INTERPRETER:
    # Outside the interpreter the cases above run in the child process only (see tests/interpreter.py).
    for _name in [n for n in list(globals()) if n.startswith("test_") and n != "test_kernels_under_interpreter"]:
        del globals()[_name]
