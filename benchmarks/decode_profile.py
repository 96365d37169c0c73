# ruff: noqa: B023  (closures are run at once, inside the loop that binds them)
"""Where a decode token's time goes: the captured step's kernels against the whole ``generate`` loop.

    python benchmarks/decode_profile.py [--preset mamba-130m] [--batches 1,8] [--tokens 256] [--top 12]

For each batch size (random weights, bf16, CUDA graph): the time per token of ``generate`` (median of
three calls after a warm-up that captures the graph), split into what each further token costs (the slope
between ``--tokens`` and twice as many) and what each call costs once (the prefill, the graph lookup, the
cache reset: the intercept); the time of one bare replay of the captured step
(``graph_decoder(...).graph.replay()``, 200 replays), so that the slope minus the replay is what the loop
adds around the graph per token (sampling, the input copy, Python); and the step's kernels by name, the
largest first, with their share of the replay (``kernel_profile.profile``, ``count_kernels``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from kernel_profile import profile as kernels_by_name  # benchmarks/kernel_profile.py, beside this script

from seqblocks.generation import count_kernels, generate, graph_decoder
from seqblocks.presets import build_model, get_preset


def seconds(fn, repeats: int) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mamba-130m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(get_preset(args.preset)["model"], device=torch.device("cuda"), dtype=torch.bfloat16).eval()
    vocab = get_preset(args.preset)["model"]["vocab_size"]
    print(f"{args.preset}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for batch in [int(b) for b in args.batches.split(",")]:
        prompt = torch.randint(0, vocab, (batch, args.prompt_len), device="cuda")

        def wall(tokens: int) -> float:
            """Median seconds of a ``tokens``-token greedy ``generate`` (its graph captured beforehand)."""
            generate(model, prompt, tokens, temperature=0, cuda_graph=True, max_seqlen=capacity)
            walls = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                generate(model, prompt, tokens, temperature=0, cuda_graph=True, max_seqlen=capacity)
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - t0)
            return statistics.median(walls)

        # Both lengths share one capacity (and so one captured graph): the longer run's.
        n1, n2 = args.tokens, 2 * args.tokens
        capacity = args.prompt_len + n2
        w2 = wall(n2)
        w1 = wall(n1)
        per_token = w1 / n1
        slope = (w2 - w1) / (n2 - n1)
        decoder = graph_decoder(model, batch, capacity, prompt.device)
        replay = seconds(decoder.graph.replay, 200)
        print(f"\nB={batch}: generate {per_token * 1e6:7.1f} us a token over {n1} ({batch / per_token:,.0f} tok/s): "
              f"{slope * 1e6:7.1f} us each further token, {(w1 - slope * n1) * 1e3:6.2f} ms once a call; bare replay "
              f"{replay * 1e6:7.1f} us; around the graph {(slope - replay) * 1e6:7.1f} us a token", flush=True)
        per = kernels_by_name(decoder.graph.replay, [], False, 20)  # name -> ms a replay
        busy = sum(per.values()) * 1e3
        print(f"  kernels in one replay: {count_kernels(decoder.graph.replay)}, busy {busy:.1f} us of the "
              f"{replay * 1e6:.1f} us replay")
        for name, ms in sorted(per.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {ms * 1e3:8.1f} us  {100 * ms * 1e3 / max(busy, 1e-9):5.1f} %  {name[:90]}")
        total = kernels_by_name(lambda: generate(model, prompt, 16, temperature=0, cuda_graph=True,
                                                 max_seqlen=capacity), [], False, 1)
        outside = {n: ms for n, ms in total.items() if n not in per}
        print("  a 16-token generate: the device ops not in the replay (the prefill and the loop around the "
              "graph), by time:")
        for name, ms in sorted(outside.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {ms * 1e3:8.1f} us  {name[:90]}")


if __name__ == "__main__":
    main()
