# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""SSD (Mamba-2) benchmarks: the op, the Mamba2 layer and its decode step, against mamba_ssm and fla.

    python benchmarks/ssd.py [--sections op,layer,decode] [--anchors /tmp/anchors]
                             [--anchors-src /work/shared/anchors] [--quick] [--no-fla] [--fla-unguarded]
                             [--json out.json]
    python benchmarks/ssd.py --sweep [--sweep-groups states,cb,scan,dstates,dx,dcb,db,dc,finish] [--json out.json]

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

``--sweep`` instead times every variant of each kernel of the Triton path (``sweep_variants``: launch
options of ``seqblocks.ops.ssd.triton.launch_options``) at the two shapes, one launcher call per line
(``sweep <group> <shape> ms <time> <overrides>``; ``{}`` is the default; the ``states`` / ``dstates``
groups time a whole pass, fused or split), then the whole op, forward and forward + backward, with the
defaults and with each group's fastest variant at each shape. About 1.5 minutes on an H200, most of it
compiling.

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


def timed(fn, warmup=25, rep=100) -> float | None:
    """Median ms of ``fn``, or None (printed) when it raises: an anchor that cannot run this case."""
    try:
        return bench(fn, warmup, rep)
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
    anc = (f"best {best} {present[best]:8.3f} ms  ours/anchor {row['ratio']:5.2f}" if best else "anchors not installed")
    others = ", ".join(f"{k} {v:.3f} ms" for k, v in present.items() if k != best)
    anc += f" ({others})" if others else ""
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


def op_inputs(Bsz, T, H, dtype=torch.bfloat16, dev="cuda"):
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


# The sweep: each group is one launcher of seqblocks/ops/ssd/triton.py (the kernels it runs).
SWEEP_KERNELS = {
    "states": ("_state_fused_fwd", "_chunk_state_fwd", "_state_pass_fwd"),
    "cb": ("_chunk_cb",),
    "scan": ("_chunk_scan_fwd",),
    "dstates": ("_dstate_fused_bwd", "_chunk_dstate_bwd", "_state_pass_bwd"),
    "dx": ("_chunk_bwd_dx",),
    "dcb": ("_chunk_bwd_dcb",),
    "db": ("_chunk_bwd_db",),
    "dc": ("_chunk_bwd_dc",),
    "finish": ("_dacs_finish",),
}


def sweep_variants() -> list[tuple[str, dict]]:
    """(group, launch-option overrides) of every point ``--sweep`` times, bf16 at P 64, N 128, one
    group; ``{}`` is the default. Each compiles for sm_90 without spills (tests/test_ssd_compile.py)."""
    v = {
        "states": [{}, {"state_bp": 16}, {"state_bp": 16, "state_warps": 4}, {"state_bl": 32},
                   {"state_bl": 128}, {"state_stages": 2}, {"state_fused": False},
                   {"state_fused": False, "pass_block": 256, "pass_warps": 2}],
        "cb": [{}, {"cb_warps": 8}, {"cb_block": 128, "cb_warps": 8}, {"cb_block": 32}],
        "scan": [{}, {"scan_warps": 8}, {"scan_bl": 128, "scan_warps": 8},
                 {"scan_bl": 128, "scan_bs": 32, "scan_warps": 8}, {"scan_bp": 32}, {"scan_bs": 32},
                 {"scan_stages": 3}, {"cb_shared": False}],
        "dstates": [{}, {"dstate_bp": 16}, {"dstate_bp": 64}, {"dstate_bl": 128}, {"dstate_stages": 2},
                    {"dstate_fused": False}],
        "dx": [{}, {"dx_bl": 128}, {"dx_bs": 32}, {"dx_stages": 3}, {"dx_bl": 32}, {"cb_shared": False}],
        "dcb": [{}, {"dcb_stages": 3}, {"dcb_heads": 8}, {"dcb_heads": 4}, {"dcb_block": 32}],
        "db": [{}, {"dbc_heads": 4}, {"dbc_heads": 16}, {"dbc_heads": 64}, {"db_bl": 128}, {"db_bs": 32},
               {"db_bl": 32}],
        "dc": [{}, {"dbc_heads": 4}, {"dbc_heads": 16}, {"dbc_heads": 64}, {"dc_bs": 128}, {"dc_bl": 32},
               {"dc_bs": 32}],
        "finish": [{}, {"finish_warps": 8}],
    }
    return [(group, over) for group, points in v.items() for over in points]


def _sweep_shape(k, Bsz, T, H, dev="cuda"):
    """Inputs and the intermediates every launcher reads, made once with the default options."""
    x, dt, A, B, C, D, dt_bias = (t.detach() for t in op_inputs(Bsz, T, H, dev=dev))
    step = torch.nn.functional.softplus(dt.float() + dt_bias).contiguous()
    base = k.launch_options(x.dtype, P, N, H, 1, CHUNK)
    acs, hlp, states, _ = k._states_fwd(x, step, A * k.LOG2E, B, None, CHUNK, base)
    dy = torch.randn_like(x)
    gout, _, ddecay = k._states_bwd(dy, C, acs, states, None, CHUNK, base)
    cb = k._cb(B, C, CHUNK, base)
    _, dstep, w, _ = k._dx_bwd(x, step, B, C, cb, D, acs, gout, dy, k._slots(x, CHUNK, base), CHUNK, base)
    return dict(x=x, step=step, A=A, A2=A * k.LOG2E, B=B, C=C, D=D, acs=acs, hlp=hlp, states=states, dy=dy,
                gout=gout, ddecay=ddecay, w=w, dstep=dstep)


def _sweep_call(k, group, s, o):
    """A closure running the launcher of ``group`` with options ``o`` on the inputs ``s``."""
    x, step, B, C, D, acs, dy = s["x"], s["step"], s["B"], s["C"], s["D"], s["acs"], s["dy"]
    cb = k._cb(B, C, CHUNK, o) if o["cb_shared"] else None
    slots = k._slots(x, CHUNK, o)
    if group == "states":
        return lambda: k._states_fwd(x, step, s["A2"], B, None, CHUNK, o)
    if group == "cb":
        return lambda: k._cb(B, C, CHUNK, o)
    if group == "scan":
        return lambda: k._scan_fwd(x, step, B, C, cb, D, acs, s["hlp"], CHUNK, o, x.dtype)
    if group == "dstates":
        return lambda: k._states_bwd(dy, C, acs, s["states"], None, CHUNK, o)
    if group == "dx":
        return lambda: k._dx_bwd(x, step, B, C, cb, D, acs, s["gout"], dy, slots, CHUNK, o)
    if group == "dcb":
        return lambda: k._dcb_bwd(x, step, B, C, cb, acs, dy, slots, CHUNK, o)
    if group == "finish":
        slots.zero_()
        return lambda: k._finish_bwd(slots, s["w"], s["ddecay"], step, s["A"], s["dstep"], CHUNK, o)
    dcb = k._dcb_bwd(x, step, B, C, cb, acs, dy, slots, CHUNK, o)
    if group == "db":
        return lambda: k._db_bwd(x, step, C, acs, s["gout"], dcb, CHUNK, o)
    return lambda: k._dc_bwd(B, C, acs, s["states"], dy, dcb, slots, CHUNK, o)


def section_sweep(groups):
    """One line per (variant, shape); then the op with the defaults and with each group's best."""
    import time

    from seqblocks.ops.ssd import triton as k

    t0 = time.time()
    print("\n== SSD kernel sweep (bf16, P 64, N 128, chunk 256, one group) ==", flush=True)
    best: dict[tuple, tuple[float, dict]] = {}
    for Bsz, T, d_model in SHAPES:
        H = 2 * d_model // P
        tag = f"B{Bsz} T{T} H{H}"
        s = _sweep_shape(k, Bsz, T, H)
        for group, over in sweep_variants():
            if group not in groups:
                continue
            o = k.launch_options(torch.bfloat16, P, N, H, 1, CHUNK, over)
            ms = timed(_sweep_call(k, group, s, o), warmup=5, rep=30)
            ROWS.append({"section": "sweep", "group": group, "shape": tag, "overrides": over, "ms": ms})
            print(f"  sweep {group:8s} {tag:16s} ms {ms if ms is None else round(ms, 4)!s:>8s}  {over}"
                  f"  [{time.time() - t0:.0f} s]", flush=True)
            if ms is not None and ((tag, group) not in best or ms < best[(tag, group)][0]):
                best[(tag, group)] = (ms, over)
        del s
    print(f"  (sweep took {time.time() - t0:.0f} s)")
    for Bsz, T, d_model in SHAPES:
        H = 2 * d_model // P
        tag = f"B{Bsz} T{T} H{H}"
        picked: dict = {}
        for group in groups:
            if (tag, group) in best:
                picked.update(best[(tag, group)][1])
        x, dt, A, B, C, D, dt_bias = ins = op_inputs(Bsz, T, H)
        for label, opts in (("defaults", None), ("best of each group", picked)):
            def run():
                return k.ssd_triton(x, dt, A, B, C, D, dt_bias=dt_bias, return_final_state=True, chunk_size=CHUNK,
                                    options=opts)

            with torch.no_grad():
                f = bench(run)
            fb = bench(fwd_bwd(run, ins))
            ROWS.append({"section": "sweep_op", "shape": tag, "label": label, "options": opts, "fwd_ms": f,
                         "fwd_bwd_ms": fb})
            print(f"  op {tag:16s} {label:20s} fwd {f:7.3f} ms  fwd+bwd {fb:7.3f} ms  {opts or ''}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="time the variants of every Triton kernel instead")
    p.add_argument("--sweep-groups", default=",".join(SWEEP_KERNELS),
                   help=f"kernel groups of --sweep (any of {','.join(SWEEP_KERNELS)})")
    p.add_argument("--sections", default="op,layer,decode")
    p.add_argument("--anchors", default="/tmp/anchors", help="build_anchors.py's BUILD_DIR")
    p.add_argument("--anchors-src", default=os.environ.get("ANCHORS_SRC", "/work/shared/anchors"),
                   help="the folder holding build_anchors.py")
    p.add_argument("--json", default=None, help="write all rows to this file")
    p.add_argument("--quick", action="store_true", help="the first shape only")
    p.add_argument("--no-fla", action="store_true", help="leave fla's rows out (its autotuning takes minutes)")
    p.add_argument("--fla-unguarded", action="store_true",
                   help="clear fla's Hopper guard of its gated backward, for timing only (delta_rule.unguard_fla)")
    args = p.parse_args(argv)
    groups = [g for g in args.sweep_groups.split(",") if g]
    unknown = sorted(set(groups) - set(SWEEP_KERNELS))
    if unknown:
        p.error(f"--sweep-groups: unknown {unknown}; expected some of {list(SWEEP_KERNELS)}")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/ssd.py needs a CUDA device")
    torch.manual_seed(0)
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.sweep:
        section_sweep(groups)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": ROWS, "device": torch.cuda.get_device_name()}, f, indent=1)
        return
    bw, mm = copy_bandwidth(), matmul_rate()
    print(f"measured copy bandwidth {bw / 1e12:.2f} TB/s; bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    anchors = load_anchors(args.anchors, args.anchors_src)
    if args.quick:
        SHAPES[1:] = []
    if args.no_fla:
        anchors["fla chunk_simple_gla"] = None
    if args.fla_unguarded:
        from delta_rule import unguard_fla  # the sibling script (benchmarks/ is on sys.path)

        unguard_fla()
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
