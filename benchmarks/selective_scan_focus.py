"""Focused timing of the Triton selective scan at the benchmark shape, with kernel variants.

    PYTHONPATH=. python benchmarks/selective_scan_focus.py [--d 4096] [--t 2048] [--batch 8]
        [--kernels ring,chunked] [--fwd-variants] [--bwd-variants] [--ckpt-variants] [--chunked-variants]
        [--json out.json]

Shape: (B, T, D, N) = (8, 2048, D, 16) with D = 4096 (default) or 1536 (mamba-130m's inner width), bf16,
``mamba`` discretisation, D skip, z gate, softplus + bias (the ``selective`` section of
``benchmarks/scans.py``). Prints median times of ``triton.testing.do_bench`` and the percentage of the
floor (see benchmarks/scans.py for the floors; scaled by B T D / (8 * 2048 * 4096) for other shapes),
and checks each variant's output against the default (ring) kernel's. ``--kernels`` times each kernel design
(``SelectiveScanTuning(kernel=...)``: "ring", the default, and "chunked") at its default tuning, forward
and forward + backward, in one run. ``--bwd-variants`` includes smaller backward blocks (more programs:
the ring backward is latency-bound at about one warp per scheduler, docs/kernels.md); ``--ckpt-variants``
the forward's checkpoint interval (saved state against the backward's extra pass); ``--chunked-variants``
the chunked kernels' chunk lengths, block widths, warps, register caps and checkpoint intervals.
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
    p.add_argument("--chunked-variants", action="store_true")
    p.add_argument("--kernels", default="ring", help="comma-separated kernel designs to time: ring, chunked")
    p.add_argument("--d", type=int, default=4096, help="channels D")
    p.add_argument("--t", type=int, default=2048, help="time steps T")
    p.add_argument("--batch", type=int, default=8, help="batch rows B")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from seqblocks.ops.selective_scan import SelectiveScanTuning
    from seqblocks.ops.selective_scan.tuning import KERNELS

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if not kernels or any(k not in KERNELS for k in kernels):
        p.error(f"--kernels: expected a comma-separated subset of {KERNELS}, got {args.kernels!r}")
    from seqblocks.ops.selective_scan import triton as sst

    torch.manual_seed(0)
    Bsz, T, D, N = args.batch, args.t, args.d, 16
    scale = Bsz * T * D / (8 * 2048 * 4096)
    floor_fwd, floor_fb = FLOOR_FWD_MS * scale, FLOOR_FB_MS * scale
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
    if args.chunked_variants:
        # (chunk_t, fwd_chunk_t, bwd_block_d, fwd_block_d, bwd_num_warps, bwd_maxnreg, ckpt_t); None = default
        for cfg in [(None, None, None, None, None, 255, None), (8, 16, None, None, None, None, None),
                    (2, 4, 16, 16, None, None, None), (4, 8, 16, 16, 2, None, None), (4, 8, 4, 4, None, None, None),
                    (2, 8, None, None, None, 128, None), (8, 8, None, None, None, 168, None),
                    (8, None, None, None, None, 168, 8), (None, None, None, None, None, None, 512)]:
            ct, fct, bbd, fbd, bw, breg, ck = cfg
            tuning = SelectiveScanTuning(kernel="chunked", chunk_t=ct, fwd_chunk_t=fct, bwd_block_d=bbd,
                                         fwd_block_d=fbd, bwd_num_warps=bw, bwd_maxnreg=breg, ckpt_t=ck)
            with torch.no_grad():
                y, h = call(tuning)
                ms = do_bench(lambda t=tuning: call(t), warmup=10, rep=50, return_mode="median")
            rec(f"chunked fwd cfg={cfg} (err y {rel(y, y_ref):.1e} h {rel(h, h_ref):.1e})", ms, floor_fwd)
            g = grads(tuning)
            err = max(rel(a, b) for a, b in zip(g, g_ref))
            ms = do_bench(lambda t=tuning: fb(t), warmup=10, rep=50, return_mode="median")
            rec(f"chunked fwd+bwd cfg={cfg} (max grad err {err:.1e})", ms, floor_fb)
    # Each kernel design at its default tuning, checked against the ring kernels' output.
    for kernel in kernels:
        tuning = SelectiveScanTuning(kernel=kernel)
        with torch.no_grad():
            y, h = call(tuning)
        g = grads(tuning)
        err = max([rel(y, y_ref), rel(h, h_ref)] + [rel(a, b) for a, b in zip(g, g_ref)])
        with torch.no_grad():
            rec(f"fwd {kernel} default", do_bench(lambda t=tuning: call(t), warmup=25, rep=100, return_mode="median"),
                floor_fwd)
        rec(f"fwd+bwd {kernel} default (max err vs ring {err:.1e})",
            do_bench(lambda t=tuning: fb(t), warmup=25, rep=100, return_mode="median"), floor_fb)
    with torch.no_grad():
        rec("fwd ring default (again)", do_bench(call, warmup=25, rep=100, return_mode="median"), floor_fwd)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), shape=[Bsz, T, D, N], kernels=kernels, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
