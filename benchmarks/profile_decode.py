"""Profile eager decoding of a small hybrid LM: where does a decode step spend its time?

Usage: python benchmarks/profile_decode.py [--device cuda] [--dtype bfloat16] [--tokens 32]
Prints the time per token for each mixer type alone and for the hybrid, then the top host-side ops of
one decode step of the hybrid.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from seqblocks import LRNNLMHeadModel, generate


def per_token(model, prompt, tokens, device):
    generate(model, prompt, max_new_tokens=4)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    generate(model, prompt, max_new_tokens=tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / tokens * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    prompt = torch.randint(0, 256, (1, 32), device=args.device)
    for types in (["mamba"], ["attn"], ["lru"], ["rglru"], ["s5"], ["s4d"], ["s7"], ["s4"], ["centaurus"],
                  ["mla"], ["sliding_window"]):
        m = LRNNLMHeadModel(d_model=256, d_state=16, n_layer=2, vocab_size=256, mixer_types=types * 2,
                            mixer_kwargs={"sliding_window": {"window_size": 16}},
                            device=args.device, dtype=dtype).eval()
        print(f"{types[0]:>15}: {per_token(m, prompt, args.tokens, args.device):7.2f} ms/token (2 layers)")
    m = LRNNLMHeadModel(d_model=256, d_state=16, n_layer=8, vocab_size=256,
                        mixer_types=["mamba", "attn", "lru", "rglru"] * 2, device=args.device, dtype=dtype).eval()
    print(f"{'hybrid (8)':>15}: {per_token(m, prompt, args.tokens, args.device):7.2f} ms/token")
    caches = m.allocate_inference_cache(1, 128)
    with torch.no_grad():
        m(prompt, inference_params=caches)
        tok = prompt[:, -1:]
        for _ in range(3):
            m.step(tok, caches)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            m.step(tok, caches)
            if args.device == "cuda":
                torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
