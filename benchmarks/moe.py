# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""MoE FFN forward + backward on the GPU: the grouped path against a dense FFN of the same active
size and against the naive per-expert loop.

    python benchmarks/moe.py [--json out.json] [--tokens 16384]

Cases (bf16 weights and inputs, random cotangents):

- mixtral: d_model 2048, 8 SwiGLU experts of width 5632, top-2;
- deepseek: d_model 2048, 64 experts of width 1408, top-6, one shared expert of width 1408,
  sigmoid router with 8 groups / 4 per token.

Rows per case:

- grouped: ``MoEFeedForward.forward`` (token sort + grouped GEMMs: ``torch._grouped_mm`` on sm90
  bf16, else the Triton kernel);
- grouped-triton: the same with the Triton grouped GEMM forced (``prefer_backend`` cannot reach it
  on sm90 bf16, so ``grouped_mm`` is patched to ``backend="triton"`` for this row);
- loop: the same routing, then a Python loop over experts (index the rows of each expert, run it,
  ``index_add_`` back): the naive baseline;
- dense: a SwiGLU FFN whose hidden width is the active expert width (top_k * F, plus the shared
  experts), i.e. the same matmul FLOPs per token without routing.

Each row prints milliseconds, tokens/s and the % of the matmul roofline: the expert, shared and
router matmul FLOPs of forward + backward (3x the forward's 2 * M * K * N per product) divided by
805 TFLOP/s (bf16 dense matmul measured on an H200). Needs a CUDA device.

Shapes: N tokens, D width, E experts, k top_k, F expert hidden width.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.testing import do_bench

import seqblocks.layers.moe as moe_module
from seqblocks.config import BlockConfig
from seqblocks.layers.ffn import GatedFeedForward
from seqblocks.layers.moe import MoEFeedForward
from seqblocks.ops.grouped_gemm import grouped_mm

PEAK_FLOPS = 805e12
CASES = {
    "mixtral": dict(d_model=2048, d_ff=5632, n_experts=8, top_k_experts=2),
    "deepseek": dict(d_model=2048, d_ff=1408, n_experts=64, top_k_experts=6, n_shared_experts=1,
                     moe_router="sigmoid", moe_n_groups=8, moe_topk_groups=4),
}
ROWS: list[dict] = []


def bench(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def loop_forward(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The naive baseline: route, then one Python iteration per expert."""
    h = x.reshape(-1, layer.d_model)
    index, weights, _, _ = layer.route(h)
    y = torch.zeros(h.shape[0], layer.d_model, device=h.device, dtype=weights.dtype)
    for e in range(layer.n_experts):
        token, slot = (index == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        out = layer._run_expert(e, h[token])
        y.index_add_(0, token, out.to(y.dtype) * weights[token, slot, None])
    if layer.shared is not None:
        y = y + layer.shared(h).to(y.dtype)
    return y.to(x.dtype).view(x.shape)


def matmul_flops(cfg: BlockConfig, n_tokens: int) -> float:
    """Forward + backward matmul FLOPs of the experts, shared experts and router."""
    D, Fh, E, k = cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k_experts
    shared = cfg.n_shared_experts or 0
    per_token = 6 * D * Fh * (k + shared) + 2 * D * E
    return 3 * per_token * n_tokens


def fwd_bwd(fn, x, cot):
    def run():
        x.grad = None
        fn(x).backward(cot)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/moe.py needs a CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    N = args.tokens
    for name, fields in CASES.items():
        cfg = BlockConfig(ffn="moe", bias=False, **fields)
        layer = MoEFeedForward(cfg, device="cuda", dtype=torch.bfloat16)
        active = (cfg.top_k_experts + (cfg.n_shared_experts or 0)) * cfg.d_ff
        dense = GatedFeedForward(BlockConfig(d_model=cfg.d_model, d_ff=active, bias=False),
                                 device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, N, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cot = torch.randn_like(x)
        flops = matmul_flops(cfg, N)

        def triton_layer(inp):
            original = moe_module.grouped_mm
            moe_module.grouped_mm = lambda a, w, o: grouped_mm(a, w, o, backend="triton")
            try:
                return layer(inp)
            finally:
                moe_module.grouped_mm = original

        rows = {"grouped": layer, "grouped-triton": triton_layer, "loop": lambda inp: loop_forward(layer, inp),
                "dense": dense}
        torch.testing.assert_close(layer(x).float(), loop_forward(layer, x).float(), atol=5e-2, rtol=5e-2)
        for row, fn in rows.items():
            ms = bench(fwd_bwd(fn, x, cot))
            pct = 100 * flops / (ms * 1e-3) / PEAK_FLOPS
            result = {"case": name, "row": row, "tokens": N, "ms": ms, "tokens_per_s": N / (ms * 1e-3),
                      "roofline_pct": pct}
            ROWS.append(result)
            print(f"{name:<9} {row:<15} {ms:8.3f} ms  {result['tokens_per_s']:>12,.0f} tok/s  "
                  f"{pct:5.1f}% of {PEAK_FLOPS / 1e12:.0f} TFLOP/s")
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
