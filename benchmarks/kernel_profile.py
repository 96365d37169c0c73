"""Where an op's time goes: every GPU kernel of one forward and one forward + backward, by name.

    python benchmarks/kernel_profile.py [--ops delta,ssd,gla,simple_gla,scan,add_norm] [--json out.json]

The timing benchmarks (``delta_rule.py``, ``ssd.py``, ``vs_mamba_ssm.py``) give an op's total; this
one says which of its kernels to work on. Each op runs a few times to compile and warm up, then
``torch.profiler`` records ``--iters`` calls and the kernels' device times are summed by name and
divided by the call count. Shapes are the issues' benchmark shapes, bf16:

- ``delta``: ``gated_delta_rule`` (8, 4096, 16, 128, 128), L2-normalised q / k, initial state;
- ``ssd``: ``ssd`` (B 8, T 2048, H 24, P 64, N 128), one group, D skip, dt bias + softplus;
- ``gla`` / ``simple_gla``: (8, 4096, 16, 128, 128), per-key / scalar decay;
- ``scan``: ``selective_scan`` (8, 2048, 1536, 16), Mamba's configuration (z, D, delta bias + softplus);
- ``add_norm``: fused add + RMSNorm (32768, 2048), fp32 residual, prenorm;
- ``train`` / ``train_hybrid``: a mamba-130m / hybrid-130m LM train step, B8 T2048, bf16 autocast, fused
  AdamW (the rows of ``vs_mamba_ssm.py --rows train``), every kernel of the step.

Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch


def _r(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_()


def make_delta():
    from seqblocks.ops.delta_rule import gated_delta_rule

    B, T, H, K, V = 8, 4096, 16, 128, 128
    q, k, v = _r(B, T, H, K), _r(B, T, H, K), _r(B, T, H, V)
    g = (-torch.rand(B, T, H, device="cuda") * 0.1).bfloat16().requires_grad_()
    beta = torch.rand(B, T, H, device="cuda").bfloat16().requires_grad_()
    h0 = _r(B, H, K, V, dtype=torch.float32, scale=0.01)
    ins = [q, k, v, g, beta, h0]
    return ins, lambda: gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         use_qk_l2norm=True, backend="triton")


def make_ssd():
    from seqblocks.ops.ssd import ssd

    B, T, H, P, N = 8, 2048, 24, 64, 128
    x = _r(B, T, H, P)
    dt = (torch.randn(B, T, H, device="cuda") * 0.5 - 2).bfloat16().requires_grad_()
    A = (-torch.empty(H, device="cuda").uniform_(1, 16)).requires_grad_()
    Bm, Cm = _r(B, T, 1, N), _r(B, T, 1, N)
    D = torch.ones(H, device="cuda", requires_grad=True)
    dt_bias = (torch.randn(H, device="cuda") * 0.5).requires_grad_()
    ins = [x, dt, A, Bm, Cm, D, dt_bias]
    return ins, lambda: ssd(x, dt, A, Bm, Cm, D, dt_bias=dt_bias, return_final_state=True, chunk_size=256)


def _make_gla(scalar):
    from seqblocks.ops.gla import gla, simple_gla

    B, T, H, K, V = 8, 4096, 16, 128, 128
    q, k, v = _r(B, T, H, K), _r(B, T, H, K), _r(B, T, H, V)
    shape = (B, T, H) if scalar else (B, T, H, K)
    g = (torch.nn.functional.logsigmoid(torch.randn(*shape, device="cuda")) / 16).bfloat16().requires_grad_()
    fn = simple_gla if scalar else gla
    return [q, k, v, g], lambda: fn(q, k, v, g, output_final_state=True, backend="triton")


def make_scan():
    from seqblocks.ops.selective_scan import selective_scan

    Bsz, T, D, N = 8, 2048, 1536, 16
    u, delta, z = _r(Bsz, T, D), _r(Bsz, T, D, scale=0.5), _r(Bsz, T, D)
    A = (-torch.rand(D, N, device="cuda") - 0.5).requires_grad_()
    Bm, Cm = _r(Bsz, T, N), _r(Bsz, T, N)
    Dv = torch.ones(D, device="cuda", requires_grad=True)
    bias = (torch.randn(D, device="cuda") * 0.1).requires_grad_()
    ins = [u, delta, A, Bm, Cm, Dv, z, bias]
    return ins, lambda: selective_scan(u, delta, A, Bm, Cm, Dv, z, delta_bias=bias, delta_softplus=True,
                                       backend="triton")


def make_add_norm():
    from seqblocks.ops.add_norm import add_norm

    M, D = 32768, 2048
    x, res = _r(M, D), _r(M, D, dtype=torch.float32)
    w = torch.ones(D, device="cuda", requires_grad=True)
    return [x, res, w], lambda: add_norm(x, res, w, None, 1e-5, True, True, True, backend="triton")


def make_train(preset: str = "mamba-130m"):
    """A whole LM train step (forward, cross entropy, backward, fused AdamW) under bf16 autocast: ins is
    empty and fn returns nothing, so ``profile`` runs it as it is in both modes."""
    import torch.nn.functional as F

    from seqblocks.presets import build_model, get_preset

    model = build_model(get_preset(preset)["model"], device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 50000, (8, 2049), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
    return [], step


OPS = {"delta": make_delta, "ssd": make_ssd, "gla": lambda: _make_gla(False),
       "simple_gla": lambda: _make_gla(True), "scan": make_scan, "add_norm": make_add_norm,
       "train": make_train, "train_hybrid": lambda: make_train("hybrid-130m")}


def _outputs(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def profile(fn, ins, backward: bool, iters: int, host: bool = False) -> dict[str, float]:
    """Kernel name -> milliseconds per call; with ``host``, also prints the host ops by self CPU time and
    the wall time per call (the host's share of a short op)."""
    cot = None

    def call():
        nonlocal cot
        for t in ins:
            t.grad = None
        if not ins:  # a whole step: as it is
            return fn()
        if not backward:
            with torch.no_grad():
                return fn()
        outs = _outputs(fn())
        if cot is None:
            cot = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, cot)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if host else [])
    import time

    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / iters
    if host:
        print(f"  host: {wall:.3f} ms wall per call (profiled); top host ops by self CPU time:")
        cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        for ev in cpu:
            print(f"    {ev.self_cpu_time_total / 1e3 / iters:8.3f} ms  {ev.count // iters:4d}x  {ev.key[:90]}")
    per = defaultdict(float)
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if t and ev.key and not ev.key.startswith("cuda"):
            per[ev.key] += t / 1e3 / iters
    return dict(per)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=14, help="kernels printed per op")
    p.add_argument("--host", action="store_true", help="also the host ops by self CPU time, and the wall time")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_profile.py needs a CUDA device")
    torch.manual_seed(0)
    result = {}
    for name in args.ops.split(","):
        ins, fn = OPS[name]()
        for backward in ((True,) if not ins else (False, True)):
            label = f"{name} {'fwd+bwd' if backward else 'fwd'}"
            try:
                per = profile(fn, ins, backward, args.iters, args.host)
            except Exception as e:  # one op failing does not hide the others
                print(f"\n== {label}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            total = sum(per.values())
            print(f"\n== {label}: {total:.3f} ms of kernels per call ==", flush=True)
            for k, ms in sorted(per.items(), key=lambda kv: -kv[1])[:args.top]:
                print(f"  {ms:8.3f} ms  {100 * ms / total:5.1f} %  {k[:110]}")
            result[label] = per
        del ins, fn
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
