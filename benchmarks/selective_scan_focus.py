"""Focused timing of the Triton selective scan at the benchmark shape, with kernel variants.

    PYTHONPATH=. python benchmarks/selective_scan_focus.py [--d 4096] [--fwd-variants] [--bwd-variants]
        [--ckpt-variants] [--json out.json]

Shape: (B, T, D, N) = (8, 2048, D, 16) with D = 4096 (default) or 1536 (mamba-130m's inner width), bf16,
``mamba`` discretisation, D skip, z gate, softplus + bias (the ``selective`` section of
``benchmarks/scans.py``). Prints median times of ``triton.testing.do_bench`` and the percentage of the
floor (see benchmarks/scans.py for the floors; scaled by D / 4096 for other widths), and checks each
variant's output against the default kernel's. ``--bwd-variants`` includes smaller backward blocks
(more programs: the backward is latency-bound at about one warp per scheduler, docs/kernels.md);
``--ckpt-variants`` the forward's checkpoint interval (saved state against the backward's extra pass).
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

FLOOR_FWD_MS = 0.272
FLOOR_FB_MS = 0.545


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fwd-variants", action="store_true")
    p.add_argument("--bwd-variants", action="store_true")
    p.add_argument("--ckpt-variants", action="store_true")
    p.add_argument("--d", type=int, default=4096, help="channels D")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from seqblocks.ops.selective_scan import SelectiveScanTuning
    from seqblocks.ops.selective_scan import triton as sst

    torch.manual_seed(0)
    Bsz, T, D, N = 8, 2048, args.d, 16
    floor_fwd, floor_fb = FLOOR_FWD_MS * D / 4096, FLOOR_FB_MS * D / 4096
    dev, dtype = "cuda", torch.bfloat16
    u = torch.randn(Bsz, T, D, device=dev, dtype=dtype).requires_grad_()
    delta = (torch.randn(Bsz, T, D, device=dev) * 0.5 - 1).to(dtype).requires_grad_()
    A = (-torch.rand(D, N, device=dev) * 4 - 0.5).requires_grad_()
    Bm = torch.randn(Bsz, T, N, device=dev, dtype=dtype).requires_grad_()
    Cm = torch.randn(Bsz, T, N, device=dev, dtype=dtype).requires_grad_()
    Dv = torch.randn(D, device=dev).requires_grad_()
    z = torch.randn(Bsz, T, D, device=dev, dtype=dtype).requires_grad_()
    bias = torch.randn(D, device=dev).requires_grad_()
    ins = [u, delta, A, Bm, Cm, Dv, z, bias]
    gy = torch.randn(Bsz, T, D, device=dev, dtype=dtype)
    gh = torch.randn(Bsz, D, N, device=dev)

    def call(tuning=None):
        return sst.selective_scan_triton(u, delta, A, Bm, Cm, Dv, z, delta_bias=bias, delta_softplus=True,
                                         tuning=tuning)

    def fb(tuning=None):
        for x in ins:
            x.grad = None
        y, hT = call(tuning)
        torch.autograd.backward([y, hT], [gy, gh])

    def grads(tuning=None):
        fb(tuning)
        return [x.grad.clone() for x in ins]

    rows = []

    def rec(name, ms, floor):
        rows.append(dict(name=name, ms=ms, pct=100 * floor / ms))
        print(f"  {name:55s} {ms:8.3f} ms  {100 * floor / ms:5.1f}% of floor", flush=True)

    with torch.no_grad():
        y_ref, h_ref = call()
    g_ref = grads()

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    # Each variant is an explicit SelectiveScanTuning passed to the call; None fields keep the defaults.
    if args.fwd_variants:
        # ring: load-ring slots; cfg: (BLOCK_D, num_warps), None = the default
        for ring, cfg in [(2, None), (4, None), (4, (16, 1)), (4, (64, 2))]:
            fwd = cfg or (None, None)
            tuning = SelectiveScanTuning(fwd_block_d=fwd[0], fwd_num_warps=fwd[1], fwd_ring=ring)
            with torch.no_grad():
                y, h = call(tuning)
                ms = do_bench(lambda t=tuning: call(t), warmup=10, rep=50, return_mode="median")
            rec(f"fwd ring={ring} cfg={cfg} (err y {rel(y, y_ref):.1e} h {rel(h, h_ref):.1e})", ms, floor_fwd)
    if args.bwd_variants:
        # (prefetch all, (BLOCK_T, BLOCK_D, num_warps) of the backward or None = the default)
        for full, cfg in [(False, None), (True, None), (None, (32, 32, 1)), (None, (16, 64, 2)), (False, (16, 8, 1)),
                          (False, (16, 4, 1)), (True, (16, 8, 1)), (False, (32, 8, 1)), (False, (8, 8, 1))]:
            bwd = cfg or (None, None, None)
            tuning = SelectiveScanTuning(block_t=bwd[0], bwd_block_d=bwd[1], bwd_num_warps=bwd[2], bwd_prefetch=full)
            g = grads(tuning)
            err = max(rel(a, b) for a, b in zip(g, g_ref))
            ms = do_bench(lambda t=tuning: fb(t), warmup=10, rep=50, return_mode="median")
            rec(f"fwd+bwd full={full} cfg={cfg} (max grad err {err:.1e})", ms, floor_fb)
    if args.ckpt_variants:
        for ckpt in (16, 32, 64, 128, 256, 2048):
            tuning = SelectiveScanTuning(ckpt_t=ckpt)
            g = grads(tuning)
            err = max(rel(a, b) for a, b in zip(g, g_ref))
            ms = do_bench(lambda t=tuning: fb(t), warmup=10, rep=50, return_mode="median")
            saved_mb = Bsz * -(-T // ckpt) * D * N * 4 / 1e6
            rec(f"fwd+bwd ckpt_t={ckpt} (saved state {saved_mb:.0f} MB, max grad err {err:.1e})", ms, floor_fb)
    with torch.no_grad():
        rec("fwd default", do_bench(call, warmup=25, rep=100, return_mode="median"), floor_fwd)
    rec("fwd+bwd default", do_bench(fb, warmup=25, rep=100, return_mode="median"), floor_fb)
    with torch.no_grad():
        rec("fwd default (again)", do_bench(call, warmup=25, rep=100, return_mode="median"), floor_fwd)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
