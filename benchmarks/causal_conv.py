# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Causal depthwise conv1d + SiLU: ours against the anchors, one run, against the HBM floor.

    python benchmarks/causal_conv.py [--json out.json] [--sweep]

Cases: Mamba's (B, T, D, W) = (8, 2048, 1536, 4) and a wider (4, 4096, 5120, 4), bf16 x, fp32
weight and bias, SiLU, forward and forward + backward (random cotangent on y); and the decode step
at (B, D, W) = (8, 1536, 4) and (256, 5120, 4). Rows:

- ours: ``seqblocks.ops.causal_conv1d.causal_conv1d(..., backend="triton")`` on x [B, T, D]
  (``causal_conv1d_update`` for the decode step);
- torch: the same op, ``backend="torch"`` (one grouped ``F.conv1d``);
- causal_conv1d (channels-last): the CUDA package's ``causal_conv1d_fn`` on ``x.transpose(1, 2)``,
  the layout Mamba-2 calls it with; (channels-first): on a contiguous [B, D, T] copy, its native
  layout (the copy is made outside the timer); ``causal_conv1d_update`` for the decode step;
- fla: ``fla.modules.causal_conv1d.causal_conv1d`` (Triton, [B, T, D]) when it imports.

The floor is the fewest bytes over the device-copy bandwidth measured in the same run: forward reads
x and writes y (2 e per element, e = 2 for bf16); backward reads x and dy and writes dx (3 e); the
decode step reads x and the W - 1 state columns and writes y and the W - 1 columns. Each line
prints our time, the best anchor's time in the same run and their ratio.

Needs a CUDA device. Shapes: B batch, T time, D channels, W filter width.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# This script's name is the CUDA package's: drop its folder from the path so that
# ``import causal_conv1d`` finds the package (the anchor), not this file.
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from seqblocks.ops.causal_conv1d import causal_conv1d, causal_conv1d_update  # noqa: E402
from seqblocks.ops.causal_conv1d.triton import ConvTiles, causal_conv1d_triton  # noqa: E402

ROWS: list[dict] = []
SEGMENTS = [(8, 2048, 1536, 4), (4, 4096, 5120, 4)]
STEPS = [(8, 1536, 4), (256, 5120, 4)]


def bench(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def add_row(case, name, ms, floor_ms):
    pct = 100 * floor_ms / ms
    ROWS.append({"case": case, "name": name, "ms": ms, "floor_ms": floor_ms, "pct_of_floor": pct})
    print(f"  {name:40s} {ms:8.4f} ms   {pct:5.1f}% of floor ({floor_ms:.4f} ms)", flush=True)


def summarize(case, times):
    ours = times.get("ours (triton)")
    others = {k: v for k, v in times.items() if k not in ("ours (triton)", "torch path")}
    if ours and others:
        best = min(others, key=others.get)
        print(f"  -> ours {ours:.4f} ms vs best anchor {best} {others[best]:.4f} ms: "
              f"{others[best] / ours:.2f}x", flush=True)
        ROWS.append({"case": case, "summary": True, "ours_ms": ours, "best_anchor": best,
                     "best_anchor_ms": others[best], "speedup": others[best] / ours})


def segment_impls():
    """name -> callable(x [B, T, D], w, b) returning y [B, T, D] (or a layout-specific input maker)."""
    impls = {
        "ours (triton)": lambda x, w, b: causal_conv1d(x, w, b, activation="silu", backend="triton")[0],
        "torch path": lambda x, w, b: causal_conv1d(x, w, b, activation="silu", backend="torch")[0],
    }
    try:
        from causal_conv1d import causal_conv1d_fn

        impls["causal_conv1d (channels-last)"] = lambda x, w, b: causal_conv1d_fn(
            x.transpose(1, 2), w, b, activation="silu")
        impls["causal_conv1d (channels-first)"] = ("channels_first", lambda xc, w, b: causal_conv1d_fn(
            xc, w, b, activation="silu"))
    except Exception as e:  # optional anchor
        impls["causal_conv1d"] = e
    try:
        from fla.modules.causal_conv1d import causal_conv1d as fla_conv

        impls["fla causal_conv1d"] = lambda x, w, b: fla_conv(x, w, b, activation="silu")[0]
    except Exception as e:
        impls["fla"] = e
    return impls


def run_segment(bw, B, T, D, W, backward):
    case = f"conv1d+silu (B, T, D, W) = ({B}, {T}, {D}, {W}) bf16 {'fwd+bwd' if backward else 'fwd'}"
    print(f"\n== {case} ==", flush=True)
    n = B * T * D
    floor_ms = (n * 2 * 2 + (n * 3 * 2 if backward else 0) + D * (W + 1) * 4 * (3 if backward else 1)) / bw * 1e3
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    xc = x.detach().transpose(1, 2).contiguous().requires_grad_(backward)  # [B, D, T]
    w = (torch.randn(D, W, device="cuda") / W).requires_grad_(backward)
    b = torch.randn(D, device="cuda").requires_grad_(backward)
    gy = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    gyc = gy.transpose(1, 2).contiguous()
    times = {}
    for name, fn in segment_impls().items():
        if isinstance(fn, Exception):
            print(f"  {name:40s} not installed ({type(fn).__name__}: {str(fn)[:80]})")
            continue
        inp, cot = x, gy
        if isinstance(fn, tuple):
            fn, inp, cot = fn[1], xc, gyc

        def step():
            for t in (inp, w, b):  # no gradient accumulation inside the timed region
                t.grad = None
            y = fn(inp, w, b)
            if backward:
                y.backward(cot)
        try:
            with torch.no_grad():
                out_shape = fn(inp, w, b).shape
            cot = cot if out_shape == cot.shape else cot.transpose(1, 2)  # the anchor's [B, D, T] view
            step()
            ms = bench(step)
        except Exception as err:
            print(f"  {name:40s} failed: {type(err).__name__}: {str(err)[:120]}")
            continue
        times[name] = ms
        add_row(case, name, ms, floor_ms)
    summarize(case, times)


def run_step(bw, B, D, W):
    case = f"decode step (B, D, W) = ({B}, {D}, {W}) bf16"
    print(f"\n== {case} ==", flush=True)
    floor_ms = (B * D * 2 * (2 + 2 * (W - 1)) + D * (W + 1) * 4) / bw * 1e3
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(D, W, device="cuda") / W, torch.randn(D, device="cuda")
    state = torch.randn(B, W - 1, D, device="cuda", dtype=torch.bfloat16)
    impls = {
        "ours (triton)": lambda: causal_conv1d_update(x, state, w, b, "silu", backend="triton"),
        "torch path": lambda: causal_conv1d_update(x, state, w, b, "silu", backend="torch"),
    }
    try:
        from causal_conv1d import causal_conv1d_update as cc_update

        state_c = torch.randn(B, D, W - 1, device="cuda", dtype=torch.bfloat16)  # its layout [B, D, W - 1]
        impls["causal_conv1d_update"] = lambda: cc_update(x, state_c, w, b, "silu")
    except Exception as e:
        print(f"  {'causal_conv1d_update':40s} not installed ({type(e).__name__}: {str(e)[:80]})")
    times = {}
    with torch.no_grad():
        for name, fn in impls.items():
            try:
                fn()
                ms = bench(fn)
            except Exception as err:
                print(f"  {name:40s} failed: {type(err).__name__}: {str(err)[:120]}")
                continue
            times[name] = ms
            add_row(case, name, ms, floor_ms)
    summarize(case, times)


def sweep(bw):
    """A few launch shapes at Mamba's shape, forward and forward + backward, to check the defaults."""
    B, T, D, W = SEGMENTS[0]
    print(f"\n== launch sweep at ({B}, {T}, {D}, {W}) bf16 ==", flush=True)
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(D, W, device="cuda") / W).requires_grad_()
    b = torch.randn(D, device="cuda").requires_grad_()
    gy = torch.randn_like(x)
    n = B * T * D
    for f in [dict(fwd_block_t=16, fwd_block_d=128, fwd_warps=4), dict(fwd_block_t=32, fwd_block_d=128, fwd_warps=8),
              dict(fwd_block_t=64, fwd_block_d=128, fwd_warps=16), dict(fwd_block_t=32, fwd_block_d=256, fwd_warps=16),
              dict(fwd_block_t=8, fwd_block_d=256, fwd_warps=4)]:
        tiles = ConvTiles(**f)
        with torch.no_grad():
            ms = bench(lambda: causal_conv1d_triton(x, w, b, activation="silu", tiles=tiles))
        add_row("sweep fwd", f"fwd {f}", ms, n * 4 / bw * 1e3)
    for f in [dict(bwd_block_t=8, bwd_block_d=128, bwd_warps=4, bwd_tiles=32),
              dict(bwd_block_t=8, bwd_block_d=128, bwd_warps=4, bwd_tiles=8),
              dict(bwd_block_t=8, bwd_block_d=128, bwd_warps=8, bwd_tiles=32),
              dict(bwd_block_t=16, bwd_block_d=128, bwd_warps=8, bwd_tiles=16),
              dict(bwd_block_t=8, bwd_block_d=256, bwd_warps=8, bwd_tiles=32),
              dict(bwd_block_t=16, bwd_block_d=64, bwd_warps=4, bwd_tiles=16),
              dict(bwd_kernel="shift", shift_block_t=16, bwd_block_d=128, bwd_warps=4),
              dict(bwd_kernel="shift", shift_block_t=32, bwd_block_d=128, bwd_warps=4),
              dict(bwd_kernel="shift", shift_block_t=32, bwd_block_d=128, bwd_warps=8),
              dict(bwd_kernel="shift", shift_block_t=64, bwd_block_d=128, bwd_warps=8),
              dict(bwd_kernel="shift", shift_block_t=32, bwd_block_d=256, bwd_warps=8),
              dict(bwd_kernel="shift", shift_block_t=64, bwd_block_d=64, bwd_warps=4)]:
        tiles = ConvTiles(**f)

        def step():
            x.grad = w.grad = b.grad = None
            y, _ = causal_conv1d_triton(x, w, b, activation="silu", tiles=tiles)
            y.backward(gy)
        ms = bench(step)
        add_row("sweep fwd+bwd", f"fwd+bwd {f}", ms, n * 10 / bw * 1e3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write all rows to this file")
    p.add_argument("--sweep", action="store_true", help="also sweep the kernels' launch shapes")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/causal_conv.py needs a CUDA device")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    bw = copy_bandwidth()
    print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")
    for B, T, D, W in SEGMENTS:
        for backward in (False, True):
            run_segment(bw, B, T, D, W, backward)
            torch.cuda.empty_cache()
    for B, D, W in STEPS:
        run_step(bw, B, D, W)
    if args.sweep:
        sweep(bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bw, "device": torch.cuda.get_device_name(), "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
    main()
