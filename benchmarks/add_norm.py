# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Fused residual add + LayerNorm / RMSNorm: ours against the anchors, one run, against the HBM floor.

    python benchmarks/add_norm.py [--json out.json] [--residual-fp32] [--sweep]

Cases: (M, D) = (32768, 2048) and (8 * 2048, 768), bf16 x and residual, fp32 weight (and bias for
LayerNorm), ``prenorm=True`` (the Block's call: y and the new residual r both returned), RMS and
Layer, forward and forward + backward (random cotangents on y and r). Rows:

- ours: ``seqblocks.ops.add_norm.add_norm(..., backend="triton")``;
- torch: the same op, ``backend="torch"`` (the unfused reference math);
- mamba_ssm: ``mamba_ssm.ops.triton.layer_norm.layer_norm_fn`` / ``rms_norm_fn`` (when it imports);
- fla: ``fla.modules.norm.layernorm.layer_norm`` / ``rms_norm`` (when it imports);
- liger: ``liger_kernel``'s RMSNorm on ``x + residual`` (it has no fused residual; RMS only).

The floor is the fewest bytes over the device-copy bandwidth measured in the same run. Bytes,
counted per element of the M x D rows (e = 2 for bf16, e_r for the residual's storage dtype):
forward reads x and residual (2e) and writes y and r (e + e_r); backward reads dy, dr and r
(e + 2 e_r) and writes dx and dresidual (2e); plus per row 8 bytes of mean / rstd (written
forward, read backward) and the weight / bias vectors. Each line prints our time, the best
anchor's time in the same run and their ratio; and the device time of the kernels alone
(``torch.profiler``), since at fwd+bwd the host's autograd and launch work can take longer than the
kernels and a wall-clock median then measures the host.

Needs a CUDA device. Shapes: M rows, D features.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
from triton.testing import do_bench

from seqblocks.ops.add_norm import add_norm
from seqblocks.ops.add_norm import triton as an_triton

ROWS: list[dict] = []
SHAPES = [(32768, 2048), (8 * 2048, 768)]


def bench(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def anchors(is_rms: bool) -> dict:
    """name -> callable(x, res, w, b, eps, residual_in_fp32) returning (y, r), or the import error."""
    out: dict = {}
    try:
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn, rms_norm_fn

        if is_rms:
            out["mamba_ssm rms_norm_fn"] = lambda x, r, w, b, eps, f32: rms_norm_fn(
                x, w, None, residual=r, eps=eps, prenorm=True, residual_in_fp32=f32)
        else:
            out["mamba_ssm layer_norm_fn"] = lambda x, r, w, b, eps, f32: layer_norm_fn(
                x, w, b, residual=r, eps=eps, prenorm=True, residual_in_fp32=f32)
    except Exception as e:  # optional anchor
        out["mamba_ssm"] = e
    try:
        from fla.modules.norm.layernorm import layer_norm, rms_norm

        fn = rms_norm if is_rms else layer_norm
        out["fla " + fn.__name__] = lambda x, r, w, b, eps, f32: fn(
            x, w, b, residual=r, eps=eps, prenorm=True, residual_in_fp32=f32)
    except Exception as e:
        out["fla"] = e
    if is_rms:
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            def liger(x, r, w, b, eps, f32):
                s = (x.float() + r.float()).to(torch.float32 if f32 else r.dtype)
                return LigerRMSNormFunction.apply(s.to(x.dtype), w, eps), s

            out["liger RMSNorm (unfused add)"] = liger
        except Exception as e:
            out["liger"] = e
    return out


def kernel_ms(fn, iters: int = 10) -> float:
    """Milliseconds of device time per call summed over the kernels ``fn`` launches (torch.profiler):
    the time without the host's share, which a wall-clock median of a short op includes when the
    host launches slower than the device runs (autograd and Triton launches at fwd+bwd)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        total += (ev.cuda_time_total if t is None else t) if ev.key and not ev.key.startswith("cuda") else 0.0
    return total / 1e3 / iters


def add_row(case, name, ms, floor_ms, kernels=None):
    pct = 100 * floor_ms / ms
    ROWS.append({"case": case, "name": name, "ms": ms, "floor_ms": floor_ms, "pct_of_floor": pct,
                 "kernel_ms": kernels, "kernel_pct_of_floor": None if kernels is None else 100 * floor_ms / kernels})
    extra = "" if kernels is None else f"   kernels {kernels:.3f} ms ({100 * floor_ms / kernels:5.1f}%)"
    print(f"  {name:40s} {ms:8.3f} ms   {pct:5.1f}% of floor ({floor_ms:.3f} ms){extra}", flush=True)


def run_case(bw, M, D, is_rms, r_fp32, backward):
    kind = "RMSNorm" if is_rms else "LayerNorm"
    case = f"{kind} ({M}, {D}) bf16 {'fwd+bwd' if backward else 'fwd'}{' residual fp32' if r_fp32 else ''}"
    print(f"\n== {case} ==", flush=True)
    e, er = 2, 4 if r_fp32 else 2
    n_params = D * (1 if is_rms else 2) * 4
    fwd_bytes = M * D * (2 * e + e + er) + M * 8 + n_params
    bwd_bytes = M * D * (e + 2 * er + 2 * e) + M * 8 + 2 * n_params
    floor_ms = (fwd_bytes + (bwd_bytes if backward else 0)) / bw * 1e3
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    res = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    w = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_(backward)
    b = None if is_rms else (0.1 * torch.randn(D, device="cuda")).requires_grad_(backward)
    gy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    gr = torch.randn(M, D, device="cuda", dtype=torch.float32 if r_fp32 else torch.bfloat16)
    impls = {
        "ours (triton)": lambda x, r, w, b, eps, f32: add_norm(x, r, w, b, eps, is_rms, f32, True, backend="triton"),
        "torch path": lambda x, r, w, b, eps, f32: add_norm(x, r, w, b, eps, is_rms, f32, True, backend="torch"),
    }
    for name, fn in anchors(is_rms).items():
        if isinstance(fn, Exception):
            print(f"  {name:40s} not installed ({type(fn).__name__}: {str(fn)[:80]})")
        else:
            impls[name] = fn
    times = {}
    for name, fn in impls.items():
        def step():
            for t in (x, res, w, b):  # no gradient accumulation inside the timed region
                if t is not None:
                    t.grad = None
            y, r = fn(x, res, w, b, 1e-5, r_fp32)
            if backward:
                torch.autograd.backward([y, r], [gy, gr.to(r.dtype)])
        try:
            if backward:
                step()
            call = step if backward else (lambda: fn(x, res, w, b, 1e-5, r_fp32))
            ms, kms = bench(call), kernel_ms(call)
        except Exception as err:  # an anchor that fails at these options is reported, not fatal
            print(f"  {name:40s} failed: {type(err).__name__}: {str(err)[:120]}")
            continue
        times[name] = ms
        add_row(case, name, ms, floor_ms, kms)
    ours = times.get("ours (triton)")
    others = {k: v for k, v in times.items() if k not in ("ours (triton)", "torch path")}
    if ours and others:
        best = min(others, key=others.get)
        print(f"  -> ours {ours:.3f} ms vs best anchor {best} {others[best]:.3f} ms: "
              f"{others[best] / ours:.2f}x", flush=True)
        ROWS.append({"case": case, "summary": True, "ours_ms": ours, "best_anchor": best,
                     "best_anchor_ms": others[best], "speedup": others[best] / ours})


def sweep(bw):
    """Forward and backward launch shapes at (32768, 2048) RMS (kernels launched directly), to check
    ``launch_config`` and the backward's programs per SM."""
    print("\n== launch sweep: RMSNorm (32768, 2048) bf16 ==", flush=True)
    M, D = 32768, 2048
    x, res = (torch.randn(M, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.ones(D, device="cuda")
    y, r = torch.empty_like(x), torch.empty_like(x)
    rstd = torch.empty(M, device="cuda")
    floor_ms = M * D * 8 / bw * 1e3
    for rows in (1, 2, 4):
        for nw in (2, 4, 8, 16):
            ms = bench(lambda: an_triton._add_norm_fwd_kernel[(triton.cdiv(M, rows),)](
                x, res, w, None, y, r, rstd, rstd, M, D, 1e-5, HAS_RES=True, HAS_W=True, HAS_B=False,
                STORE_R=True, IS_RMS=True, ROWS=rows, BLOCK_D=D, num_warps=nw))
            add_row("sweep fwd", f"fwd rows={rows} num_warps={nw}", ms, floor_ms)
    dy, dr, dx, dres = (torch.randn(M, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    rstd = torch.rand(M, device="cuda") + 0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    floor_ms = M * D * 10 / bw * 1e3  # read dy, dr, r; write dx, dresidual
    for rows, nw in ((1, 4), (1, 8), (2, 8)):
        for per_sm in (2, 4, 8):
            tiles = triton.cdiv(M, rows)
            n_prog = min(tiles, per_sm * sms)
            tpp = triton.cdiv(tiles, n_prog)
            n_prog = triton.cdiv(tiles, tpp)
            dw_part = torch.empty(n_prog, D, device="cuda")
            ms = bench(lambda: an_triton._add_norm_bwd_kernel[(n_prog,)](
                dy, dr, r, w, rstd, rstd, dx, dres, dw_part, None, M, D, tpp, HAS_DR_OUT=True, HAS_W=True,
                HAS_B=False, STORE_DRES=True, IS_RMS=True, ROWS=rows, BLOCK_D=D, num_warps=nw))
            add_row("sweep bwd", f"bwd rows={rows} num_warps={nw} programs/SM={per_sm}", ms, floor_ms)
    print(f"  defaults: forward {an_triton.launch_config(D)}, backward {an_triton.launch_config(D, True)} "
          f"(BLOCK_D, ROWS, num_warps), backward programs 4 / SM")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write all rows to this file")
    p.add_argument("--residual-fp32", action="store_true", help="store r in fp32 (residual_in_fp32)")
    p.add_argument("--sweep", action="store_true", help="also sweep the kernels' launch shapes")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/add_norm.py needs a CUDA device")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    bw = copy_bandwidth()
    print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")
    for M, D in SHAPES:
        for is_rms in (True, False):
            for backward in (False, True):
                run_case(bw, M, D, is_rms, args.residual_fp32, backward)
                torch.cuda.empty_cache()
    if args.sweep:
        sweep(bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bw, "device": torch.cuda.get_device_name(), "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
    main()
