# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Weight-only quantisation: decode speed-up and perplexity change of int8 / int4 against bf16.

    python benchmarks/quantization.py [--presets llama-125m,hybrid-mamba2-130m,mamba2-130m]
                                      [--batches 1,8] [--tokens 256] [--prompt-len 32] [--repeats 3]
                                      [--train-steps 300] [--checkpoint RUN_DIR] [--json out.json]
    python benchmarks/quantization.py --device cpu --presets tiny --train-steps 20 --tokens 16   # smoke run

For each preset it first trains the model for ``--train-steps`` steps on the embedded character
task (bf16 autocast on CUDA; a perplexity change is only meaningful for a model that has learned
something), or loads ``--checkpoint`` and its task instead. Then, for the bf16 model and its
``seqblocks.post.quantize`` int8 and int4 copies, it prints

- the held-out loss and perplexity on the task and the change against bf16;
- greedy decode tokens/s (median of ``--repeats`` timed ``generate`` calls after a warm-up call) per
  batch size, eager and with the CUDA graph (``cuda_graph=True``; a mode that fails is reported with
  its error instead of a number), and the speed-up over bf16 in the same mode;
- the weight bytes of the linear layers (int4's CUDA layout packs two values per byte; the CPU int4
  path holds them unpacked in int8, so there it saves no memory and gains no speed).

Needs a CUDA device for the speed numbers; ``--device cpu`` runs the same code at tiny sizes.
Shapes: B batch, T prompt length, N new tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from seqblocks.generation import generate
from seqblocks.post.quantize import quantize

ROWS: list[dict] = []


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tokens_per_second(run, batch: int, tokens: int, repeats: int, device: torch.device) -> float:
    run()  # warm-up: kernels compiled, graph captured
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return batch * tokens / statistics.median(times)


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every nn.Linear weight as stored (a torchao tensor counts its inner tensors)."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight
            inner = getattr(w, "__tensor_flatten__", None)
            if inner is not None:
                names, _ = inner()
                total += sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in names)
            else:
                total += w.numel() * w.element_size()
    return total


def trained_model(preset: str, steps: int, device: torch.device):
    from seqblocks.presets import get_preset
    from seqblocks.tasks import get_task
    from seqblocks.train import train
    from seqblocks.train.config import TrainConfig

    spec = get_preset(preset)
    train_opts = {**spec["train"], "steps": steps, "eval_every": 0, "ckpt_every": 0, "sample_tokens": 0,
                  "device": str(device), "warmup_steps": min(spec["train"].get("warmup_steps", 30), steps // 10)}
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **train_opts})
    with tempfile.TemporaryDirectory() as out:
        result = train(spec["model"], config, out, progress=False, log=lambda m: print(m, file=sys.stderr))
    return result.model, get_task(config.task, **config.task_options)


def loaded_model(path: str, device: torch.device):
    from seqblocks.cli.commands import load_checkpoint
    from seqblocks.tasks import get_task

    model, task_info, _, ckpt = load_checkpoint(path, device=device)
    if task_info is None:
        raise SystemExit(f"{ckpt} has no task.json; this benchmark evaluates on the checkpoint's task")
    return model, get_task(task_info["name"], **task_info["options"])


def bench(name: str, model, task, args, device: torch.device) -> None:
    from seqblocks.train import evaluate

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = model.to(device=device, dtype=dtype).eval()
    variants = {"bf16" if dtype == torch.bfloat16 else "fp32": base}
    for mode in ("int8", "int4"):
        variants[mode], report = quantize(base, mode, group_size=args.group_size)
        print(f"{name} {mode}: {report.config}, {len(report.quantized)} layers, {len(report.skipped)} kept",
              file=sys.stderr)
    reference_key = next(iter(variants))
    results: dict[str, dict] = {}
    for key, m in variants.items():
        ev = evaluate(m, task, 16, device, "fp32")
        row = {"preset": name, "weights": key, "loss": ev["loss"], "ppl": ev["ppl"],
               "linear_weight_mib": linear_weight_bytes(m) / 2**20}
        for B in args.batches:
            prompt = torch.randint(0, task.vocab_size, (B, args.prompt_len), device=device)
            for graph in ((False, True) if device.type == "cuda" else (False,)):
                label = f"b{B}_{'graph' if graph else 'eager'}"
                try:
                    rate = tokens_per_second(
                        lambda: generate(m, prompt, max_new_tokens=args.tokens, temperature=0, cuda_graph=graph),
                        B, args.tokens, args.repeats, device)
                    row[f"tok_s_{label}"] = rate
                except Exception as err:  # report the failing mode, keep measuring the others
                    row[f"tok_s_{label}"] = f"{type(err).__name__}: {str(err)[:120]}"
        results[key] = row
    ref = results[reference_key]
    for key, row in results.items():
        row["ppl_change"] = row["ppl"] / ref["ppl"] - 1.0
        for field, value in list(row.items()):
            if field.startswith("tok_s_") and isinstance(value, float) and isinstance(ref.get(field), float):
                row[f"speedup_{field[6:]}"] = value / ref[field]
        ROWS.append(row)
        rates = " ".join(f"{f[6:]} {v:,.0f} tok/s ({row.get('speedup_' + f[6:], float('nan')):.2f}x)"
                         if isinstance(v, float) else f"{f[6:]} {v}" for f, v in row.items() if f.startswith("tok_s_"))
        print(f"{name:>20} {key:>5}: ppl {row['ppl']:.4f} ({100 * row['ppl_change']:+.2f}%), linear weights "
              f"{row['linear_weight_mib']:.1f} MiB | {rates}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="llama-125m,hybrid-mamba2-130m,mamba2-130m")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint / run directory instead of the presets")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128, help="int4 group width")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a smoke run (no meaningful speed numbers)")
    if args.checkpoint:
        model, task = loaded_model(args.checkpoint, device)
        bench(args.checkpoint, model, task, args, device)
    else:
        for preset in args.presets.split(","):
            model, task = trained_model(preset, args.train_steps, device)
            bench(preset, model, task, args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=2)


if __name__ == "__main__":
    main()
