"""GPU checks of the SSD Triton kernels at real Mamba-2 shapes (P = 64, N = 128, chunk 256), against the
chunked PyTorch path in float64, forward and every input gradient; the decode kernel; the Mamba2 layer
with backend "auto" (Triton) against its torch path.

Marked ``gpu`` (excluded from the default run): ``python -m pytest -m gpu tests/test_ssd_gpu.py``.

Shapes: B batch, T time, H heads, P head width, N state, G groups.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from seqblocks.ops.ssd import ssd, ssd_state_update  # noqa: E402

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _inputs(Bsz, T, H, P, G, N, dtype, *, z=False, h0=True, D_per_p=False):
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    t = {"x": r(Bsz, T, H, P), "dt": r(Bsz, T, H, scale=0.5) - 2, "A": -torch.empty(H, device="cuda").uniform_(1, 16),
         "B": r(Bsz, T, G, N), "C": r(Bsz, T, G, N), "D": torch.randn(H, P, device="cuda") if D_per_p
         else torch.randn(H, device="cuda"), "z": r(Bsz, T, H, P) if z else None,
         "dt_bias": torch.randn(H, device="cuda") * 0.5,
         "initial_state": torch.randn(Bsz, H, P, N, device="cuda") if h0 else None}
    return t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(t, backend, **kw):
    return ssd(*(t[k] for k in NAMES[:7]), dt_bias=t["dt_bias"], initial_state=t["initial_state"],
               return_final_state=True, backend=backend, **kw)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 5e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("mode", ["dense", "groups_z_Dp", "lengths", "cu_seqlens"])
def test_ssd_triton_matches_float64_torch_path(dtype, tol, mode):
    Bsz, T, H, P, G, N = (2, 2048, 8, 64, 1, 128) if mode != "cu_seqlens" else (1, 3000, 8, 64, 2, 128)
    t = _inputs(Bsz, T, H, P, 2 if mode == "groups_z_Dp" else G, N, dtype, z=mode == "groups_z_Dp",
                D_per_p=mode == "groups_z_Dp", h0=mode != "cu_seqlens")
    kw = {}
    if mode == "lengths":
        kw["lengths"] = torch.tensor([T, 1234], device="cuda")
    if mode == "cu_seqlens":
        kw["cu_seqlens"] = torch.tensor([0, 700, 701, 3000], device="cuda")
        t["initial_state"] = torch.randn(3, H, P, N, device="cuda")
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items() if v is not None}
    wide = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    y, final = _run({**dict.fromkeys(NAMES), **leaves}, "triton", chunk_size=256, **kw)
    y_r, final_r = _run({**dict.fromkeys(NAMES), **wide}, "torch", chunk_size=256, **kw)
    assert _rel(y, y_r) < tol and _rel(final, final_r) < tol
    gy, gf = torch.randn_like(y_r), torch.randn_like(final_r)
    names = list(leaves)
    got = torch.autograd.grad([y, final], [leaves[n] for n in names], [gy.to(y.dtype), gf.float()])
    want = torch.autograd.grad([y_r, final_r], [wide[n] for n in names], [gy, gf])
    for n, a, b in zip(names, got, want):
        assert _rel(a, b) < tol * (5 if n in ("A", "dt_bias", "D") else 1), (n, _rel(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_update_kernel(dtype):
    t = _inputs(64, 1, 24, 64, 1, 128, dtype, z=True)
    args = [t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], t["D"], t["z"][:, 0]]
    s1 = torch.randn(64, 24, 64, 128, device="cuda")
    s2 = s1.clone()
    y1 = ssd_state_update(s1, *args, dt_bias=t["dt_bias"], backend="triton")
    y2 = ssd_state_update(s2, *args, dt_bias=t["dt_bias"], backend="torch")
    assert _rel(y1, y2) < 1e-2 and _rel(s1, s2) < 1e-5


def test_mamba2_layer_auto_equals_torch_path_forward_backward(monkeypatch):
    """The layer at the first benchmark width: "auto" (the Triton kernels) == the op's torch path."""
    import seqblocks.layers.mixers.mamba2 as mamba2_module
    from seqblocks.layers.mixers import Mamba2

    torch.manual_seed(0)
    m = Mamba2(768, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 2048, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    leaves = [x, *m.parameters()]
    y = m(x)
    got = torch.autograd.grad(y, leaves, gy)
    real_ssd = mamba2_module.ssd
    monkeypatch.setattr(mamba2_module, "ssd", lambda *a, **k: real_ssd(*a, **{**k, "backend": "torch"}))
    y_t = m(x)
    want = torch.autograd.grad(y_t, leaves, gy)
    assert _rel(y, y_t) < 2e-2
    for a, b in zip(got, want):
        assert _rel(a, b) < 5e-2


def test_mamba2_decode_steps_equal_full_pass():
    from seqblocks.layers.mixers import Mamba2
    from seqblocks.testing import check_prefill_then_steps

    torch.manual_seed(0)
    m = Mamba2(256, device="cuda", dtype=torch.float32).eval()
    x = torch.randn(3, 300, 256, device="cuda")
    check_prefill_then_steps(m, x, prefill=290, atol=2e-4, rtol=1e-3)
