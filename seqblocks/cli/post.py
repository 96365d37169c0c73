"""The post-training commands: ``distill``, ``dpo``, ``grpo``, ``lora`` and ``quantize``.

Each is a thin layer over ``seqblocks.post``: it loads checkpoints (safetensors only), builds the
recipe's config from the flags and runs it in a run directory with checkpoints, ``--resume`` and
``metrics.jsonl``, like ``seqblocks train``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_post_parsers", "HANDLERS"]


def _loop_options(p: argparse.ArgumentParser, lr: float, steps: int) -> None:
    p.add_argument("--out", "-o", required=True, help="run directory")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    start.add_argument("--overwrite", action="store_true", help="delete the previous run in --out and start afresh")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the idle cores)")


def _lora_options(p: argparse.ArgumentParser, default_r: int) -> None:
    g = p.add_argument_group("LoRA (peft)")
    g.add_argument("--lora-r", type=int, default=default_r, help=f"adapter rank; 0 trains every weight "
                   f"(default {default_r})")
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--target-modules", default=None, help="comma-separated module names (default: every mixer "
                   "projection and the MLPs)")
    g.add_argument("--qlora", action="store_true", help="NF4 base weights (torchao) under the adapters")


def _task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", "-t", default=None, help="task name (default: the checkpoint's)")
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE", help="task option, repeatable")


def add_post_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the post-training subcommands to the ``seqblocks`` parser."""
    p = sub.add_parser("distill", help="distil a checkpoint into a student with attention layers replaced by a "
                       "linear RNN (Mamba-in-the-Llama initialisation, hidden alignment then logit KL)")
    p.add_argument("teacher", help="teacher checkpoint or run directory")
    p.add_argument("--mixer", default="gated_deltanet", help="student mixer: gated_deltanet, deltanet, gla, mamba2")
    p.add_argument("--layers", default="attention", help="'attention' (all), 'alternate' (every other) or "
                   "comma-separated layer indices")
    p.add_argument("--hidden-steps", type=int, default=0, help="steps of the hidden-state alignment stage")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the KL against the task cross-entropy")
    p.add_argument("--batch-size", type=int, default=16)
    _task_options(p)
    _loop_options(p, lr=1e-3, steps=200)

    p = sub.add_parser("dpo", help="DPO of a checkpoint on a JSONL of {prompt, chosen, rejected}")
    p.add_argument("policy", help="checkpoint or run directory (also the reference)")
    p.add_argument("--data", required=True, help="JSONL file: prompt / chosen / rejected as text or token ids")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    _lora_options(p, default_r=0)
    _loop_options(p, lr=5e-5, steps=100)

    p = sub.add_parser("grpo", help="GRPO of a checkpoint on the copying task (verifiable reward)")
    p.add_argument("policy", help="checkpoint or run directory (also the reference)")
    p.add_argument("--num-tokens", type=int, default=None, help="string length (default: the checkpoint's "
                   "copying task's, else 8)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kl-coeff", type=float, default=0.04)
    p.add_argument("--clip-eps", type=float, default=0.2)
    _lora_options(p, default_r=0)
    _loop_options(p, lr=1e-4, steps=100)

    p = sub.add_parser("lora", help="fine-tune a checkpoint's LoRA adapters on a task (saves adapters only)")
    p.add_argument("checkpoint", help="base checkpoint or run directory")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--merge", action="store_true", help="also write the merged model to OUT/merged")
    _task_options(p)
    _lora_options(p, default_r=8)
    _loop_options(p, lr=1e-3, steps=200)

    p = sub.add_parser("quantize", help="int8 / int4 weight-only quantisation (torchao): held-out loss before and "
                       "after")
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--mode", choices=["int8", "int4"], default="int8")
    p.add_argument("--group-size", type=int, default=32, help="int4 group width")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    _task_options(p)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _load(path: str, device):
    from seqblocks.cli.commands import load_checkpoint

    return load_checkpoint(path, device=device)


def _device(name: str):
    from seqblocks.train.distributed import resolve_device

    return resolve_device(name)


def _loop_values(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "lr": args.lr, "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip, "seed": args.seed, "log_every": args.log_every,
            "ckpt_every": args.ckpt_every}


def _resolve_task(args: argparse.Namespace, task_info: dict | None, ckpt: Path) -> tuple[str, dict[str, Any]]:
    from seqblocks.cli.commands import parse_task_options

    if args.task is not None:
        return args.task, parse_task_options(args.task_opt)
    if task_info is not None:
        return task_info["name"], {**task_info["options"], **parse_task_options(args.task_opt)}
    raise ValueError(f"{ckpt} does not say which task it was trained on; give --task")


def _saver(task_name: str | None, task_options: dict | None, tokenizer, adapters: bool):
    """The checkpoint writer: weights (or adapters only) plus task.json / tokenizer.json, so
    ``seqblocks generate`` and ``eval`` read a full-model checkpoint as they read ``train``'s."""
    from seqblocks.train.checkpointing import TASK_FILE, TOKENIZER_FILE

    def save(model, directory: Path) -> None:
        if adapters:
            from seqblocks.post.lora import save_adapters

            save_adapters(model, directory)
        else:
            model.save_pretrained(directory)
        if task_name is not None:
            (directory / TASK_FILE).write_text(json.dumps({"name": task_name, "options": task_options}, indent=2))
        if tokenizer is not None:
            tokenizer.save(directory / TOKENIZER_FILE)

    return save


def _with_lora(model, args: argparse.Namespace):
    """(policy, reference, save adapters?) for ``--lora-r``: the reference is the frozen base either way."""
    reference = copy.deepcopy(model)
    if args.lora_r <= 0:
        if args.qlora:
            raise ValueError("--qlora needs adapters: give --lora-r > 0")
        return model, reference, False
    from seqblocks.post.lora import apply_lora, apply_qlora, trainable_parameters

    targets = args.target_modules.split(",") if args.target_modules else None
    build = apply_qlora if args.qlora else apply_lora
    build(model, args.lora_r, args.lora_alpha, args.lora_dropout, targets)
    trained, total = trainable_parameters(model)
    _say(f"LoRA r={args.lora_r}{' on NF4 weights' if args.qlora else ''}: {trained:,} of {total:,} parameters train")
    return model, reference, True


def _loader(adapters: bool):
    if not adapters:
        from seqblocks.post.runner import load_model_weights

        return load_model_weights
    from seqblocks.post.lora import load_adapters

    return load_adapters


def _finish(name: str, result, out: str) -> int:
    shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
    if result.already_complete:
        _say(f"{name}: the run in {out} is complete ({result.step} steps); nothing to do")
    _say(f"{name}: step {result.step}, {shown}; checkpoint {result.checkpoint}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from seqblocks.models.lrnn_lm import LRNNLMHeadModel
    from seqblocks.post.distill import DistillConfig, distill, init_student_from_teacher, student_config

    device = _device(args.device)
    teacher, task_info, tokenizer, ckpt = _load(args.teacher, device)
    name, options = _resolve_task(args, task_info, ckpt)
    layers: Any = args.layers
    if layers not in ("attention", "alternate"):
        try:
            layers = [int(i) for i in layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers {args.layers!r} must be 'attention', 'alternate' or comma-separated "
                             f"integers") from None
    student = LRNNLMHeadModel.from_config(student_config(teacher, args.mixer, layers)).to(device)
    report = init_student_from_teacher(student, teacher)
    for key, what in report.items():
        _say(f"student {key}: {what}")
    config = DistillConfig(task=name, task_options=options, batch_size=args.batch_size, hidden_steps=args.hidden_steps,
                           temperature=args.temperature, alpha=args.alpha, **_loop_values(args))
    result = distill(teacher, student, config, args.out, resume=args.resume, overwrite=args.overwrite,
                     progress=not args.no_progress, save_fn=_saver(name, options, tokenizer, False), log=_say)
    return _finish("distill", result, args.out)


def cmd_dpo(args: argparse.Namespace) -> int:
    from seqblocks.post.dpo import DPOConfig, load_preferences, train_dpo

    device = _device(args.device)
    model, task_info, tokenizer, _ = _load(args.policy, device)
    pairs = load_preferences(args.data, tokenizer.encode if tokenizer is not None else None, model.vocab_size)
    policy, reference, adapters = _with_lora(model, args)
    config = DPOConfig(beta=args.beta, label_smoothing=args.label_smoothing, batch_size=args.batch_size,
                       max_len=args.max_len, **_loop_values(args))
    task = (task_info or {}).get("name"), (task_info or {}).get("options")
    result = train_dpo(policy, reference, pairs, config, args.out, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.no_progress, save_fn=_saver(*task, tokenizer, adapters),
                       load_fn=_loader(adapters), log=_say)
    return _finish("dpo", result, args.out)


def cmd_grpo(args: argparse.Namespace) -> int:
    from seqblocks.post.grpo import CopyPrompts, GRPOConfig, copy_reward, train_grpo

    device = _device(args.device)
    model, task_info, _, _ = _load(args.policy, device)
    options = dict(task_info["options"]) if task_info and task_info.get("name") == "copying" else {}
    num_tokens = args.num_tokens or options.get("num_tokens", 8)
    vocab = options.get("vocab_size", min(model.vocab_size, 16))
    prompts = CopyPrompts(vocab_size=vocab, num_tokens=num_tokens)
    if prompts.vocab_size > model.vocab_size:
        raise ValueError(f"the copying task's {prompts.vocab_size} tokens exceed the model's {model.vocab_size}")
    policy, reference, adapters = _with_lora(model, args)
    config = GRPOConfig(batch_size=args.batch_size, group_size=args.group_size, max_new_tokens=num_tokens,
                        temperature=args.temperature, kl_coeff=args.kl_coeff, clip_eps=args.clip_eps,
                        **_loop_values(args))
    task_options = {"vocab_size": vocab, "num_tokens": num_tokens}
    result = train_grpo(policy, reference, prompts, copy_reward, config, args.out, resume=args.resume,
                        overwrite=args.overwrite, progress=not args.no_progress,
                        save_fn=_saver("copying", task_options, None, adapters), load_fn=_loader(adapters),
                        log=_say)
    return _finish("grpo", result, args.out)


def cmd_lora(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from seqblocks.post.runner import LoopConfig, run_loop
    from seqblocks.tasks import IGNORE_INDEX, get_task

    device = _device(args.device)
    model, task_info, tokenizer, ckpt = _load(args.checkpoint, device)
    name, options = _resolve_task(args, task_info, ckpt)
    task = get_task(name, **options)
    if args.lora_r <= 0:
        raise ValueError(f"--lora-r={args.lora_r} must be positive for `seqblocks lora`")
    model, _, _ = _with_lora(model, args)
    config = LoopConfig(**_loop_values(args))

    def objective(step: int):
        batch = task.batch("train", step, args.batch_size, args.seed).to(device)
        logits = model(batch.input_ids).logits[..., : task.vocab_size].float()
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        return loss, {}

    result = run_loop(model, objective, config, args.out, recipe="lora", resume=args.resume, overwrite=args.overwrite,
                      progress=not args.no_progress, save_fn=_saver(name, options, tokenizer, True),
                      load_fn=_loader(True), run_info={"base": str(ckpt), "task": name, "task_options": options},
                      log=_say)
    if args.merge:
        from seqblocks.post.lora import merge_and_unload

        merged = Path(args.out) / "merged"
        merged.mkdir(exist_ok=True)
        merge_and_unload(model)
        _saver(name, options, tokenizer, False)(model, merged)
        _say(f"lora: merged model written to {merged}")
    return _finish("lora", result, args.out)


def cmd_quantize(args: argparse.Namespace) -> int:
    from seqblocks.post.quantize import quantize
    from seqblocks.tasks import get_task
    from seqblocks.train import evaluate

    device = _device(args.device)
    model, task_info, _, ckpt = _load(args.checkpoint, device)
    name, options = _resolve_task(args, task_info, ckpt)
    task = get_task(name, **options)
    before = evaluate(model, task, args.batch_size, device, "fp32")
    quantized, report = quantize(model, args.mode, group_size=args.group_size)
    after = evaluate(quantized, task, args.batch_size, device, "fp32")
    result = {"checkpoint": str(ckpt), "task": name, "mode": args.mode, "torchao_config": report.config,
              "quantized_layers": len(report.quantized), "skipped_layers": report.skipped,
              "loss": before["loss"], "ppl": before["ppl"], "quantized_loss": after["loss"],
              "quantized_ppl": after["ppl"], "ppl_change": after["ppl"] / before["ppl"] - 1.0}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{ckpt} on {name}: {args.mode} ({report.config}, {len(report.quantized)} layers"
              f"{f', {len(report.skipped)} kept' if report.skipped else ''}): perplexity {before['ppl']:.4f} -> "
              f"{after['ppl']:.4f} ({100 * result['ppl_change']:+.2f}%)")
    return 0


HANDLERS = {"distill": cmd_distill, "dpo": cmd_dpo, "grpo": cmd_grpo, "lora": cmd_lora, "quantize": cmd_quantize}
