"""Mamba-3 benchmark: our op and layer against mamba_ssm 2.3.2's Mamba-3 Triton kernels and ``Mamba3`` module.

    python benchmarks/mamba3.py [--anchors BUILD_DIR] [--batch 8] [--seqlen 2048] [--d-model 768] [--chunk-size 64]
                                [--rows 32] [--block-p 32] [--block-n 32] [--fwd-warps 8] [--bwd-warps 8]
                                [--stages 1] [--step-block-p 16] [--step-warps 4] [--json out.json]

The kernel knobs (``Mamba3Tuning`` fields) take comma lists, e.g. ``--rows 16,32,64 --block-n 16,32``: the
op rows are measured for every combination (a combination the compiler refuses is reported, not fatal)
and the fastest forward+backward is printed last; the layer rows use the default tuning.

Rows (bf16 activations, fp32 state, SISO, mamba_ssm's defaults: d_state 128, headdim 64, one group,
rope_fraction 0.5, chunk 64):
- ``op``: the scan alone, ``seqblocks.ops.mamba3.mamba3`` (backend "auto") against mamba_ssm's
  ``mamba3_siso_combined`` on the same inputs, forward and forward+backward (random cotangents).
- ``layer``: the whole mixer, ``seqblocks.layers.mixers.Mamba3`` against mamba_ssm's ``Mamba3`` with the
  same state dict, forward and forward+backward.
- ``decode``: one token with a cache: the op ``mamba3_step`` (Triton, the PyTorch step in the note) and
  the layer's step against mamba_ssm's ``Mamba3.step`` (its CuteDSL kernel; "not installed" when that
  does not import or run). The floor is the fp32 state read and written once.
Each row prints our time, the anchor's time measured in the same run, the ratio (ours / anchor) and our
% of the roofline: max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both measured here. The op's
bytes are every input read once and the output written once (q and k once per group, not per head);
its FLOPs are the chunked form's (QK^T and SV in the chunk, the state read and update). Forward+backward
counts three times the forward's bytes and FLOPs (inputs read again, dy read, every gradient written;
the backward does about twice the forward's matmuls). A missing anchor is reported "not installed".

mamba_ssm is found as built by /work/shared/anchors/build_anchors.py: ``--anchors BUILD_DIR`` (or the
``SEQBLOCKS_ANCHORS`` environment variable) is put on sys.path and ``build_anchors.activate(BUILD_DIR)``
called; Mamba-3's kernels are Triton, so only the unpacked Python sources are needed.

Needs a CUDA device. Shapes: B batch, T time, H heads, P head width, N state, G groups, S angles.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from seqblocks.layers.mixers import Mamba3
from seqblocks.ops.mamba3 import Mamba3State, Mamba3Tuning, mamba3, mamba3_step

ROWS: list[dict] = []


def bench(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (bench(lambda: y.copy_(x)) * 1e-3)


def matmul_rate() -> float:
    """bf16 matmul FLOP/s at 8192^3."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * 8192 ** 3 / (bench(lambda: a @ b) * 1e-3)


def import_anchor(build_dir: str | None):
    """mamba_ssm's Mamba-3 pieces, or the reason they are missing."""
    try:
        if build_dir:
            sys.path.insert(0, build_dir)
            sys.path.insert(0, "/work/shared/anchors")
            import build_anchors
            build_anchors.activate(build_dir)
        from mamba_ssm.modules.mamba3 import Mamba3 as TheirMamba3
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined
        return TheirMamba3, mamba3_siso_combined, ""
    except Exception as err:  # any failure to import means: not installed here
        return None, None, f"{type(err).__name__}: {err}"


def fwd_bwd(fn, inputs):
    """A closure running forward + backward with fixed random cotangents on the output."""
    def run():
        for x in inputs:
            x.grad = None
        out = fn()
        if not hasattr(run, "cot"):
            run.cot = torch.randn_like(out)
        out.backward(run.cot)
    return run


def add_row(section, name, ours_ms, anchor_ms, floor_ms, note=""):
    ratio = ours_ms / anchor_ms if anchor_ms else None
    row = {"section": section, "name": name, "ms": ours_ms, "anchor_ms": anchor_ms, "ratio": ratio,
           "floor_ms": floor_ms, "pct": 100 * floor_ms / ours_ms if floor_ms else None, "note": note}
    ROWS.append(row)
    a = f"{anchor_ms:9.3f} ms" if anchor_ms else "not installed"
    r = f"{ratio:5.2f}x" if ratio else "    -"
    print(f"  {name:34s} ours {ours_ms:9.3f} ms  mamba_ssm {a:>13s}  ratio {r}  "
          f"floor {floor_ms:7.3f} ms {row['pct']:6.1f}%  {note}", flush=True)


def op_inputs(Bsz, T, H, P, N, S, G=1):
    dev, bf = "cuda", torch.bfloat16
    q, k = (torch.randn(Bsz, T, 1, G, N, device=dev, dtype=bf) for _ in range(2))
    v, z = (torch.randn(Bsz, T, H, P, device=dev, dtype=bf) for _ in range(2))
    dt = F.softplus(torch.randn(Bsz, T, H, device=dev) - 3)
    adt = -torch.rand(Bsz, T, H, device=dev) * dt
    trap = torch.randn(Bsz, T, H, device=dev, dtype=bf)
    qb, kb = (torch.ones(H, 1, N, device=dev) for _ in range(2))
    angles = torch.randn(Bsz, T, H, S, device=dev)
    D = torch.ones(H, device=dev)
    return [q, k, v, adt, dt, trap, qb, kb, angles, D, z]


def op_floor(Bsz, T, H, P, N, S, G, L, bw, mm) -> float:
    tokens = Bsz * T
    nbytes = tokens * (2 * G * N * 2 + 3 * H * P * 2 + H * (4 + 4 + 2) + H * S * 4)
    flops = tokens * H * (2 * L * (N + P) + 4 * N * P)
    return max(nbytes / bw, flops / mm) * 1e3


def tunings(args) -> list[Mamba3Tuning]:
    """Every combination of the comma-separated knob lists."""
    lists = {f: [int(v) for v in str(getattr(args, f)).split(",")] for f in
             ("rows", "block_p", "block_n", "fwd_num_warps", "bwd_num_warps", "num_stages")}
    return [Mamba3Tuning(**dict(zip(lists, combo))) for combo in itertools.product(*lists.values())]


def tuning_name(t: Mamba3Tuning) -> str:
    return (f"rows{t.rows} bp{t.block_p} bn{t.block_n} w{t.fwd_num_warps}/{t.bwd_num_warps} "
            f"s{t.num_stages}")


def section_op(args, bw, mm, anchor_fn, why):
    Bsz, T, D = args.batch, args.seqlen, args.d_model
    P, N = 64, 128
    H, S = 2 * D // P, N // 4
    inputs = op_inputs(Bsz, T, H, P, N, S)
    floor = op_floor(Bsz, T, H, P, N, S, 1, 64, bw, mm)
    print(f"op: B={Bsz} T={T} H={H} P={P} N={N} S={S} (bf16, chunk {args.chunk_size})")

    def theirs():
        q, k, v, adt, dt, trap, qb, kb, angles, Dp, z = inputs
        return anchor_fn(Q=q[:, :, 0], K=k[:, :, 0], V=v, ADT=adt.transpose(1, 2), DT=dt.transpose(1, 2),
                         Trap=trap.transpose(1, 2), Q_bias=qb[:, 0], K_bias=kb[:, 0], Angles=angles, D=Dp, Z=z,
                         chunk_size=64)

    with torch.no_grad():
        a_fwd = bench(theirs) if anchor_fn else None
    for x in inputs:
        x.requires_grad_(True)
    a_bwd = bench(fwd_bwd(theirs, inputs)) if anchor_fn else None
    best = None
    for tuning in tunings(args):
        def ours(tuning=tuning):
            return mamba3(*inputs, chunk_size=args.chunk_size, tuning=tuning)

        name = tuning_name(tuning)
        try:
            with torch.no_grad():
                fwd = bench(ours)
            both = bench(fwd_bwd(ours, inputs))
        except Exception as err:  # a launch the compiler or the device refuses: report, keep sweeping
            print(f"  {name}: failed ({type(err).__name__}: {str(err)[:160]})", flush=True)
            continue
        add_row("op", f"forward {name}", fwd, a_fwd, floor, "" if anchor_fn else why)
        add_row("op", f"forward+backward {name}", both, a_bwd, 3 * floor)
        if best is None or both < best[0]:
            best = (both, name)
    if best:
        print(f"  fastest forward+backward: {best[1]} ({best[0]:.3f} ms)")


def section_decode(args, bw, anchor_cls, why):
    Bsz, D = args.batch, args.d_model
    P, N = 64, 128
    H, S = 2 * D // P, N // 4
    dev, bf = "cuda", torch.bfloat16
    floor = Bsz * H * P * N * 4 * 2 / bw * 1e3  # the fp32 state read and written
    print(f"decode: B={Bsz} H={H} P={P} N={N} (bf16 inputs, fp32 state)")
    state = Mamba3State(torch.zeros(Bsz, H, S, device=dev), torch.randn(Bsz, H, P, N, device=dev),
                        torch.randn(Bsz, 1, H, N, device=dev), torch.randn(Bsz, H, P, device=dev))
    dt = F.softplus(torch.randn(Bsz, H, device=dev) - 3)
    step_args = [torch.randn(Bsz, 1, 1, N, device=dev, dtype=bf), torch.randn(Bsz, 1, 1, N, device=dev, dtype=bf),
                 torch.randn(Bsz, H, P, device=dev, dtype=bf), -torch.rand(Bsz, H, device=dev) * dt, dt,
                 torch.randn(Bsz, H, device=dev), torch.ones(H, 1, N, device=dev), torch.ones(H, 1, N, device=dev),
                 torch.randn(Bsz, H, S, device=dev), torch.ones(H, device=dev),
                 torch.randn(Bsz, H, P, device=dev, dtype=bf)]
    torch_ms = bench(lambda: mamba3_step(state, *step_args, backend="torch"))
    for bp, warps in itertools.product(*([int(v) for v in str(x).split(",")]
                                         for x in (args.step_block_p, args.step_num_warps))):
        tuning = Mamba3Tuning(step_block_p=bp, step_num_warps=warps)
        ms = bench(lambda tuning=tuning: mamba3_step(state, *step_args, tuning=tuning))
        add_row("decode", f"mamba3_step bp{bp} w{warps}", ms, None, floor, f"our PyTorch step {torch_ms:.3f} ms")
    ours = Mamba3(D, chunk_size=args.chunk_size, device=dev, dtype=bf)
    cache = ours.allocate_inference_cache(Bsz, 1 << 20)
    x = torch.randn(Bsz, 1, D, device=dev, dtype=bf)
    with torch.no_grad():
        mine = bench(lambda: ours(x, cache))
        anchor, note = None, why
        if anchor_cls:
            try:
                theirs = anchor_cls(d_model=D, layer_idx=0, device=dev, dtype=bf)
                their_cache = theirs.allocate_inference_cache(Bsz, 1 << 20)
                theirs.step(x[:, 0], *their_cache)
                anchor, note = bench(lambda: theirs.step(x[:, 0], *their_cache)), ""
            except Exception as err:  # mamba_ssm's step needs its CuteDSL kernels
                note = f"not installed ({type(err).__name__}: {str(err)[:80]})"
    add_row("decode", "Mamba3 layer step", mine, anchor, floor, note)


def section_layer(args, bw, mm, anchor_cls, why):
    Bsz, T, D = args.batch, args.seqlen, args.d_model
    ours = Mamba3(D, chunk_size=args.chunk_size, device="cuda", dtype=torch.bfloat16)
    theirs = None
    if anchor_cls:
        theirs = anchor_cls(d_model=D, layer_idx=0, device="cuda", dtype=torch.bfloat16)
        ours.load_state_dict(theirs.state_dict())
    x = torch.randn(Bsz, T, D, device="cuda", dtype=torch.bfloat16)
    P, N = 64, 128
    H = 2 * D // P
    proj = 2 * Bsz * T * D * (ours.in_proj.out_features + 2 * D)  # in_proj and out_proj matmuls
    floor = op_floor(Bsz, T, H, P, N, N // 4, 1, 64, bw, mm) + proj / mm * 1e3
    print(f"layer: B={Bsz} T={T} d_model={D} (bf16)")
    with torch.no_grad():
        a = bench(lambda: theirs(x)) if theirs else None
        add_row("layer", "Mamba3 forward", bench(lambda: ours(x)), a, floor, "" if theirs else why)
    x.requires_grad_(True)
    a = bench(fwd_bwd(lambda: theirs(x), [x])) if theirs else None
    add_row("layer", "Mamba3 forward+backward", bench(fwd_bwd(lambda: ours(x), [x])), a, 3 * floor)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchors", default=os.environ.get("SEQBLOCKS_ANCHORS"), help="mamba_ssm build dir")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--chunk-size", type=int, default=64, help="our chunk (the kernels cap it at --rows rows)")
    defaults = Mamba3Tuning()
    for flag, field in (("--rows", "rows"), ("--block-p", "block_p"), ("--block-n", "block_n"),
                        ("--fwd-warps", "fwd_num_warps"), ("--bwd-warps", "bwd_num_warps"),
                        ("--stages", "num_stages"), ("--step-block-p", "step_block_p"),
                        ("--step-warps", "step_num_warps")):
        p.add_argument(flag, dest=field, default=str(getattr(defaults, field)),
                       help=f"Mamba3Tuning.{field}, a comma list to sweep (default {getattr(defaults, field)})")
    p.add_argument("--json", default=None, help="write all rows to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/mamba3.py needs a CUDA device")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    bw, mm = copy_bandwidth(), matmul_rate()
    print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s (read + write); bf16 matmul: {mm / 1e12:.0f} TFLOP/s")
    anchor_cls, anchor_fn, why = import_anchor(args.anchors)
    if why:
        print(f"mamba_ssm's Mamba-3: not installed ({why})")
    section_op(args, bw, mm, anchor_fn, "not installed")
    section_layer(args, bw, mm, anchor_cls, "not installed")
    section_decode(args, bw, anchor_cls, "not installed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bw, "matmul_rate": mm, "rows": ROWS, "device": torch.cuda.get_device_name(),
                       "anchor": why or "mamba_ssm 2.3.2"}, f, indent=1)


if __name__ == "__main__":
    main()
