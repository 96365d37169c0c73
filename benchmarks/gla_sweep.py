# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Launch-parameter sweep of the GLA / simple GLA Triton kernels: one line per variant, to pick defaults.

    python benchmarks/gla_sweep.py [--ops gla,simple_gla] [--shape 8,4096,16,128] [--gate gla|strong]
                                   [--variants default,bwd_bk=128,...] [--profile] [--list] [--json out.json]

Each variant is ``gla_options``' defaults (per op: the scalar decay's key blocks are wider) with a few
fields replaced (``VARIANTS``; ``--list`` prints
them, no GPU needed). For each op and variant: the forward (no gradients) and forward + backward
(random cotangents on o and the final state, no initial state) of ``gla_triton`` at (B, T, H, K = V),
bf16, median ms by ``triton.testing.do_bench``, and the ratio to the default variant; fla's
``chunk_gla`` / ``chunk_simple_gla`` are timed once as the anchors when installed. ``--profile`` adds
the default variant's device time per kernel (torch.profiler), one forward + backward.

Gates: ``gla`` is ``logsigmoid(x) / 16`` (GLA's usual normaliser: form A everywhere), ``strong``
``logsigmoid(x) - 6`` per step (every chunk flagged: forms B / C, the slow path's cost).

Needs a CUDA device (``--list`` and ``--help`` do not). Imports torch; triton, seqblocks and fla when timing.

Shapes: B batch, T time, H heads, K key width, V value width.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

# (name, overrides of gla_options): the default first, then one or two fields at a time ('+' joins them)
VARIANTS: list[tuple[str, dict]] = [
    ("default", {}),
    # _fwd_chunk: key step and warps
    ("fwd_bk=16", {"fwd_bk": 16}),
    ("fwd_bk=64", {"fwd_bk": 64}),
    ("fwd_bk=64+fwd_warps=4", {"fwd_bk": 64, "fwd_warps": 4}),
    ("fwd_bk=32", {"fwd_bk": 32}),
    ("fwd_bk=128", {"fwd_bk": 128}),
    ("fwd_warps=4", {"fwd_warps": 4}),
    ("fwd_stages=1", {"fwd_stages": 1}),
    ("fwd_stages=3", {"fwd_stages": 3}),
    # the chunk walks _fwd_state / _bwd_dstate
    ("state_bv=16", {"state_bv": 16}),
    ("state_bv=64", {"state_bv": 64}),
    ("state_warps=4", {"state_warps": 4}),
    ("state_bv=16+state_warps=4", {"state_bv": 16, "state_warps": 4}),
    ("state_stages=1", {"state_stages": 1}),
    ("state_stages=3", {"state_stages": 3}),
    # _bwd_chunk: key block (128 covers K = 128: dv in the same kernel, no _bwd_dv), V tile, warps
    ("bwd_bk=128", {"bwd_bk": 128}),
    ("bwd_bk=128+bwd_bv=16", {"bwd_bk": 128, "bwd_bv": 16}),
    ("bwd_bk=64", {"bwd_bk": 64}),
    ("bwd_bk=32", {"bwd_bk": 32}),
    ("bwd_bk=32+bwd_warps=4", {"bwd_bk": 32, "bwd_warps": 4}),
    ("bwd_bv=16", {"bwd_bv": 16}),
    ("bwd_bv=64", {"bwd_bv": 64}),
    ("bwd_warps=4", {"bwd_warps": 4}),
    ("bwd_stages=1", {"bwd_stages": 1}),
    ("bwd_stages=3", {"bwd_stages": 3}),
    # _bwd_dv (only when bwd_bk < K)
    ("dv_bv=32", {"dv_bv": 32}),
    ("dv_bv=128", {"dv_bv": 128}),
    ("dv_warps=8", {"dv_warps": 8}),
    # score forms: every decaying chunk through the flagged-chunk launches (B, then C)
    ("formsB:chunk_range=0", {"chunk_range": 0.0}),
    ("formsC:chunk_range=0+block_range=0", {"chunk_range": 0.0, "block_range": 0.0}),
]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="gla,simple_gla", help="comma-separated: gla, simple_gla")
    p.add_argument("--shape", default="8,4096,16,128", help="B,T,H,K (V = K)")
    p.add_argument("--gate", choices=("gla", "strong"), default="gla", help="the log-decay (see the docstring)")
    p.add_argument("--variants", default="", help="comma-separated variant names (default: all; see --list)")
    p.add_argument("--fwd-only", action="store_true", help="time the forward only")
    p.add_argument("--profile", action="store_true", help="device time per kernel of the default variant")
    p.add_argument("--list", action="store_true", help="print the variants and exit (no GPU needed)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in ops if o not in ("gla", "simple_gla")]
    if bad:
        p.error(f"--ops: unknown op(s) {bad}; expected gla, simple_gla")
    try:
        shape = tuple(int(x) for x in args.shape.split(","))
    except ValueError:
        p.error(f"--shape must be four ints B,T,H,K, got {args.shape!r}")
    if len(shape) != 4 or min(shape) <= 0:
        p.error(f"--shape must be four positive ints B,T,H,K, got {args.shape!r}")
    chosen = [v for v in args.variants.split(",") if v] if args.variants else [n for n, _ in VARIANTS]
    unknown = [v for v in chosen if v not in dict(VARIANTS)]
    if unknown:
        p.error(f"--variants: unknown variant(s) {unknown}; see --list")
    args.ops, args.shape, args.variants = ops, shape, chosen
    return args


def _inputs(op, B, T, H, K, gate):
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v = r(B, T, H, K) * K**-0.5, r(B, T, H, K) * K**-0.5, r(B, T, H, K)
    shape = (B, T, H) if op == "simple_gla" else (B, T, H, K)
    x = torch.nn.functional.logsigmoid(torch.randn(*shape, device="cuda"))
    g = x / 16 if gate == "gla" else x - 6
    return q, k, v, (g.float() if op == "simple_gla" else g.to(torch.bfloat16))


def _timers(fn, tensors):
    """(forward closure, forward + backward closure) of ``fn(q, k, v, g) -> (o, final state)``."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with torch.no_grad():
        o, s = fn(*tensors)
    cot = [torch.randn_like(o), torch.randn_like(s)]

    def fwd():
        with torch.no_grad():
            fn(*tensors)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(list(fn(*leaves)), cot)

    return fwd, fwd_bwd


def _profile(run) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None) -> int:
    args = _parse(argv)
    if args.list:
        for name, over in VARIANTS:
            print(f"{name:40s} {over}")
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from seqblocks.ops.gla.triton import gla_options, gla_triton

    bench = lambda f: do_bench(f, warmup=10, rep=50, return_mode="median")  # noqa: E731
    B, T, H, K = args.shape
    rows = []
    print(f"device {torch.cuda.get_device_name()}; (B, T, H, K = V) = {args.shape}, bf16, gate {args.gate}",
          flush=True)
    for op in args.ops:
        torch.manual_seed(0)
        tensors = _inputs(op, B, T, H, K, args.gate)
        scalar = op == "simple_gla"
        print(f"\n== {op} ==", flush=True)
        try:
            import fla.ops.gla as fla_gla
            import fla.ops.simple_gla as fla_sgla

            anchor = fla_sgla.chunk_simple_gla if scalar else fla_gla.chunk_gla
            fwd, fwd_bwd = _timers(lambda q, k, v, g: anchor(q, k, v, g, output_final_state=True), tensors)
            f = bench(fwd)
            fb = None if args.fwd_only else bench(fwd_bwd)
            print(f"  {'fla anchor':40s} fwd {f:8.3f} ms" + ("" if fb is None else f"  fwd+bwd {fb:8.3f} ms"),
                  flush=True)
            rows.append({"op": op, "variant": "fla anchor", "fwd_ms": f, "fwd_bwd_ms": fb})
        except Exception as e:  # an anchor that fails to import or run is reported, never a crash
            print(f"  fla anchor: not run ({type(e).__name__}: {str(e)[:120]})", flush=True)
        base = None
        for name in args.variants:
            over = dict(VARIANTS)[name]
            try:
                opts = gla_options(K, K, torch.bfloat16, scalar=scalar, **over)
                fn = lambda q, k, v, g: gla_triton(q, k, v, g, scale=K**-0.5, output_final_state=True,
                                                   scalar=scalar, options=opts)
                fwd, fwd_bwd = _timers(fn, tensors)
                f = bench(fwd)
                fb = None if args.fwd_only else bench(fwd_bwd)
            except Exception as e:  # one failing variant never ends the sweep
                print(f"  {name:40s} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            if base is None and name == "default":
                base = (f, fb)
            rel = "" if base is None else f"  ({f / base[0]:5.2f}x" + (
                ")" if fb is None or base[1] is None else f", {fb / base[1]:5.2f}x)")
            print(f"  {name:40s} fwd {f:8.3f} ms" + ("" if fb is None else f"  fwd+bwd {fb:8.3f} ms") + rel,
                  flush=True)
            rows.append({"op": op, "variant": name, "overrides": over, "fwd_ms": f, "fwd_bwd_ms": fb})
        if args.profile:
            opts = gla_options(K, K, torch.bfloat16, scalar=scalar)
            fn = lambda q, k, v, g: gla_triton(q, k, v, g, scale=K**-0.5, output_final_state=True, scalar=scalar,
                                               options=opts)
            _, fwd_bwd = _timers(fn, tensors)
            print(f"  -- {op} default: device time per kernel, one forward + backward", flush=True)
            for key, ms in _profile(fwd_bwd):
                print(f"     {ms:8.3f} ms  {key[:100]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "shape": args.shape, "gate": args.gate, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
