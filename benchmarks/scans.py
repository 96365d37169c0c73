# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Scan benchmarks: one run, one table per section, against a roofline measured in the same run.

    python benchmarks/scans.py [--quick] [--sections linear,selective,layers] [--json out.json]

Sections:
- ``linear``: the diagonal scan h_t = a_t h_{t-1} + b_t at (B, T, D) = (8, 4096, 4096): ours (Triton),
  fla's ``chunk_hgrn`` and ``fused_recurrent_hgrn`` (when ``fla`` imports), our PyTorch path and a
  Python loop over time; forward and forward+backward; bf16 and fp32; real and complex. Each row gives
  the time (median of ``triton.testing.do_bench``) and the % of the HBM floor: the fewest bytes
  (each input read once, each output written once) over the copy bandwidth measured here.
- ``selective``: the selective scan at (B, T, D, N) = (8, 2048, 4096, 16), forward and
  forward+backward, against max(bytes / bandwidth, exps / measured exp rate).
- ``layers``: forward+backward of every registered mixer that builds from ``d_model`` alone, at
  B=32, d_model=128, T=2048 in fp32 and bf16, backend "auto" (Triton) and "torch".

Needs a CUDA device. Imports only torch, triton and seqblocks (fla optional).

Shapes: B batch, T time, D channels, N state.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from seqblocks.ops.scan import ScanTuning
from seqblocks.ops.scan import linear_scan as _linear_scan
from seqblocks.ops.scan.triton import linear_scan_triton
from seqblocks.ops.selective_scan import SelectiveScanTuning

ROWS: list[dict] = []


def linear_scan(a, b, backend, tuning=None):
    # The Triton rows call the kernel entry directly (the op adds only input checks on top).
    if backend == "triton":
        return linear_scan_triton(a, b, tuning=tuning)
    return _linear_scan(a, b, backend=backend)


def bench(fn, warmup=25, rep=100) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_slow(fn, n=2) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    n = 1 << 28
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


@triton.jit
def _exp_rate_kernel(x_ptr, y_ptr, n, REPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    acc = x
    for _ in range(REPS):
        acc = tl.exp(acc * -0.5)  # one MUFU.EX2 each (plus a multiply), a dependent chain
    tl.store(y_ptr + offs, acc, mask=offs < n)


def exp_rate() -> float:
    """exp evaluations per second (the special-function units' rate, measured)."""
    n = 1 << 24
    reps = 256
    x = torch.rand(n, device="cuda")
    y = torch.empty_like(x)
    grid = (triton.cdiv(n, 1024),)
    ms = bench(lambda: _exp_rate_kernel[grid](x, y, n, REPS=reps, BLOCK=1024, num_warps=8))
    return n * reps / (ms * 1e-3)


def add_row(section, name, ms, floor_ms=None, note=""):
    row = {"section": section, "name": name, "ms": ms, "floor_ms": floor_ms,
           "pct": (100 * floor_ms / ms) if (floor_ms and ms) else None, "note": note}
    ROWS.append(row)
    pct = f"{row['pct']:6.1f}%" if row["pct"] is not None else "      -"
    fl = f"{floor_ms:8.3f}" if floor_ms else "       -"
    print(f"  {name:58s} {ms:9.3f} ms  floor {fl} ms {pct}  {note}", flush=True)


def fwd_bwd(fn, inputs, outs_fn=None):
    """A closure running forward + backward with fixed random cotangents on every output."""
    def run():
        for x in inputs:
            x.grad = None
        outs = fn()
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        outs = [o for o in outs if o is not None and o.requires_grad]
        if not hasattr(run, "cot"):
            run.cot = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, run.cot)
    return run


# ----------------------------------------------------------------------------------------------------
# linear scan
# ----------------------------------------------------------------------------------------------------


def section_linear(bw, quick):
    print("\n== diagonal linear scan ==", flush=True)
    B, T, D = (8, 4096, 4096)
    try:
        from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
    except Exception as e:  # fla is optional
        print(f"  (fla not available: {e!r})")
        chunk_hgrn = fused_recurrent_hgrn = None
    for dtype in (torch.bfloat16, torch.float32):
        esz = torch.finfo(dtype).bits // 8
        n = B * T * D
        fl_f = 3 * n * esz / bw * 1e3  # read a, b; write h
        fl_fb = 8 * n * esz / bw * 1e3  # + read a, b, dh; write da, db
        a = (torch.rand(B, T, D, device="cuda") * 0.1 + 0.9).to(dtype).requires_grad_()
        b = torch.randn(B, T, D, device="cuda", dtype=dtype).requires_grad_()
        g = a.detach().float().log().to(dtype).requires_grad_()
        tag = f"real {str(dtype)[6:]} ({B},{T},{D})"
        with torch.no_grad():
            add_row("linear", f"ours triton fwd  {tag}", bench(lambda: linear_scan(a, b, backend="triton")), fl_f)
        add_row("linear", f"ours triton fwd+bwd {tag}",
                bench(fwd_bwd(lambda: linear_scan(a, b, backend="triton"), [a, b])), fl_fb)
        if chunk_hgrn is not None:
            with torch.no_grad():
                add_row("linear", f"fla chunk_hgrn fwd {tag}", bench(lambda: chunk_hgrn(b, g)), fl_f)
                add_row("linear", f"fla fused_recurrent_hgrn fwd {tag}",
                        bench(lambda: fused_recurrent_hgrn(b, g)), fl_f)
            add_row("linear", f"fla chunk_hgrn fwd+bwd {tag}", bench(fwd_bwd(lambda: chunk_hgrn(b, g), [b, g])),
                    fl_fb)
            add_row("linear", f"fla fused_recurrent_hgrn fwd+bwd {tag}",
                    bench(fwd_bwd(lambda: fused_recurrent_hgrn(b, g), [b, g])), fl_fb)
        with torch.no_grad():
            add_row("linear", f"ours torch fwd {tag}", bench(lambda: linear_scan(a, b, backend="torch"), 5, 20),
                    fl_f)
        add_row("linear", f"ours torch fwd+bwd {tag}",
                bench(fwd_bwd(lambda: linear_scan(a, b, backend="torch"), [a, b]), 5, 20), fl_fb)
        if not quick and dtype == torch.bfloat16:
            def loop():
                h = torch.zeros(B, D, device="cuda", dtype=torch.float32)
                out = []
                for t in range(T):
                    h = a[:, t].float() * h + b[:, t].float()
                    out.append(h)
                return torch.stack(out, 1).to(dtype)
            with torch.no_grad():
                add_row("linear", f"python loop fwd {tag}", bench_slow(loop), fl_f)
            add_row("linear", f"python loop fwd+bwd {tag}", bench_slow(fwd_bwd(loop, [a, b]), 1), fl_fb)
    # complex64 (real / imaginary fp32 pairs)
    n = B * T * D
    fl_f = 3 * n * 8 / bw * 1e3
    fl_fb = 8 * n * 8 / bw * 1e3
    a = torch.polar(torch.rand(B, T, D, device="cuda") * 0.1 + 0.9,
                    torch.randn(B, T, D, device="cuda")).requires_grad_()
    b = torch.randn(B, T, D, device="cuda", dtype=torch.complex64).requires_grad_()
    tag = f"complex64 ({B},{T},{D})"
    with torch.no_grad():
        add_row("linear", f"ours triton fwd  {tag}", bench(lambda: linear_scan(a, b, backend="triton")), fl_f)
    add_row("linear", f"ours triton fwd+bwd {tag}",
            bench(fwd_bwd(lambda: linear_scan(a, b, backend="triton"), [a, b])), fl_fb)
    with torch.no_grad():
        add_row("linear", f"ours torch fwd {tag}", bench(lambda: linear_scan(a, b, backend="torch"), 5, 20), fl_f)
    add_row("linear", f"ours torch fwd+bwd {tag}",
            bench(fwd_bwd(lambda: linear_scan(a, b, backend="torch"), [a, b]), 5, 20), fl_fb)


def section_linear_configs(bw):
    """Block-shape sweep of the real bf16 kernel (used to choose the defaults): each point passes its
    (BLOCK_T, BLOCK_D, warps) and backward (BLOCK_D, warps) as an explicit ``ScanTuning``."""
    print("\n== linear scan block sweep (real bf16 (8,4096,4096)) ==", flush=True)
    B, T, D = (8, 4096, 4096)
    a = (torch.rand(B, T, D, device="cuda") * 0.1 + 0.9).to(torch.bfloat16).requires_grad_()
    b = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    fl_f = 3 * B * T * D * 2 / bw * 1e3
    fl_fb = 8 * B * T * D * 2 / bw * 1e3
    for cfg, bcfg in [((32, 32, 2), None), ((32, 32, 2), (16, 1)), ((32, 32, 2), (32, 1)),
                      ((32, 32, 2), (64, 2)), ((16, 32, 1), None), ((32, 16, 1), None), ((64, 32, 2), None),
                      ((32, 64, 2), (32, 2)), ((16, 16, 1), (16, 1))]:
        tuning = ScanTuning(*cfg, *(bcfg or (None, None)))
        try:
            with torch.no_grad():
                f = bench(lambda: linear_scan(a, b, backend="triton", tuning=tuning))
            fb = bench(fwd_bwd(lambda: linear_scan(a, b, backend="triton", tuning=tuning), [a, b]))
            print(f"  BT={cfg[0]:4d} BD={cfg[1]:4d} warps={cfg[2]} bwd {bcfg}: fwd {f:.3f} ms ({100*fl_f/f:.0f}%)  "
                  f"fwd+bwd {fb:.3f} ms ({100*fl_fb/fb:.0f}%)", flush=True)
        except Exception as e:
            print(f"  {cfg}: failed {e!r}")
    del a, b
    a = torch.polar(torch.rand(B, T, D, device="cuda") * 0.1 + 0.9,
                    torch.randn(B, T, D, device="cuda")).requires_grad_()
    b = torch.randn(B, T, D, device="cuda", dtype=torch.complex64).requires_grad_()
    fl_f, fl_fb = fl_f * 4, fl_fb * 4
    for cfg in [(32, 64, 4), (32, 32, 4), (32, 32, 2), (16, 32, 2), (16, 16, 1), (32, 16, 2), (8, 64, 2)]:
        tuning = ScanTuning(*cfg)
        try:
            with torch.no_grad():
                f = bench(lambda: linear_scan(a, b, backend="triton", tuning=tuning))
            fb = bench(fwd_bwd(lambda: linear_scan(a, b, backend="triton", tuning=tuning), [a, b]))
            print(f"  complex BT={cfg[0]:4d} BD={cfg[1]:4d} warps={cfg[2]}: fwd {f:.3f} ms ({100*fl_f/f:.0f}%)  "
                  f"fwd+bwd {fb:.3f} ms ({100*fl_fb/fb:.0f}%)", flush=True)
        except Exception as e:
            print(f"  {cfg}: failed {e!r}")


# ----------------------------------------------------------------------------------------------------
# selective scan
# ----------------------------------------------------------------------------------------------------


def section_selective(bw, er, quick, sweep=False):
    print("\n== selective scan ==", flush=True)
    from seqblocks.ops.selective_scan import selective_scan as _selective_scan
    from seqblocks.ops.selective_scan import triton as ss_triton

    def selective_scan(*args, backend, **kw):
        # The Triton rows call the kernel entry directly (the op adds only input checks on top).
        if backend == "triton":
            return ss_triton.selective_scan_triton(*args, **kw)
        return _selective_scan(*args, backend=backend, **kw)

    Bsz, T, D, N = 8, 2048, 4096, 16
    dtype = torch.bfloat16
    dev = "cuda"
    u = torch.randn(Bsz, T, D, device=dev, dtype=dtype).requires_grad_()
    delta = (torch.randn(Bsz, T, D, device=dev) * 0.5 - 1).to(dtype).requires_grad_()
    A = (-torch.rand(D, N, device=dev) * 4 - 0.5).requires_grad_()
    Bm = torch.randn(Bsz, T, N, device=dev, dtype=dtype).requires_grad_()
    Cm = torch.randn(Bsz, T, N, device=dev, dtype=dtype).requires_grad_()
    Dv = torch.randn(D, device=dev).requires_grad_()
    z = torch.randn(Bsz, T, D, device=dev, dtype=dtype).requires_grad_()
    bias = torch.randn(D, device=dev).requires_grad_()
    ins = [u, delta, A, Bm, Cm, Dv, z, bias]
    esz = 2
    btd = Bsz * T * D
    btn = Bsz * T * N
    # forward: read u, delta, z, B, C; write y.  backward: read u, delta, z, B, C, dy; write du,
    # ddelta, dz (bf16) and dB, dC (fp32, accumulated).
    bytes_f = (4 * btd + 2 * btn) * esz
    bytes_fb = bytes_f + (4 * btd + 2 * btn) * esz + 3 * btd * esz + 2 * btn * 4
    exps_f = btd * N
    exps_fb = 2 * btd * N  # the backward recomputes exp(dt A) at least once
    fl_f = max(bytes_f / bw, exps_f / er) * 1e3
    fl_fb = max(bytes_fb / bw, exps_fb / er) * 1e3
    print(f"  floors: fwd bytes {bytes_f/bw*1e3:.3f} ms, exps {exps_f/er*1e3:.3f} ms; "
          f"fwd+bwd bytes {bytes_fb/bw*1e3:.3f} ms, exps {exps_fb/er*1e3:.3f} ms")

    def call(backend, tuning=None):
        kw = {"tuning": tuning} if backend == "triton" else {}
        return selective_scan(u, delta, A, Bm, Cm, Dv, z, delta_bias=bias, delta_softplus=True,
                              backend=backend, **kw)

    tag = f"mamba bf16 ({Bsz},{T},{D},{N}) D+z+softplus"
    if sweep:
        # ring 4 / 2: the default 4-slot load ring and a 2-slot one
        for ring in (4, 2):
            for fcfg in [(16, 1), (32, 1), (64, 2), (32, 2), (128, 4)]:
                tuning = SelectiveScanTuning(fwd_block_d=fcfg[0], fwd_num_warps=fcfg[1], fwd_ring=ring)
                with torch.no_grad():
                    f = bench(lambda: call("triton", tuning), 5, 30)
                print(f"  sweep sequential fwd ring={ring} BD={fcfg[0]} warps={fcfg[1]}: fwd {f:.3f} ms "
                      f"({100*fl_f/f:.0f}%)", flush=True)
        # BLOCK_T is at least 8 (the load rings divide it)
        for cfg in [(16, 32, 1), (8, 32, 1), (16, 16, 1), (16, 64, 2), (8, 64, 2)]:
            tuning = SelectiveScanTuning(block_t=cfg[0], bwd_block_d=cfg[1], bwd_num_warps=cfg[2])
            try:
                fb = bench(fwd_bwd(lambda: call("triton", tuning), ins), 3, 10)
                print(f"  sweep sequential bwd BT={cfg[0]} BD={cfg[1]} warps={cfg[2]}: fwd+bwd {fb:.3f} ms "
                      f"({100*fl_fb/fb:.0f}%)", flush=True)
            except Exception as e:
                print(f"  sweep {cfg}: failed {e!r}", flush=True)
    for backend in ("triton", "torch"):
        w, r = (25, 100) if backend == "triton" else (3, 10)
        try:
            with torch.no_grad():
                add_row("selective", f"ours {backend} fwd {tag}", bench(lambda: call(backend), w, r), fl_f)
            add_row("selective", f"ours {backend} fwd+bwd {tag}", bench(fwd_bwd(lambda: call(backend), ins), w, r),
                    fl_fb)
        except Exception as e:
            print(f"  {backend}: failed {e!r}")


# ----------------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------------


# Options that put a mixer in its scanning mode (others use their defaults).
LAYER_KWARGS = {"lru": dict(d_state=64), "s5": dict(d_state=64), "s4d": dict(mode="scan"),
                "centaurus": dict(mode="scan")}
SCANNING = ("lru", "s5", "s4d", "centaurus", "mamba", "rglru", "s7")


def section_layers(quick):
    print("\n== mixers: forward+backward at B=32, d_model=128, T=2048 (auto = Triton scans, torch = "
          "PyTorch path) ==", flush=True)
    import seqblocks  # noqa: F401  (registers the mixers)
    from seqblocks.layers.adapters import call_any_mixer
    from seqblocks.ops import prefer_backend
    from seqblocks.registry import MIXERS

    Bsz, d, T = 32, 128, 2048
    names = [n for n in SCANNING if n in MIXERS]
    for name in names:
        cls = MIXERS.get(name)
        for dtype in (torch.float32, torch.bfloat16):
            try:
                try:
                    m = cls(d, device="cuda", dtype=dtype, **LAYER_KWARGS.get(name, {}))
                except (TypeError, ValueError):
                    m = cls(d, device="cuda", dtype=dtype)
            except Exception as e:
                print(f"  {name}: cannot build ({e!r})")
                break
            x = torch.randn(Bsz, T, d, device="cuda", dtype=dtype, requires_grad=True)
            params = [p for p in m.parameters() if p.requires_grad] + [x]
            for backend in ("auto", "torch"):
                try:
                    with prefer_backend(backend):
                        add_row("layers", f"{name} {str(dtype)[6:]} fwd+bwd [{backend}]",
                                bench(fwd_bwd(lambda: call_any_mixer(m, x), params), 3, 20))
                except Exception as e:
                    print(f"  {name} {dtype} {backend}: failed {str(e)[:200]!r}")
            m = x = params = None
            torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip the slow Python-loop baselines")
    p.add_argument("--sections", default="linear,selective,layers")
    p.add_argument("--sweep", action="store_true", help="also sweep the linear kernel's block shapes")
    p.add_argument("--json", default=None, help="write all rows to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/scans.py needs a CUDA device")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    bw = copy_bandwidth()
    er = exp_rate()
    print(f"measured copy bandwidth: {bw/1e12:.2f} TB/s (read + write); exp rate: {er/1e12:.2f} T/s")
    secs = args.sections.split(",")
    if args.sweep and "linear" in secs:
        section_linear_configs(bw)
    if "linear" in secs:
        section_linear(bw, args.quick)
    if "selective" in secs:
        section_selective(bw, er, args.quick, args.sweep)
    if "layers" in secs:
        section_layers(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bw, "exp_rate": er, "rows": ROWS,
                       "device": torch.cuda.get_device_name()}, f, indent=1)
    _ = math


if __name__ == "__main__":
    main()
