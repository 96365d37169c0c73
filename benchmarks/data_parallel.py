"""Data-parallel training throughput: tokens/s per GPU of the train step under DDP and FSDP2, and the
weak-scaling efficiency against one GPU.

    torchrun --nproc_per_node 8 benchmarks/data_parallel.py --preset hybrid-130m [--json out.json]
    torchrun --nproc_per_node 1 benchmarks/data_parallel.py --preset mamba-130m       # world size 1
    torchrun --nproc_per_node 2 benchmarks/data_parallel.py --preset tiny --device cpu --steps 2 \\
        --batch-size 2 --seq-len 64                                                # a check on CPU (gloo)

A step is what ``seqblocks train`` runs: the forward of ``--batch-size`` rows of ``--seq-len`` random
tokens per process (so the global batch grows with the world size: weak scaling), the summed
cross-entropy in fp32, the backward (DDP's bucketed all-reduce, or FSDP2's all-gathers and
reduce-scatters), gradient clipping and the AdamW step. Each mode is timed over ``--steps`` steps after
``--warmup`` steps (Triton compilation, allocator and NCCL warm-up excluded), between device
synchronisations; the slowest rank's time counts.

Efficiency is the per-GPU tokens/s divided by the world-size-1 tokens/s: ``--baseline`` gives that
figure (e.g. from a ``--nproc_per_node 1`` run of the same command), otherwise rank 0 measures it first
on its own device, unwrapped, while the other ranks wait. Under ``--parallel fsdp`` the baseline is the
same unwrapped single-device step (FSDP2 of one process is a no-op in ``seqblocks train``).

Printed per mode: world size, global tokens/s, per-GPU tokens/s, efficiency, peak memory per GPU; with
``--json PATH`` rank 0 also writes them (and the settings) as JSON.

Shapes: B rows per process, T sequence length, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqblocks.presets import load_config, preset_names
from seqblocks.train.distributed import DistInfo, barrier, init_distributed, wrap_model
from seqblocks.train.models import build_train_model
from seqblocks.train.optim import make_optimizer
from seqblocks.train.trainer import autocast_context, resolved_precision


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="hybrid-130m", help=f"model preset (default hybrid-130m): {preset_names()}")
    p.add_argument("--parallel", choices=["ddp", "fsdp", "both"], default="both", help="modes to time (default both)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per process per step (default 8)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when CUDA is there), cpu, cuda")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast as in seqblocks train (auto: bf16 on CUDA)")
    p.add_argument("--fsdp-param-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="FSDP2 mixed precision: gathered parameter / compute dtype (default fp32)")
    p.add_argument("--fsdp-reduce-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--no-reshard-after-forward", action="store_true",
                   help="FSDP2: keep each block's gathered parameters from its forward to its backward")
    p.add_argument("--baseline", type=float, default=None, metavar="TOKENS_PER_S",
                   help="world-size-1 tokens/s of this step (default: rank 0 measures it)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here (rank 0)")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.baseline is not None and args.baseline <= 0:
        p.error(f"--baseline must be a positive tokens/s figure, got {args.baseline}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(args: argparse.Namespace, vocab: int, device: torch.device, rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g).to(device)


def time_steps(args: argparse.Namespace, model_config: dict[str, Any], info: DistInfo, mode: str | None) -> dict:
    """Build the model, wrap it (``mode`` None: unwrapped, for the baseline), and time the train step.

    Returns:
        dict: ``seconds`` (the slowest rank's, over the timed steps), ``tokens_per_s`` (all ranks),
        ``tokens_per_s_per_gpu``, ``peak_memory_gib`` (this rank's, CUDA only).
    """
    torch.manual_seed(0)
    module = build_train_model(model_config).to(info.device)
    module.train()
    world = info.world_size if mode is not None else 1
    if mode is not None:
        fsdp = {"param_dtype": args.fsdp_param_dtype, "reduce_dtype": args.fsdp_reduce_dtype,
                "reshard_after_forward": not args.no_reshard_after_forward} if mode == "fsdp" else {}
        wrapped = wrap_model(module, info, mode, **fsdp)
    else:
        wrapped = module
    optimizer = make_optimizer(module, 1e-4, 0.1, (0.9, 0.95))
    vocab = model_config["vocab_size"]
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)

    def step(i: int) -> None:
        ids = _tokens(args, vocab, info.device, info.rank, i)
        with autocast_context(info.device, args.precision):
            logits = wrapped(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        (loss / ids[:, 1:].numel()).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    _sync(info.device)
    if mode is not None:
        barrier(info)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    _sync(info.device)
    seconds = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
    if mode is not None and info.distributed:
        seconds = seconds.to(info.device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    seconds = float(seconds)
    tokens = world * args.batch_size * args.seq_len * args.steps
    memory = torch.cuda.max_memory_allocated(info.device) / 2**30 if info.device.type == "cuda" else None
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / world,
            "peak_memory_gib": memory}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = init_distributed(args.device)
    say = print if info.is_main else (lambda *a, **k: None)
    config = load_config(args.preset)
    model_config = dict(config["model"])
    n_params = sum(p.numel() for p in build_train_model(model_config, device="meta").parameters())
    precision = resolved_precision(info.device, args.precision)
    say(f"{args.preset}: {n_params / 1e6:.1f}M parameters, {args.batch_size} x {args.seq_len} tokens per process "
        f"and step, {precision}, world size {info.world_size} on {info.device.type}"
        f"{' (' + torch.cuda.get_device_name(info.device) + ')' if info.device.type == 'cuda' else ''}")
    baseline, baseline_source = args.baseline, "given"
    if baseline is None and not info.distributed:
        baseline_source = "this run"  # world size 1: the first mode's own figure
    elif baseline is None:
        baseline_source = "measured on rank 0 alone"
        if info.is_main:
            baseline = time_steps(args, model_config, info, None)["tokens_per_s_per_gpu"]
        barrier(info)  # the others wait while rank 0 measures alone
        if info.distributed:
            box = [baseline]
            dist.broadcast_object_list(box, src=0, device=info.device if info.device.type == "cuda" else None)
            baseline = box[0]
    if baseline is not None:
        say(f"world size 1: {baseline:,.0f} tokens/s ({baseline_source})")
    rows = []
    for mode in (["ddp", "fsdp"] if args.parallel == "both" else [args.parallel]):
        result = time_steps(args, model_config, info, mode)
        if info.device.type == "cuda":  # the previous mode's model and optimizer are gone by now
            torch.cuda.empty_cache()
        if baseline is None:
            baseline = result["tokens_per_s_per_gpu"]
        result.update(mode=mode, world_size=info.world_size, efficiency=result["tokens_per_s_per_gpu"] / baseline)
        rows.append(result)
        memory = f", peak memory {result['peak_memory_gib']:.2f} GiB per GPU" if result["peak_memory_gib"] else ""
        say(f"{mode:>4}: world size {info.world_size}, {result['tokens_per_s']:,.0f} tokens/s, "
            f"{result['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, weak-scaling efficiency "
            f"{result['efficiency']:.1%}{memory}")
    if args.json is not None and info.is_main:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        payload = {"settings": settings, "parameters": n_params, "precision": precision,
                   "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "baseline_tokens_per_s": baseline, "baseline": baseline_source,
                   "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))
        say(f"wrote {args.json}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the lent machines need it so)
    sys.exit(main())
