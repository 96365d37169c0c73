# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Delta-rule benchmarks: ours against fla's kernels, with a roofline measured in the same run.

    python benchmarks/delta_rule.py [--quick] [--sections chunk,stages,decode] [--no-anchor] [--json out.json]

Rows (bf16 inputs, fp32 state, L2-normalised q / k, initial state and final state on):
- chunked forward and forward + backward of ``gated_delta_rule`` and ``delta_rule`` at
  (B, T, H, K, V) = (8, 4096, 16, 128, 128) (a Qwen3-Next-like GDN head) and (4, 4096, 6, 256, 512)
  (fla's GatedDeltaNet defaults), ours (Triton) against fla's ``chunk_gated_delta_rule`` /
  ``chunk_delta_rule`` (the anchor) and our PyTorch path;
- our forward's three stages timed alone (gated, same inputs): the chunk-parallel UT transform
  (W, U'), the sequential state pass (h_c, v_new, final state) and the chunk-parallel outputs, each
  with its own floor (bytes it reads and writes / copy bandwidth), to show which stage to work on;
- one decode step at B = 64 (state in place) against fla's ``fused_recurrent_gated_delta_rule``.

Each row gives the median time (``triton.testing.do_bench``), the best anchor's time from the same
run and the ratio, and our share of the floor ``max(bytes / copy bandwidth, FLOPs / bf16 matmul
rate)``, both rates measured here: the bytes read each input once and write each output once; the
FLOPs count the chunked form's matrix products (forward ``6CK + 4CV + 6KV`` per token and head for
chunk C = 64; forward + backward taken as 3x forward). Anchors that fail to import are reported as
"not installed".

Needs a CUDA device. Imports only torch, triton and seqblocks (fla optional).

Shapes: B batch, T time, H heads, K key width, V value width.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.testing import do_bench

from seqblocks.ops.delta_rule import delta_rule, gated_delta_rule, gated_delta_rule_step

ROWS: list[dict] = []
C = 64


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (bench(lambda: y.copy_(x)) * 1e-3)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / (bench(lambda: a @ a) * 1e-3)


def unguard_fla() -> None:
    """fla 0.6.0 refuses its gated (and simple-GLA) backward on Hopper with Triton in [3.4, 3.7.1) (its
    results are wrong there, its issue #640). For timing only, its module-level hardware flag is cleared
    so the same kernels run: the times are its kernels' times; its gradients on this stack are not used.
    Without fla it says so and returns (its rows say "not installed" anyway)."""
    try:
        import fla.ops.common.chunk_o as chunk_o
    except Exception as e:  # noqa: BLE001 - fla absent or broken
        print(f"  fla guard not cleared ({type(e).__name__}: {e})", flush=True)
        return

    if getattr(chunk_o, "IS_NVIDIA_HOPPER", False):
        chunk_o.IS_NVIDIA_HOPPER = False
        print("  fla: Hopper guard of its gated backward cleared for timing (--fla-unguarded)")


def fla_ops(unguard: bool = False) -> dict:
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as e:  # any import failure: the anchor is absent
        print(f"  fla: not installed ({type(e).__name__}: {e})")
        return {}
    if unguard:
        unguard_fla()
    return {"chunk_delta": chunk_delta_rule, "chunk_gated": chunk_gated_delta_rule,
            "recurrent_gated": fused_recurrent_gated_delta_rule}


def row(section: str, name: str, ms: float | None, anchor: tuple[str, float] | None, floor_ms: float) -> None:
    ratio = f"{ms / anchor[1]:.2f}x {anchor[0]}" if (ms is not None and anchor) else "no anchor"
    pct = f"{100 * floor_ms / ms:5.1f}% of floor" if ms else ""
    shown = "n/a" if ms is None else f"{ms:9.3f} ms"
    print(f"  {name:44s} {shown}  vs {ratio:28s} floor {floor_ms:.3f} ms {pct}", flush=True)
    ROWS.append({"section": section, "name": name, "ms": ms, "anchor": anchor[0] if anchor else None,
                 "anchor_ms": anchor[1] if anchor else None, "floor_ms": floor_ms})


def inputs(B, T, H, K, V, grad):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    t = {"q": r(B, T, H, K), "k": r(B, T, H, K), "v": r(B, T, H, V),
         "g": (-torch.rand(B, T, H, device="cuda", generator=g) * 0.1).bfloat16(),
         "beta": torch.rand(B, T, H, device="cuda", generator=g).bfloat16(),
         "h0": torch.randn(B, H, K, V, device="cuda", generator=g) * 0.01}
    return {n: x.requires_grad_(grad) for n, x in t.items()}


def timed(fn, t, backward):
    def run():
        o, final = fn(t)
        if backward:
            torch.autograd.backward((o, final), (torch.ones_like(o), torch.ones_like(final)))
    try:
        return bench(run)
    except Exception as e:  # an anchor that rejects the shape or dtype: reported, not fatal
        print(f"    ({type(e).__name__}: {str(e)[:120]})")
        return None


def section_chunk(bw, rate, fla, shapes, variants=(True, False)):
    print("\n== chunked delta rule (bf16, l2norm, h0) ==", flush=True)
    for B, T, H, K, V in shapes:
        tokens = B * T * H
        bytes_ = tokens * (2 * K + 2 * V + 4) * 2 + 2 * B * H * K * V * 4
        flops = tokens * (6 * C * K + 4 * C * V + 6 * K * V)  # the chunked form's products, 2 FLOPs per multiply-add
        for gated in variants:
            for backward in (False, True):
                t = inputs(B, T, H, K, V, backward)
                floor = max(bytes_ * (3 if backward else 1) / bw, flops * (3 if backward else 1) / rate) * 1e3
                label = f"{'gated' if gated else 'delta'} {'fwd+bwd' if backward else 'fwd'} {(B, T, H, K, V)}"

                def ours(t, backend):
                    kw = {"initial_state": t["h0"], "output_final_state": True, "use_qk_l2norm": True,
                          "backend": backend}
                    if gated:
                        return gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], **kw)
                    return delta_rule(t["q"], t["k"], t["v"], t["beta"], **kw)

                anchor = None
                if fla:
                    def theirs(t):
                        kw = {"initial_state": t["h0"], "output_final_state": True, "use_qk_l2norm_in_kernel": True}
                        if gated:
                            return fla["chunk_gated"](t["q"], t["k"], t["v"], g=t["g"].float(), beta=t["beta"], **kw)
                        return fla["chunk_delta"](t["q"], t["k"], t["v"], beta=t["beta"], **kw)
                    ms = timed(theirs, t, backward)
                    anchor = None if ms is None else ("fla chunk", ms)
                    row("chunk", f"fla  {label}", ms, None, floor)
                row("chunk", f"ours {label}", timed(lambda t: ours(t, "triton"), t, backward), anchor, floor)
                if T <= 4096 and not backward:
                    row("chunk", f"torch {label}", timed(lambda t: ours(t, "torch"), t, backward), anchor, floor)


def section_stages(bw, shapes):
    """Our forward's stages alone, gated, bf16, L2 norm and initial state (``ops/delta_rule/triton.py``)."""
    from seqblocks.ops.delta_rule import triton as dr

    print("\n== our forward by stage (gated, bf16, l2norm, h0) ==", flush=True)
    for B, T, H, K, V in shapes:
        t = inputs(B, T, H, K, V, False)
        q, k, v, g, beta = (t[n].contiguous() for n in ("q", "k", "v", "g", "beta"))
        o = dr._forward_options(q, C, K, V, B, H)
        offsets, table = dr._chunk_offsets(B, T, o["C"], None, q.device)
        odt = dr._operand_dtype(q)

        def wy():
            return dr._wy_stage(k, v, g, beta, None, table, True, o["C"], o["BK"], o["BV"], o["MODE"], odt, False)

        G, rk, _, W, U = wy()

        def state():
            return dr._state_stage(k, W, U, G, rk, t["h0"], None, offsets, table.shape[0], B, o["C"], o["BKS"],
                                   o["NK"], o["BVS"], o["STAGES"], o["MODE"], odt, True, True)

        h, vnew, _ = state()

        def out():
            return dr._out_stage(q, k, G, rk, h, vnew, None, table, K ** -0.5, True, o["C"], o["BK"], o["BV"],
                                 o["MODE"])

        tokens, chunks = B * T * H, table.shape[0] * H
        half, nv = odt.itemsize, triton.cdiv(V, o["BV"])
        moved = {  # bytes each stage reads and writes at the least (q / k once per V block in stage 3)
            "stage 1 (UT transform, W, U')": tokens * (K * 2 + V * 2 + 2 * 2 + 2 * 4 + (K + V) * half),
            "stage 2 (state pass)": tokens * ((K + 2 * V) * half + K * 2 + 2 * 4) + chunks * K * V * half
            + 2 * B * H * K * V * 4,
            "stage 3 (outputs)": tokens * (nv * (2 * K * 2 + 2 * 4) + V * half + V * 2) + chunks * K * V * half,
        }
        label = f"{(B, T, H, K, V)}"
        for (name, nbytes), fn in zip(moved.items(), (wy, state, out)):
            row("stages", f"ours {name} {label}", timed(lambda _, fn=fn: (fn(), None), None, False), None,
                nbytes / bw * 1e3)


def section_decode(bw, fla):
    print("\n== decode step (B=64, bf16 inputs, fp32 state in place) ==", flush=True)
    for H, K, V in ((16, 128, 128), (6, 256, 512)):
        B = 64
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, n, device="cuda", generator=g).bfloat16() for n in (K, K, V))
        gate = (-torch.rand(B, H, device="cuda", generator=g) * 0.1).bfloat16()
        beta = torch.rand(B, H, device="cuda", generator=g).bfloat16()
        state = torch.randn(B, H, K, V, device="cuda", generator=g) * 0.01
        floor = 2 * B * H * K * V * 4 / bw * 1e3
        anchor = None
        if fla:
            ms = timed(lambda _: fla["recurrent_gated"](q[:, None], k[:, None], v[:, None], g=gate[:, None].float(),
                                                          beta=beta[:, None], initial_state=state,
                                                          output_final_state=True, use_qk_l2norm_in_kernel=True),
                       None, False)
            anchor = None if ms is None else ("fla fused_recurrent", ms)
            row("decode", f"fla  step {(B, H, K, V)}", ms, None, floor)

        def ours(_):
            o = gated_delta_rule_step(state, q, k, v, gate, beta, use_qk_l2norm=True, backend="triton")
            return o, state
        row("decode", f"ours step {(B, H, K, V)}", timed(ours, None, False), anchor, floor)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the first shape")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--sections", default="chunk,stages,decode",
                   help="comma-separated, run in this order: chunk, stages, decode")
    p.add_argument("--no-anchor", action="store_true", help="skip fla (its autotuning takes minutes)")
    p.add_argument("--gated-only", action="store_true", help="chunk section: the gated rule only")
    p.add_argument("--fla-unguarded", action="store_true",
                   help="time fla's gated backward on Hopper + Triton < 3.7.1, which fla refuses (timing only)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    bw, rate = copy_bandwidth(), matmul_rate()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    fla = {} if args.no_anchor else fla_ops(args.fla_unguarded)
    shapes = [(8, 4096, 16, 128, 128), (4, 4096, 6, 256, 512)]
    shapes = shapes[:1] if args.quick else shapes
    variants = (True,) if args.gated_only else (True, False)
    sections = {"chunk": lambda: section_chunk(bw, rate, fla, shapes, variants),
                "stages": lambda: section_stages(bw, shapes), "decode": lambda: section_decode(bw, fla)}
    for name in args.sections.split(","):
        if name not in sections:
            p.error(f"unknown section {name!r}; expected one of {sorted(sections)}")
        sections[name]()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "bf16_flops_per_s": rate,
                       "rows": ROWS}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
