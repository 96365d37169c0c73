"""Cost of a masked SDPA decode call whose key length grows by one each step, per SDPA backend.

Usage: python benchmarks/sdpa_decode_shapes.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def run(backends, grow: bool, steps: int = 64) -> float:
    q = torch.randn(1, 4, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 512, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with sdpa_kernel(backends):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            S = 100 + i if grow else 512
            mask = torch.ones(1, 1, 1, S, device="cuda", dtype=torch.bool)
            F.scaled_dot_product_attention(q, k[:, :, :S], v[:, :, :S], attn_mask=mask)
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    all_ = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    no_cudnn = all_[1:]
    run(all_, False)
    for name, backends in (("default order", all_), ("no cuDNN", no_cudnn), ("efficient only", [all_[2]])):
        print(f"{name:>15}: growing S {run(backends, True):7.3f} ms/call   fixed S {run(backends, False):7.3f} ms/call")


if __name__ == "__main__":
    main()
