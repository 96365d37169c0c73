"""Mamba decode step per layer: in_proj as a cuBLAS GEMM around ``mamba_step`` against in_proj (and the
block's add + norm) folded into the step kernels (``mamba_layer_step``), over the fold's block sizes.

    python benchmarks/mamba_step_fold.py [--d-model 768] [--batches 1,8] [--layers 24] [--quick]

Each design runs ``--layers`` layers of distinct random bf16 weights (mamba-130m's shapes by default:
E = 2D, N 16, R = D / 16), captured in one CUDA graph and replayed; the figure is the replay time over the
layer count, so weights come from HBM as in a real decode step (24 layers of weights exceed L2). The
unfolded design is the library's default step: ``add_norm`` (Triton), in_proj (cuBLAS), ``mamba_step``'s
two launches, out_proj (cuBLAS): five launches. The folded one is ``mamba_layer_step`` with the add +
RMSNorm inside and out_proj: three. The roofline is the layer's weight bytes (in_proj, x_proj, dt_proj,
out_proj, conv) once per step over the copy bandwidth measured in the run.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from seqblocks.ops.add_norm import add_norm
from seqblocks.ops.selective_scan.step import mamba_step
from seqblocks.ops.selective_scan.step_triton import mamba_layer_step_triton


def copy_bandwidth() -> float:
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (start.elapsed_time(end) / 1e3)


def layer(D: int, dev: str) -> dict:
    E, N, R, W = 2 * D, 16, max(1, D // 16), 4
    bf = torch.bfloat16
    return {
        "in_proj": torch.randn(2 * E, D, device=dev, dtype=bf) / D ** 0.5,
        "conv_weight": torch.randn(E, W, device=dev, dtype=bf) / 2, "conv_bias": torch.randn(E, device=dev, dtype=bf),
        "x_proj": torch.randn(R + 2 * N, E, device=dev, dtype=bf) / E ** 0.5,
        "dt_proj": torch.randn(E, R, device=dev, dtype=bf) / R ** 0.5,
        "dt_bias": torch.randn(E, device=dev) * 0.5 - 4, "A_log": torch.log(torch.rand(E, N, device=dev) * 8 + 1),
        "D": torch.ones(E, device=dev), "out_proj": torch.randn(D, E, device=dev, dtype=bf) / E ** 0.5,
        "norm_weight": torch.ones(D, device=dev, dtype=bf),
    }


def caches(Bsz: int, D: int, dev: str) -> dict:
    E = 2 * D
    return {"conv_state": torch.zeros(Bsz, 3, E, device=dev, dtype=torch.bfloat16),
            "ssm_state": torch.zeros(Bsz, E, 16, device=dev), "off": torch.zeros(Bsz, dtype=torch.long, device=dev)}


def unfolded(p, c, h, res):
    x, r = add_norm(h, res, p["norm_weight"], None, 1e-5, True, True, prenorm=True)
    xz = F.linear(x, p["in_proj"])
    E = p["conv_weight"].shape[0]
    y = mamba_step(xz[:, :E], c["conv_state"], p["conv_weight"], p["x_proj"], p["dt_proj"], c["ssm_state"],
                   p["A_log"], p["conv_bias"], p["D"], xz[:, E:], delta_bias=p["dt_bias"], a_is_log=True,
                   seqlen_offset=c["off"], backend="triton")
    return F.linear(y, p["out_proj"]), r


def folded(p, c, h, res, **cfg):
    y, r = mamba_layer_step_triton(
        h, p["in_proj"], c["conv_state"], p["conv_weight"], p["x_proj"], p["dt_proj"], c["ssm_state"], p["A_log"],
        p["conv_bias"], p["D"], residual=res, norm="rmsnorm", norm_weight=p["norm_weight"], eps=1e-5,
        residual_in_fp32=True, delta_bias=p["dt_bias"], a_is_log=True, seqlen_offset=c["off"], **cfg)
    return F.linear(y, p["out_proj"]), r


def time_graph(step, params, cache, h0, res0, repeats=50) -> float:
    """Seconds per layer: ``len(params)`` layers chained in one captured graph."""
    def run():
        h, res = h0, res0
        for p, c in zip(params, cache):
            h, res = step(p, c, h, res)
        return h

    with torch.no_grad():
        run()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats / len(params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="the launcher's default blocks only")
    args = ap.parse_args()
    dev, D = "cuda", args.d_model
    bw = copy_bandwidth()
    params = [layer(D, dev) for _ in range(args.layers)]
    wbytes = sum(v.numel() * v.element_size() for k, v in params[0].items() if k not in ("dt_bias", "D"))
    print(f"copy {bw / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}; D {D}, E {2 * D}, {args.layers} layers; "
          f"weights {wbytes / 1e6:.2f} MB a layer, floor {wbytes / bw * 1e6:.2f} us")
    grid = [{}] if args.quick else [{}] + [
        {"block_e_conv": be, "block_d": bd, "warps": w}
        for be, bd, w in itertools.product((16, 32, 64), (64, 128, 256), (4, 8))]
    for Bsz in [int(b) for b in args.batches.split(",")]:
        cache = [caches(Bsz, D, dev) for _ in params]
        h0 = torch.randn(Bsz, D, device=dev, dtype=torch.bfloat16)
        res0 = torch.randn(Bsz, D, device=dev)
        base = time_graph(unfolded, params, cache, h0, res0)
        print(f"B={Bsz} unfolded (add_norm, in_proj GEMM, mamba_step, out_proj): {base * 1e6:7.2f} us/layer  "
              f"roofline {100 * wbytes / bw / base:5.1f}%", flush=True)
        rows = []
        for cfg in grid:
            try:
                t = time_graph(lambda p, c, h, r, cfg=cfg: folded(p, c, h, r, **cfg), params, cache, h0, res0)
            except Exception as err:  # a block size the compiler refuses (shared memory, registers)
                print(f"B={Bsz} folded {cfg or 'default'}: failed ({type(err).__name__}: {str(err)[:100]})")
                continue
            rows.append((t, cfg))
            print(f"B={Bsz} folded {cfg or 'default'}: {t * 1e6:7.2f} us/layer  ratio {t / base:5.2f}x  "
                  f"roofline {100 * wbytes / bw / t:5.1f}%", flush=True)
        if rows:
            t, cfg = min(rows, key=lambda r: r[0])
            print(f"B={Bsz} best folded {cfg or 'default'}: {t * 1e6:.2f} us/layer, {t / base:.2f}x the unfolded step")


if __name__ == "__main__":
    main()
