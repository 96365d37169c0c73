# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Linear-attention benchmarks: GLA, simple GLA and the delta rules against fla 0.6.0, one run, one table.

    python benchmarks/linear_attention.py [--quick] [--cases gla,simple_gla,delta_rule,gated_delta_rule]
                                          [--fla-unguarded] [--json out.json]

Each case (``CASES``) names our op, its fla anchors and how to build the inputs. For every case and
shape, (B, T, H, K=V) = (8, 4096, 16, 128) and (2, 16384, 16, 128), bf16:

- forward and forward+backward (random cotangents on o and the final state): our time (Triton), the
  best anchor's time in the same run (fla's chunk kernel), their ratio, and our % of the roofline,
  ``max(FLOPs / matmul rate, bytes / bandwidth)`` with the matmul rate (bf16 8192^3 ``torch.matmul``)
  and the bandwidth (a 1 GiB device copy) measured here. FLOPs are the chunked form's: per head,
  ``2 T C (K + V)`` inside chunks (C = 64) and ``4 T K V`` for the state; the backward counts twice
  the forward. Bytes: each input read once, each output written once (fp32 state).
- the decode step (one token, B = 8 and 2 rows of the shape's H, K, V, fp32 state updated in place)
  against fla's ``fused_recurrent_*`` with T = 1 (which returns a new state); roofline = state bytes.

Goals (issue #16): forward+backward <= 0.8x fla's chunk kernel, decode <= fla's fused_recurrent; the
printed ratio (ours / best anchor) says where each op stands. An anchor or one of our ops that does
not import is reported as "not installed" and its rows are skipped; the delta-rule rows need
``seqblocks.ops.delta_rule``.

Needs a CUDA device. Imports torch, triton and seqblocks; fla optional.

Shapes: B batch, T time, H heads, K key width, V value width, C chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from triton.testing import do_bench

SHAPES = [(8, 4096, 16, 128), (2, 16384, 16, 128)]
ROWS: list[dict] = []


def bench(fn, warmup=10, rep=50) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (bench(lambda: y.copy_(x)) * 1e-3)


def matmul_rate() -> float:
    """bf16 matmul FLOP/s (8192^3, fp32 accumulate)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / (bench(lambda: a @ b) * 1e-3)


def optional(module: str, *names: str):
    """The named functions of ``module``, or None when it does not import ("not installed")."""
    try:
        mod = importlib.import_module(module)
        return tuple(getattr(mod, n) for n in names)
    except Exception as e:  # an anchor that fails to import is reported, never a crash
        print(f"  {module}: not installed ({type(e).__name__}: {e})", flush=True)
        return None


@dataclasses.dataclass
class Case:
    """One op: how to build its inputs, call ours, call the anchors, and count its work."""

    name: str
    inputs: Callable  # (B, T, H, K, V) -> dict of tensors (q, k, v, and g / beta)
    ours: Callable | None  # (inputs, initial_state) -> (o, final)
    anchors: dict  # anchor name -> callable like ours
    step_ours: Callable | None = None  # (state, token inputs) -> o, state in place
    step_anchor: Callable | None = None  # (state, token inputs) -> (o, new state)
    per_key_decay: bool = False


def _qkv(B, T, H, K, V):
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    return {"q": r(B, T, H, K) * K**-0.5, "k": r(B, T, H, K) * K**-0.5, "v": r(B, T, H, V)}


def gla_inputs(B, T, H, K, V):
    d = _qkv(B, T, H, K, V)
    d["g"] = (F.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 16).to(torch.bfloat16)
    return d


def simple_gla_inputs(B, T, H, K, V):
    d = _qkv(B, T, H, K, V)
    d["g"] = (F.logsigmoid(torch.randn(B, T, H, device="cuda")) / 16).float()
    return d


def delta_inputs(B, T, H, K, V):
    d = _qkv(B, T, H, K, V)
    d["k"] = F.normalize(d["k"].float(), dim=-1).to(torch.bfloat16)
    d["beta"] = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)
    return d


def gated_delta_inputs(B, T, H, K, V):
    d = delta_inputs(B, T, H, K, V)
    d["g"] = (F.logsigmoid(torch.randn(B, T, H, device="cuda")) / 16).float()
    return d


def _cases() -> list[Case]:
    ours_gla = optional("seqblocks.ops.gla", "gla", "simple_gla", "gla_step", "simple_gla_step")
    ours_delta = optional("seqblocks.ops.delta_rule", "delta_rule", "gated_delta_rule")
    fla_gla = optional("fla.ops.gla", "chunk_gla", "fused_recurrent_gla")
    fla_sgla = optional("fla.ops.simple_gla", "chunk_simple_gla", "fused_recurrent_simple_gla")
    fla_delta = optional("fla.ops.delta_rule", "chunk_delta_rule")
    fla_gdelta = optional("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")
    cases = []

    def keep(d, *names):
        return [d[n] for n in names]

    if ours_gla or fla_gla:
        cases.append(Case(
            "gla", gla_inputs,
            ours=None if not ours_gla else lambda d, h0: ours_gla[0](*keep(d, "q", "k", "v", "g"), initial_state=h0,
                                                                   output_final_state=True, backend="triton"),
            anchors={} if not fla_gla else {"fla chunk_gla": lambda d, h0: fla_gla[0](
                *keep(d, "q", "k", "v", "g"), initial_state=h0, output_final_state=True)},
            step_ours=None if not ours_gla else lambda s, d: ours_gla[2](s, *keep(d, "q", "k", "v", "g"),
                                                                       backend="triton"),
            step_anchor=None if not fla_gla else lambda s, d: fla_gla[1](
                *(t[:, None] for t in keep(d, "q", "k", "v", "g")), initial_state=s, output_final_state=True),
            per_key_decay=True))
    if ours_gla or fla_sgla:
        cases.append(Case(
            "simple_gla", simple_gla_inputs,
            ours=None if not ours_gla else lambda d, h0: ours_gla[1](*keep(d, "q", "k", "v", "g"), initial_state=h0,
                                                                   output_final_state=True, backend="triton"),
            anchors={} if not fla_sgla else {"fla chunk_simple_gla": lambda d, h0: fla_sgla[0](
                *keep(d, "q", "k", "v", "g"), initial_state=h0, output_final_state=True)},
            step_ours=None if not ours_gla else lambda s, d: ours_gla[3](s, *keep(d, "q", "k", "v", "g"),
                                                                       backend="triton"),
            step_anchor=None if not fla_sgla else lambda s, d: fla_sgla[1](
                *(t[:, None] for t in keep(d, "q", "k", "v", "g")), initial_state=s, output_final_state=True)))
    if ours_delta or fla_delta:
        cases.append(Case(
            "delta_rule", delta_inputs,
            ours=None if not ours_delta else lambda d, h0: ours_delta[0](
                *keep(d, "q", "k", "v", "beta"), initial_state=h0, output_final_state=True),
            anchors={} if not fla_delta else {"fla chunk_delta_rule": lambda d, h0: fla_delta[0](
                *keep(d, "q", "k", "v", "beta"), initial_state=h0, output_final_state=True)}))
    if ours_delta or fla_gdelta:
        cases.append(Case(
            "gated_delta_rule", gated_delta_inputs,
            ours=None if not ours_delta else lambda d, h0: ours_delta[1](
                *keep(d, "q", "k", "v", "g", "beta"), initial_state=h0, output_final_state=True),
            anchors={} if not fla_gdelta else {"fla chunk_gated_delta_rule": lambda d, h0: fla_gdelta[0](
                *keep(d, "q", "k", "v", "g", "beta"), initial_state=h0, output_final_state=True)}))
    return cases


def work(case: Case, B, T, H, K, V, C=64) -> tuple[float, float, float, float]:
    """(forward FLOPs, forward+backward FLOPs, forward bytes, forward+backward bytes)."""
    flops = B * H * (2 * T * C * (K + V) + 4 * T * K * V)
    esz, state = 2, B * H * K * V * 4
    g_width = K if case.per_key_decay else 1
    per_token = B * T * H * esz
    fwd_bytes = per_token * (2 * K + V + g_width + V) + 2 * state  # q, k, v, g in; o out; h0 in, hT out
    bwd_bytes = per_token * (2 * K + V + g_width + V) + per_token * (2 * K + V + g_width) + 2 * state
    return flops, 3 * flops, fwd_bytes, fwd_bytes + bwd_bytes


def add_row(case, mode, shape, ours_ms, best_name, best_ms, roof_ms):
    row = {"case": case, "mode": mode, "shape": shape, "ours_ms": ours_ms, "anchor": best_name,
           "anchor_ms": best_ms, "ratio": (ours_ms / best_ms) if (ours_ms and best_ms) else None,
           "roofline_ms": roof_ms, "pct_roofline": (100 * roof_ms / ours_ms) if ours_ms else None}
    ROWS.append(row)
    fmt = lambda x, w=9: f"{x:{w}.3f}" if x is not None else " " * (w - 1) + "-"  # noqa: E731
    ratio = f"{row['ratio']:6.2f}x" if row["ratio"] else "     - "
    pct = f"{row['pct_roofline']:5.1f}%" if row["pct_roofline"] else "    - "
    print(f"  {case:17s} {mode:8s} {str(shape):22s} ours {fmt(ours_ms)} ms  {best_name or '-':28s} "
          f"{fmt(best_ms)} ms  {ratio}  roofline {fmt(roof_ms, 8)} ms {pct}", flush=True)


def fwd_bwd(fn, d, h0):
    """A closure running forward + backward with fixed random cotangents on o and the final state."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in d.items()}
    h = h0.detach().clone().requires_grad_()
    o, s = fn(leaves, h)
    cot = [torch.randn_like(o), torch.randn_like(s)]

    def run():
        for t in (*leaves.values(), h):
            t.grad = None
        o, s = fn(leaves, h)
        torch.autograd.backward([o, s], cot)
    return run


def time_or_none(make) -> float | None:
    try:
        return bench(make())
    except Exception as e:  # one failing kernel never ends the run
        print(f"    failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def run_case(case: Case, shapes, bw, rate):
    print(f"\n== {case.name} ==", flush=True)
    for B, T, H, K in shapes:
        V = K
        shape = (B, T, H, K)
        torch.manual_seed(0)
        d = case.inputs(B, T, H, K, V)
        h0 = torch.zeros(B, H, K, V, device="cuda")
        f_fl, fb_fl, f_by, fb_by = work(case, B, T, H, K, V)
        roof_f = max(f_fl / rate, f_by / bw) * 1e3
        roof_fb = max(fb_fl / rate, fb_by / bw) * 1e3
        for mode, roof in (("fwd", roof_f), ("fwd+bwd", roof_fb)):
            def make(fn):
                if mode == "fwd":
                    def run():
                        with torch.no_grad():
                            fn(d, h0)
                    return lambda: run
                return lambda: fwd_bwd(fn, d, h0)
            ours = time_or_none(make(case.ours)) if case.ours else None
            best_name, best = None, None
            for name, fn in case.anchors.items():
                ms = time_or_none(make(fn))
                if ms is not None and (best is None or ms < best):
                    best_name, best = name, ms
            add_row(case.name, mode, shape, ours, best_name, best, roof)
        if case.step_ours or case.step_anchor:
            for Bs in (8, 2):
                tok = {n: t[:Bs, 0].contiguous() for n, t in d.items()}
                state = torch.zeros(Bs, H, K, V, device="cuda")
                roof = 2 * state.numel() * 4 / bw * 1e3
                ours = time_or_none(lambda: (lambda: case.step_ours(state, tok))) if case.step_ours else None
                anchor = time_or_none(lambda: (lambda: case.step_anchor(state, tok))) if case.step_anchor else None
                add_row(case.name, "decode", (Bs, 1, H, K), ours,
                        "fla fused_recurrent" if anchor else None, anchor, roof)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the first shape only")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--fla-unguarded", action="store_true",
                   help="clear fla's Hopper guard of its gated backward, for timing only (delta_rule.unguard_fla)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    bw, rate = copy_bandwidth(), matmul_rate()
    print(f"device {torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s",
          flush=True)
    if args.fla_unguarded:
        from delta_rule import unguard_fla  # the sibling script (benchmarks/ is on sys.path)

        unguard_fla()
    wanted = {c for c in args.cases.split(",") if c}
    shapes = SHAPES[:1] if args.quick else SHAPES
    for case in _cases():
        if not wanted or case.name in wanted:
            run_case(case, shapes, bw, rate)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth": bw, "matmul_rate": rate, "rows": ROWS},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
