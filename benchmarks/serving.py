"""Serving benchmark: the HTTP server (continuous batching) under N concurrent clients on loopback,
against HF transformers' ``generate`` on the same weights, one run, one table.

    python benchmarks/serving.py [--model llama-125m|hybrid-130m|tiny] [--clients 1,8,32] [--requests 64]
                                 [--prompt-len 128] [--max-tokens 128] [--max-batch-size 32]
                                 [--device cuda|cpu] [--dtype bf16|fp32] [--cuda-graph] [--json out.json]
                                 [--anchors /tmp/anchors]

Models (random weights; serving speed does not depend on their values):
- ``llama-125m``: a Llama-style transformer (12 layers, d_model 768, 12 heads, SwiGLU 2048, RoPE,
  vocabulary 32000) in seqblocks, and transformers' ``LlamaForCausalLM`` of the same shapes for the
  anchor (its own random weights: the work per token is the same).
- ``hybrid-130m``: the ``hybrid-130m`` preset (24 Mamba layers, d_state 16, expand 2, with attention at
  every 6th, no MLP). transformers has no class of exactly this layout; the anchor is its
  ``JambaForCausalLM`` with the same layer pattern (Mamba-1 mixers of the same widths, attention at
  layers 5, 11, ... with the same heads, one expert) plus the width-64 MLP Jamba requires after every
  mixer (about 0.1 M parameters per layer; its cost per token is negligible). Jamba runs mamba_ssm's
  and causal_conv1d's kernels when they import (the anchors built on the GPU machine) and its
  PyTorch fallback otherwise; the table header says which.
- ``tiny``: a 2-layer model for a quick CPU run.

Rows, for each client count C (each client sends requests back to back, ``--requests`` in all,
greedy, ``--prompt-len`` random tokens, ``--max-tokens`` new tokens, streaming):
- ours: requests/s and generated tokens/s over the whole run, time to first token (p50 / p99) and
  inter-token latency (p50 / p99) as the clients measure them on the SSE stream;
- anchor: transformers ``generate`` (static batches of C prompts, greedy, KV cache, the same lengths),
  tokens/s and its per-token latency (batch time / tokens per row), in the same process.
Ratios are ours / anchor throughput. The roofline column is the decode-step floor: weight bytes read
once per step / the copy bandwidth measured here, as tokens/s for a batch of C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import torch

from seqblocks import LRNNLMHeadModel
from seqblocks.serving import Engine
from seqblocks.serving.server import create_app


def build(name: str, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if name == "tiny":
        model = LRNNLMHeadModel(128, 16, 2, 512, ["mamba", "attn"], d_intermediate=256,
                                mixer_kwargs={"attn": {"num_heads": 4}})
    elif name == "llama-125m":
        model = LRNNLMHeadModel(768, 16, 12, 32000, ["attn"] * 12, d_intermediate=2048, rms_norm=True,
                                mixer_kwargs={"attn": {"num_heads": 12, "rotary_emb_dim": 64, "qkv_proj_bias": False,
                                                       "out_proj_bias": False}}, pad_vocab_size_multiple=1)
    elif name == "hybrid-130m":
        from seqblocks.presets import build_model, load_config

        model = build_model(load_config("hybrid-130m")["model"])
    else:
        raise SystemExit(f"unknown --model {name!r}")
    return model.to(device=device, dtype=dtype).eval()


def hf_anchor(name: str, model, device: str, dtype: torch.dtype):
    """A transformers model of the same shapes (its own random weights: speed only), or None."""
    if name == "hybrid-130m":
        try:
            from transformers import JambaConfig, JambaForCausalLM
        except ImportError:
            return None
        from seqblocks.presets import load_config

        m = load_config(name)["model"]
        heads = m["mixer_kwargs"]["attn"]["num_heads"]
        kernels = _mamba_kernels_import()
        cfg = JambaConfig(vocab_size=model.vocab_size, hidden_size=m["d_model"], intermediate_size=64,
                          num_hidden_layers=m["n_layer"], num_attention_heads=heads, num_key_value_heads=heads,
                          num_experts=1, num_experts_per_tok=1, expert_layer_period=1, expert_layer_offset=0,
                          attn_layer_period=6, attn_layer_offset=5, mamba_d_state=m["d_state"], mamba_d_conv=4,
                          mamba_expand=2, use_mamba_kernels=kernels, tie_word_embeddings=True)
        print(f"anchor: transformers JambaForCausalLM, mamba kernels {'on' if kernels else 'off (PyTorch fallback)'}")
        return JambaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    if name != "llama-125m":
        return None
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()  # same shapes; speed only


def _mamba_kernels_import() -> bool:
    try:
        import causal_conv1d  # noqa: F401
        import mamba_ssm  # noqa: F401
    except ImportError:
        return False
    return True


def bandwidth(device: str) -> float:
    if device != "cuda":
        return float("nan")
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - start)


async def client_run(url: str, prompts: list[list[int]], max_tokens: int, clients: int):
    import aiohttp

    ttft, itl, tokens = [], [], 0
    queue = list(prompts)

    async def client(session):
        nonlocal tokens
        while queue:
            prompt = queue.pop()
            start = time.perf_counter()
            last = None
            async with session.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                                    "temperature": 0, "stream": True}) as r:
                async for line in r.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - start)
                    else:
                        itl.append(now - last)
                    last = now
                    tokens += 1

    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - start
    return wall, tokens, ttft, itl


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def serve_and_measure(model, args, prompts, clients):
    from aiohttp import web

    engine = Engine(model, max_batch_size=args.max_batch_size, max_seqlen=args.prompt_len + args.max_tokens + 1,
                    prefill_chunk_size=max(args.prompt_len, 512), cuda_graph=args.cuda_graph)
    if args.cuda_graph:
        engine.capture_graphs()  # as `seqblocks serve --cuda-graph` does: no capture inside the timed run
    runner = web.AppRunner(create_app(engine, None, request_timeout=3600))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        await client_run(url, prompts[: min(len(prompts), clients)], 4, clients)  # warm-up
        return await client_run(url, prompts, args.max_tokens, clients)
    finally:
        await runner.cleanup()


@torch.no_grad()
def hf_measure(hf, prompts, clients, max_tokens, device):
    times, rows = [], 0
    for i in range(0, len(prompts), clients):
        batch = torch.tensor(prompts[i:i + clients], device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        hf.generate(batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                    attention_mask=torch.ones_like(batch), pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        rows += batch.shape[0]
    wall = sum(times)
    return wall, rows * max_tokens, statistics.median(times) / max_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--anchors", default=None,
                        help="build folder of .anchors/build_anchors.py (Jamba then runs mamba_ssm's kernels)")
    args = parser.parse_args()
    if args.anchors:
        sys.path[:0] = [".anchors"]
        import build_anchors

        build_anchors.activate(args.anchors)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    model = build(args.model, args.device, dtype)
    hf = hf_anchor(args.model, model, args.device, dtype)
    V = model.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (args.requests, args.prompt_len), generator=g).tolist()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = bandwidth(args.device)
    rows = []
    print(f"model {args.model} ({weight_bytes / 1e6:.0f} MB of weights), {args.device} {dtype}, "
          f"{args.requests} requests, prompt {args.prompt_len}, {args.max_tokens} new tokens each")
    print("| clients | ours tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | HF generate tok/s | "
          "ours / HF | floor tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in [int(x) for x in args.clients.split(",")]:
        wall, tokens, ttft, itl = asyncio.run(serve_and_measure(model, args, prompts, c))
        hf_row = hf_measure(hf, prompts, c, args.max_tokens, args.device) if hf is not None else None
        hf_tps = hf_row[1] / hf_row[0] if hf_row else None
        floor = min(c, args.max_batch_size) * bw / weight_bytes if bw == bw else float("nan")
        row = {"clients": c, "tokens_per_s": tokens / wall, "requests_per_s": args.requests / wall,
               "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
               "itl_p50_ms": 1e3 * pct(itl, 0.5), "itl_p99_ms": 1e3 * pct(itl, 0.99),
               "hf_tokens_per_s": hf_tps, "floor_tokens_per_s": floor}
        rows.append(row)
        ratio = f"{row['tokens_per_s'] / hf_tps:.2f}x" if hf_tps else "no equivalent"
        hf_txt = f"{hf_tps:,.0f}" if hf_tps else "no equivalent"
        print(f"| {c} | {row['tokens_per_s']:,.0f} | {row['requests_per_s']:.2f} | {row['ttft_p50_ms']:.1f} / "
              f"{row['ttft_p99_ms']:.1f} | {row['itl_p50_ms']:.1f} / {row['itl_p99_ms']:.1f} | {hf_txt} | {ratio} | "
              f"{floor:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
