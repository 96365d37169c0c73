"""Benchmark of ``linear_scan``'s pure-PyTorch path against a Python-loop recurrence and against the
sequential reference (``linear_scan_ref``), forward and forward + backward.

    python benchmarks/scan_torch.py                 # CPU, small shapes
    python benchmarks/scan_torch.py --device cuda   # GPU, larger shapes
    python benchmarks/scan_torch.py --device cuda --mixers   # also the LTI mixers, conv vs scan mode

Prints one row per (shape, dtype, pass): median milliseconds of each path and the speed-up of the
fast path. The reference loops over rows and time, so it only runs where ``B * T <= --ref-limit``, and
the Python loop only where ``T <= --loop-limit``.

Shapes: B batch, T time, D state width.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seqblocks.ops.scan import linear_scan, linear_scan_ref


def loop_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain recurrence: one vectorised step per time index (what a model without a scan does)."""
    h = torch.zeros_like(b[:, 0])
    out = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1), h


def bench(fn, *, backward: bool, device: str, reps: int) -> float:
    def once():
        out = fn()
        if backward:
            (out[0].real.sum() + out[1].real.sum()).backward()

    once()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_mixers(device: str, reps: int, B: int, T: int, D: int) -> None:
    """Forward + backward of each LTI mixer in conv and scan mode."""
    from seqblocks import LRU, S4, S4D, S5, Centaurus

    print(f"LTI mixers fwd+bwd, B={B} T={T} D={D} d_state=64, fp32 parameters, bf16 input")
    print(f"{'mixer':>10} {'conv ms':>9} {'scan ms':>9}")
    x = torch.randn(B, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    for cls in (LRU, S4, S4D, S5, Centaurus):
        m = cls(D, d_state=64).to(device)
        row = []
        for mode in ("conv", "scan"):
            m.mode = mode
            row.append(bench(lambda m=m: (m(x).float(), torch.zeros(())), backward=True, device=device, reps=reps))
        print(f"{cls.__name__:>10} {row[0]:9.2f} {row[1]:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ref-limit", type=int, default=4096, help="largest B*T the reference runs at")
    parser.add_argument("--loop-limit", type=int, default=16384, help="longest T the Python loop runs at")
    parser.add_argument("--shapes", default=None, help="e.g. 4x1024x256,1x16384x64")
    parser.add_argument("--mixers", action="store_true", help="also time the LTI mixers (conv vs scan)")
    parser.add_argument("--mixer-shape", default="8x4096x256", help="B x T x D of the mixer benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    elif args.device == "cuda":
        shapes = [(4, 1024, 256), (8, 4096, 1024), (2, 16384, 512), (1, 65536, 256)]
    else:
        shapes = [(2, 512, 64), (4, 2048, 256), (1, 16384, 64)]
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}"
          + (f" gpu={torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    print(f"{'B x T x D':>18} {'dtype':>9} {'pass':>8} {'fast ms':>9} {'loop ms':>9} {'ref ms':>9} "
          f"{'loop/fast':>9} {'ref/fast':>9}")
    for B, T, D in shapes:
        for dtype in (torch.float32, torch.complex64):
            for backward in (False, True):
                mag = torch.rand(B, T, D, device=args.device) * 0.1 + 0.9
                a = (torch.polar(mag, torch.rand_like(mag)) if dtype.is_complex else mag).requires_grad_(backward)
                b = torch.randn(B, T, D, device=args.device, dtype=dtype).requires_grad_(backward)
                ctx = torch.enable_grad() if backward else torch.no_grad()
                opts = {"backward": backward, "device": args.device}
                with ctx:
                    fast = bench(lambda a=a, b=b: linear_scan(a, b), reps=args.reps, **opts)
                    loop = float("nan")
                    if T <= args.loop_limit:
                        loop = bench(lambda a=a, b=b: loop_scan(a, b), reps=args.reps, **opts)
                    ref = float("nan")
                    if B * T <= args.ref_limit:
                        ref = bench(lambda a=a, b=b: linear_scan_ref(a, b), reps=max(1, args.reps // 2), **opts)
                name = "fwd+bwd" if backward else "fwd"
                print(f"{f'{B}x{T}x{D}':>18} {str(dtype)[6:]:>9} {name:>8} {fast:9.2f} {loop:9.2f} {ref:9.2f} "
                      f"{loop / fast:9.1f} {ref / fast:9.1f}")
    if args.mixers:
        bench_mixers(args.device, args.reps, *(int(v) for v in args.mixer_shape.split("x")))


if __name__ == "__main__":
    main()
