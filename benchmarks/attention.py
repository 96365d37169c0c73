"""Attention benchmark: our layer / op next to raw PyTorch SDPA and raw FlexAttention, in one run.

Prints, per workload, forward and forward+backward times (median of CUDA-event timings), our / raw
ratio, and TFLOP/s with its fraction of the bf16 dense matmul peak (``--peak``, default 720 TFLOP/s).

    python benchmarks/attention.py [--batch 4 --heads 32 --seqlen 4096 --head-dim 128]

Shapes: B batch, H heads, Hkv key/value heads, T time, K head width, D model width.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F


def bench(fn, *, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` CUDA-event timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(fn, inputs, grad):
    def run():
        out = fn()
        torch.autograd.grad(out, inputs, grad)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--peak", type=float, default=720.0, help="bf16 dense TFLOP/s of the device")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA device")

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from seqblocks import MHA, soft_cap
    from seqblocks.ops.attention import attention

    B, H, Hkv, T, K = args.batch, args.heads, args.kv_heads, args.seqlen, args.head_dim
    dev, dt = "cuda", torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; B={B} H={H} Hkv={Hkv} T={T} K={K} "
          f"bf16, peak {args.peak:g} TFLOP/s")
    causal_flops = 4 * B * H * T * T * K / 2  # two matmuls, half the pairs
    rows = []

    def report(name, ours_fn, raw_fn, inputs, flops):
        out = raw_fn()
        grad = torch.randn_like(out)
        # Interleaved rounds, best median of each: clock and thermal drift hit both sides alike.
        t_ours = t_raw = tb_ours = tb_raw = float("inf")
        for _ in range(3):
            t_raw, t_ours = min(t_raw, bench(raw_fn)), min(t_ours, bench(ours_fn))
            tb_raw = min(tb_raw, bench(fwd_bwd(raw_fn, inputs, grad)))
            tb_ours = min(tb_ours, bench(fwd_bwd(ours_fn, inputs, grad)))
        for mode, o, r, f in (("fwd", t_ours, t_raw, flops), ("fwd+bwd", tb_ours, tb_raw, 3.5 * flops)):
            tf = f / (o * 1e-3) / 1e12
            rows.append((name, mode, o, r, o / r, tf, tf / args.peak))

    q = torch.randn(B, H, T, K, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, H, T, K, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, H, T, K, device=dev, dtype=dt, requires_grad=True)
    report("causal op (flash) vs SDPA",
           lambda: attention(q, k, v, causal=True, backend="flash"),
           lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), causal_flops)

    kg = torch.randn(B, Hkv, T, K, device=dev, dtype=dt, requires_grad=True)
    vg = torch.randn(B, Hkv, T, K, device=dev, dtype=dt, requires_grad=True)
    report(f"GQA {H}/{Hkv} op (flash) vs SDPA",
           lambda: attention(q, kg, vg, causal=True, backend="flash"),
           lambda: F.scaled_dot_product_attention(q, kg, vg, is_causal=True, enable_gqa=True), (q, kg, vg),
           causal_flops)

    # The full layer: our MHA against the same projections around a raw SDPA call.
    D = H * K
    layer = MHA(D, H, causal=True, attention_type="flash", device=dev, dtype=dt)
    x = torch.randn(B, T, D, device=dev, dtype=dt, requires_grad=True)

    def raw_layer():
        qkv = F.linear(x, layer.in_proj.weight, layer.in_proj.bias).view(B, T, 3, H, K)
        qq, kk, vv = qkv.unbind(dim=2)
        o = F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), is_causal=True)
        return F.linear(o.transpose(1, 2).reshape(B, T, D), layer.out_proj.weight, layer.out_proj.bias)

    report("causal MHA layer vs raw projections+SDPA (attention FLOPs only)", lambda: layer(x), raw_layer, (x,),
           causal_flops)

    cap = soft_cap(30.0)

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal_mask, None, None, T, T, device=dev, _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)
    report("causal+softcap op (flex) vs raw flex",
           lambda: attention(q, k, v, causal=True, score_mod=cap, backend="flex"),
           lambda: flex(q, k, v, score_mod=cap, block_mask=block_mask), (q, k, v), causal_flops)
    report("causal+softcap GQA op (flex) vs raw flex",
           lambda: attention(q, kg, vg, causal=True, score_mod=cap, backend="flex"),
           lambda: flex(q, kg, vg, score_mod=cap, block_mask=block_mask, enable_gqa=True), (q, kg, vg),
           causal_flops)

    window = 1024

    def window_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    window_block_mask = create_block_mask(window_mask, None, None, T, T, device=dev, _compile=True)
    window_flops = 4 * B * H * T * K * (window * (T - window) + window * (window + 1) / 2) / T
    report(f"sliding window {window} op (flex) vs raw flex",
           lambda: attention(q, k, v, window=window, backend="flex"),
           lambda: flex(q, k, v, block_mask=window_block_mask), (q, k, v), window_flops)

    print(f"{'workload':64s} {'pass':8s} {'ours ms':>9s} {'raw ms':>9s} {'ratio':>7s} {'TFLOP/s':>8s} {'of peak':>8s}")
    for name, mode, o, r, ratio, tf, frac in rows:
        print(f"{name:64s} {mode:8s} {o:9.3f} {r:9.3f} {ratio:7.3f} {tf:8.1f} {frac:8.1%}")


if __name__ == "__main__":
    main()
