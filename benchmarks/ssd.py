# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""SSD (Mamba-2) benchmarks: the op, the Mamba2 layer and its decode step, against mamba_ssm and fla.

    python benchmarks/ssd.py [--sections op,layer,decode] [--anchors /tmp/anchors]
                             [--anchors-src /work/shared/anchors] [--json out.json]

Sections (bf16, Mamba-2's defaults: headdim P = 64, d_state N = 128, one group, expand 2), at
(B, T, d_model) = (8, 2048, 768) and (4, 8192, 2048), i.e. H = 24 and 64 heads:

- ``op``: ``ssd`` (ours, Triton, chunk 256) against mamba_ssm's ``mamba_chunk_scan_combined`` (its
  Triton SSD, chunk 256) on the same inputs (D per head, dt bias + softplus, final state), and fla's
  ``chunk_simple_gla``, which computes the same recurrence when given q = C, k = B, v = dt * x and the
  log decay g = dt * A with scale 1 (N = K, P = V, B / C per head: fla has no groups, so they are
  expanded to H heads, and dt is preprocessed outside the timed region). Forward and forward+backward.
- ``layer``: our ``Mamba2`` against mamba_ssm's ``Mamba2`` (its fused conv + scan path; needs the
  built causal_conv1d), same sizes and dtype, forward and forward+backward.
- ``decode``: one decode step of the layer (our ``Mamba2`` with a cache, T = 1) against mamba_ssm's
  ``Mamba2.step`` at batch 1 and 64.

Each row: our time, the best anchor's time in the same run, ours / anchor, and % of the roofline
max(FLOPs / measured bf16 matmul rate, bytes / measured copy bandwidth). FLOPs are those of the chunked
form with chunk L: per step and head ``2 L (N + P) / 2`` for the causal half of the intra-chunk
products plus ``4 P N`` for the chunk states and their read-out (fwd+bwd: 3x). Bytes: every input read
once and every output written once (fwd+bwd adds the cotangents and the input gradients).

Anchors that fail to import are reported as "not installed". Needs a CUDA device.

Shapes: B batch, T time, H heads, P head width, N state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

from seqblocks.layers.mixers import Mamba2
from seqblocks.ops.ssd import ssd

ROWS: list[dict] = []
SHAPES = [(8, 2048, 768), (4, 8192, 2048)]
P, N, CHUNK = 64, 128, 256


def bench(fn, warmup=25, rep=100) -> float:
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
    return 2 * 8192 ** 3 / (bench(lambda: a @ b) * 1e-3)


def fwd_bwd(fn, inputs):
    """A closure running forward + backward with fixed random cotangents on every output."""
    def run():
        for x in inputs:
            x.grad = None
        outs = fn()
        outs = outs if isinstance(outs, tuple | list) else (outs,)
        outs = [o for o in outs if o is not None and o.requires_grad]
        if not hasattr(run, "cot"):
            run.cot = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, run.cot)
    return run


def timed(fn) -> float | None:
    """Median ms of ``fn``, or None (printed) when it raises: an anchor that cannot run this case."""
    try:
        return bench(fn)
    except Exception as e:  # noqa: BLE001 - an anchor's failure is reported, not fatal
        print(f"    ({type(e).__name__}: {str(e)[:200]})", flush=True)
        return None


def add_row(section, name, ours, anchors: dict[str, float | None], floor_ms=None):
    present = {k: v for k, v in anchors.items() if v is not None}
    best = min(present, key=present.get) if present else None
    row = {"section": section, "name": name, "ms": ours, "anchors": anchors, "best_anchor": best,
           "best_anchor_ms": present.get(best), "ratio": ours / present[best] if best else None,
           "floor_ms": floor_ms, "pct_roofline": 100 * floor_ms / ours if floor_ms and ours else None}
    ROWS.append(row)
    anc = f"{best} {present[best]:8.3f} ms  ours/anchor {row['ratio']:5.2f}" if best else "anchors not installed"
    pct = f"{row['pct_roofline']:5.1f}% of roofline" if row["pct_roofline"] is not None else ""
    print(f"  {name:44s} ours {ours:8.3f} ms | {anc} | {pct}", flush=True)


def load_anchors(build_dir: str, src_dir: str) -> dict:
    """mamba_ssm's SSD / Mamba2 (through build_anchors.activate) and fla's chunk_simple_gla, or None each."""
    found: dict = {}
    try:
        sys.path.insert(0, src_dir)
        import build_anchors

        build_anchors.activate(build_dir)
    except Exception as e:  # noqa: BLE001
        print(f"  (build_anchors not usable from {src_dir}: {e!r}; trying an installed mamba_ssm)")
    for key, stmt in (("mamba_chunk_scan_combined",
                       "from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as f"),
                      ("mamba_ssm.Mamba2", "from mamba_ssm.modules.mamba2 import Mamba2 as f"),
                      ("fla chunk_simple_gla", "from fla.ops.simple_gla import chunk_simple_gla as f")):
        scope: dict = {}
        try:
            exec(stmt, scope)
            found[key] = scope["f"]
        except Exception as e:  # noqa: BLE001
            print(f"  {key}: not installed ({type(e).__name__}: {str(e)[:120]})")
            found[key] = None
    return found


def op_inputs(Bsz, T, H, dtype=torch.bfloat16):
    dev = "cuda"
    x = torch.randn(Bsz, T, H, P, device=dev, dtype=dtype)
    dt = (torch.randn(Bsz, T, H, device=dev) * 0.5 - 2).to(dtype)
    A = -torch.empty(H, device=dev).uniform_(1, 16)
    B = torch.randn(Bsz, T, 1, N, device=dev, dtype=dtype)
    C = torch.randn(Bsz, T, 1, N, device=dev, dtype=dtype)
    D = torch.ones(H, device=dev)
    dt_bias = torch.randn(H, device=dev) * 0.5
    return [t.requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]


def floors(Bsz, T, H, bw, mm):
    flops = Bsz * H * T * (CHUNK * (N + P) + 4 * P * N)
    io = Bsz * T * (2 * H * P + H + 2 * N) * 2                       # x, dt, B, C read; y written (bf16)
    f = max(flops / mm, io / bw) * 1e3
    fb = max(3 * flops / mm, 3 * io / bw) * 1e3
    return f, fb


def section_op(anchors, bw, mm):
    print("\n== SSD op (bf16) ==", flush=True)
    mcs, gla = anchors["mamba_chunk_scan_combined"], anchors["fla chunk_simple_gla"]
    for Bsz, T, d_model in SHAPES:
        H = 2 * d_model // P
        x, dt, A, B, C, D, dt_bias = ins = op_inputs(Bsz, T, H)
        tag = f"(B{Bsz}, T{T}, H{H}, P{P}, N{N})"
        fl_f, fl_fb = floors(Bsz, T, H, bw, mm)

        def ours():
            return ssd(x, dt, A, B, C, D, dt_bias=dt_bias, return_final_state=True, chunk_size=CHUNK)

        def mamba():
            return mcs(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True, return_final_states=True)

        # fla's inputs: its own layout of the same function (module docstring), prepared outside the timing.
        with torch.no_grad():
            step = torch.nn.functional.softplus(dt.float() + dt_bias)
            v_ = (x.float() * step.unsqueeze(-1)).to(x.dtype)
            g_ = (step * A).contiguous()
            q_, k_ = (t.expand(-1, -1, H, -1).contiguous() for t in (C, B))
        q_, k_, v_, g_ = (t.detach().requires_grad_() for t in (q_, k_, v_, g_))

        def fla():
            return gla(q_, k_, v_, g=g_, scale=1.0, output_final_state=True)

        with torch.no_grad():
            t_ours = bench(ours)
            anc = {"mamba_chunk_scan_combined": timed(mamba) if mcs else None,
                   "fla chunk_simple_gla": timed(fla) if gla else None}
        add_row("op", f"ssd fwd {tag}", t_ours, anc, fl_f)
        t_ours = bench(fwd_bwd(ours, ins))
        anc = {"mamba_chunk_scan_combined": timed(fwd_bwd(mamba, ins)) if mcs else None,
               "fla chunk_simple_gla": timed(fwd_bwd(fla, [q_, k_, v_, g_])) if gla else None}
        add_row("op", f"ssd fwd+bwd {tag}", t_ours, anc, fl_fb)


def section_layer(anchors, bw, mm):
    print("\n== Mamba2 layer (bf16) ==", flush=True)
    Theirs = anchors["mamba_ssm.Mamba2"]
    for Bsz, T, d_model in SHAPES:
        H = 2 * d_model // P
        kw = dict(d_state=N, headdim=P, chunk_size=CHUNK, device="cuda", dtype=torch.bfloat16)
        ours = Mamba2(d_model, **kw)
        theirs = None
        if Theirs is not None:
            try:
                theirs = Theirs(d_model, **kw)
            except Exception as e:  # noqa: BLE001
                print(f"    (mamba_ssm Mamba2 did not build: {e!r})")
        x = torch.randn(Bsz, T, d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        tag = f"(B{Bsz}, T{T}, d_model {d_model})"
        fl_f, fl_fb = floors(Bsz, T, H, bw, mm)
        with torch.no_grad():
            add_row("layer", f"Mamba2 fwd {tag}", bench(lambda: ours(x)),
                    {"mamba_ssm.Mamba2": timed(lambda: theirs(x)) if theirs else None}, fl_f)
        add_row("layer", f"Mamba2 fwd+bwd {tag}", bench(fwd_bwd(lambda: ours(x), [x])),
                {"mamba_ssm.Mamba2": timed(fwd_bwd(lambda: theirs(x), [x])) if theirs else None}, fl_fb)


def section_decode(anchors):
    print("\n== Mamba2 decode step, one layer (bf16) ==", flush=True)
    Theirs = anchors["mamba_ssm.Mamba2"]
    for _, _, d_model in SHAPES:
        kw = dict(d_state=N, headdim=P, device="cuda", dtype=torch.bfloat16)
        ours = Mamba2(d_model, **kw).eval()
        theirs = Theirs(d_model, **kw).eval() if Theirs else None
        for batch in (1, 64):
            x = torch.randn(batch, 1, d_model, device="cuda", dtype=torch.bfloat16)
            cache = ours.allocate_inference_cache(batch, 1 << 30)  # its size does not depend on it
            with torch.no_grad():
                t_ours = bench(lambda: ours(x, cache))
                t_theirs = None
                if theirs is not None:
                    conv_state, ssm_state = theirs.allocate_inference_cache(batch, 1 << 30)
                    t_theirs = timed(lambda: theirs.step(x, conv_state, ssm_state))
            add_row("decode", f"step d_model {d_model} batch {batch}", t_ours, {"mamba_ssm.Mamba2.step": t_theirs})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="op,layer,decode")
    p.add_argument("--anchors", default="/tmp/anchors", help="build_anchors.py's BUILD_DIR")
    p.add_argument("--anchors-src", default=os.environ.get("ANCHORS_SRC", "/work/shared/anchors"),
                   help="the folder holding build_anchors.py")
    p.add_argument("--json", default=None, help="write all rows to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/ssd.py needs a CUDA device")
    torch.manual_seed(0)
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    bw, mm = copy_bandwidth(), matmul_rate()
    print(f"measured copy bandwidth {bw / 1e12:.2f} TB/s; bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    anchors = load_anchors(args.anchors, args.anchors_src)
    secs = args.sections.split(",")
    if "op" in secs:
        section_op(anchors, bw, mm)
    if "layer" in secs:
        section_layer(anchors, bw, mm)
    if "decode" in secs:
        section_decode(anchors)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bw, "matmul_rate": mm, "rows": ROWS, "device": torch.cuda.get_device_name()},
                      f, indent=1)


if __name__ == "__main__":
    main()
