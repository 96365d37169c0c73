"""Paged decode attention: our kernel, reading pages through the block table, next to what the layers did
before it (gather the pages into a contiguous view, then masked SDPA) and to SDPA on keys already
contiguous (a ``KVCache``'s decode step), in one run.

Prints per contender the median time of one call, its ratio to ours, and its fraction of the HBM
roofline: the bytes of keys and values that must be read (each row's attended positions once) over
the copy bandwidth measured in the same run (a large device-to-device copy, read + write bytes).

    python benchmarks/paged_attention.py [--batch 8 --heads 32 --kv-heads 8 --head-dim 128 --page-size 16
                                          --seqlen 4096 --ragged --window W --dtype bf16]
    python benchmarks/paged_attention.py --device cpu --seqlen 256      # a smoke check (reference path)

Shapes: B batch, H query heads, Hkv key/value heads, K head width, N page_size, S longest row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seqblocks.layers.attention.paged import new_block_table
from seqblocks.ops.attention import attention
from seqblocks.ops.attention.paged import bytes_read, paged_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench(fn, device: torch.device, *, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, *, warmup: int, iters: int) -> float:
    """Bytes per second of a large copy (read + write), the run's roofline bandwidth."""
    n = (1 << 30 if device.type == "cuda" else 1 << 26) // 4
    src = torch.empty(n, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, warmup=warmup, iters=iters)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=4096, help="length of every row (the longest with --ragged)")
    parser.add_argument("--ragged", action="store_true", help="row lengths uniform in [1, seqlen]")
    parser.add_argument("--window", type=int, default=None, help="sliding window")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default: 100 on CUDA, 5 on CPU)")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    iters = args.iters or (100 if device.type == "cuda" else 5)
    warmup = 10 if device.type == "cuda" else 1
    B, H, Hkv, K, N, S = args.batch, args.heads, args.kv_heads, args.head_dim, args.page_size, args.seqlen
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, S + 1, (B,), generator=g) if args.ragged else torch.full((B,), S)
    lens[0] = S
    table = new_block_table(B, S, N)
    P = table.numel() + 1
    table[:] = (torch.randperm(P - 1, generator=g) + 1).view_as(table)  # pages in a random order
    table, lens = table.to(device), lens.to(device)
    q = torch.randn(B, H, 1, K, device=device, dtype=dtype)
    k_pages = torch.randn(P, Hkv, N, K, device=device, dtype=dtype)
    v_pages = torch.randn(P, Hkv, N, K, device=device, dtype=dtype)
    valid_pages = torch.ones(P, N, device=device, dtype=torch.bool)

    def gather(pages):  # what PagedKVCache.read does: [B, Hkv, S, K]
        return pages[table].transpose(1, 2).reshape(B, Hkv, -1, K)[:, :, :S]

    key_valid = torch.arange(S, device=device)[None] < lens[:, None]
    q_pos = (lens - 1)[:, None]
    k_contiguous, v_contiguous = gather(k_pages).contiguous(), gather(v_pages).contiguous()

    def ours():
        return paged_attention(q, k_pages, v_pages, table, lens, valid_pages=valid_pages, window=args.window,
                               max_seqlen=S)

    def gather_sdpa():
        valid = valid_pages[table].reshape(B, -1)[:, :S] & key_valid
        return attention(q, gather(k_pages), gather(v_pages), causal=True, window=args.window, q_positions=q_pos,
                         key_valid=valid, backend="flash")

    def contiguous_sdpa():
        return attention(q, k_contiguous, v_contiguous, causal=True, window=args.window, q_positions=q_pos,
                         key_valid=key_valid, backend="flash")

    with torch.no_grad():
        ref = contiguous_sdpa().float()
        for name, fn in (("ours", ours), ("gather + SDPA", gather_sdpa)):
            err = (fn().float() - ref).abs().max().item()
            if err > 5e-2:
                raise SystemExit(f"{name} differs from contiguous SDPA by {err:.3g}")
        bw = copy_bandwidth(device, warmup=warmup, iters=max(5, iters // 10))
        need = bytes_read(q, k_pages, v_pages, lens, window=args.window)
        floor_ms = need / bw * 1e3
        times = {name: bench(fn, device, warmup=warmup, iters=iters)
                 for name, fn in (("paged kernel (ours)", ours), ("gather + SDPA", gather_sdpa),
                                  ("contiguous SDPA", contiguous_sdpa))}
    backend = "Triton" if device.type == "cuda" else "reference (no kernel on CPU)"
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {args.dtype}, "
          f"B={B} H={H} Hkv={Hkv} K={K} page={N} S={S}{' ragged' if args.ragged else ''}"
          f"{f' window={args.window}' if args.window else ''}; ours runs the {backend} path")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; K/V bytes to read {need / 1e6:.1f} MB -> floor {floor_ms:.4f} ms")
    ours_ms = times["paged kernel (ours)"]
    print(f"{'':>22} {'ms':>9} {'/ ours':>8} {'% roofline':>11}")
    for name, ms in times.items():
        print(f"{name:>22} {ms:9.4f} {ms / ours_ms:8.2f} {100 * floor_ms / ms:10.1f}%")


if __name__ == "__main__":
    main()
