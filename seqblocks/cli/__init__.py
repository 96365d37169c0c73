"""The ``seqblocks`` command line: list, info, train, generate, serve, eval, bench, demo, convert, tokenizer
train, prepare, and the post-training commands (distill, dpo, grpo, lora, quantize).

``main(argv)`` parses the arguments and runs one subcommand; it returns the process exit status
(0 on success, 2 on a usage or configuration error, 1 when a run directory cannot be written for want
of space or permission; either is printed as one clear line; set ``SEQBLOCKS_DEBUG=1`` to see the
traceback instead).
See ``docs/cli.md`` for a tour.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "build_parser"]


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Training flags; each defaults to None so only the ones given override the preset's values."""
    g = p.add_argument_group("training (defaults come from the preset's 'train' section, then TrainConfig)")
    g.add_argument("--steps", type=int, help="optimizer steps of the schedule")
    g.add_argument("--batch-size", type=int, help="sequences per optimizer step, over all processes")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, help="final learning rate / peak")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0: off)")
    g.add_argument("--seed", type=int, help="seed of initialisation and data")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CUDA, else fp32")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--compile-backend", help="torch.compile backend (default inductor)")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], help="data parallelism under torchrun (default ddp)")
    g.add_argument("--fsdp-param-dtype", choices=["fp32", "bf16", "fp16"],
                   help="FSDP2 mixed precision: dtype of the gathered parameters and the compute (default fp32)")
    g.add_argument("--fsdp-reduce-dtype", choices=["fp32", "bf16", "fp16"],
                   help="FSDP2 mixed precision: dtype of the gradient reduce-scatter (default fp32)")
    g.add_argument("--fsdp-reshard-after-forward", action=argparse.BooleanOptionalAction, default=None,
                   help="FSDP2: free each block's gathered parameters after its forward (default: yes)")
    g.add_argument("--checkpoint-format", choices=["auto", "full", "sharded"],
                   help="full: rank 0 writes model.safetensors; sharded: every rank writes its shards "
                        "(torch.distributed.checkpoint); auto (default): sharded under FSDP2 with several processes")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (0: at the end only)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--eval-steps", type=int, help="evaluate on the first N held-out batches only (0: all)")
    g.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (0: at the end only)")
    g.add_argument("--keep-checkpoints", type=int, help="checkpoints to keep (0: all)")
    g.add_argument("--log-every", type=int, help="metrics line every N steps")
    g.add_argument("--sample-tokens", type=int, help="characters to sample at the end (language tasks)")
    g.add_argument("--sample-prompt", help="prompt of the final sample")
    g.add_argument("--sample-temperature", type=float)
    g.add_argument("--seq-len-warmup", type=int, help="sequence-length warmup over the first N steps (0: off)")
    g.add_argument("--seq-len-start", type=int, help="first length of the sequence-length warmup (default 16)")
    g.add_argument("--activation-checkpointing", type=int, metavar="N",
                   help="recompute every N-th block's activations in the backward pass (1: every block; 0: off)")
    g.add_argument("--context-parallel", type=int, metavar="N",
                   help="split each sequence along time over N processes (context parallelism; default 1: off)")
    g.add_argument("--context-parallel-attention", choices=["ring", "allgather"],
                   help="how attention exchanges keys and values under --context-parallel (default ring)")


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads of torch (default: the cores other processes leave idle, re-checked while "
                        "training; OMP_NUM_THREADS also fixes it)")


def _add_task_options(p: argparse.ArgumentParser, help_task: str) -> None:
    p.add_argument("--task", help=help_task)
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. --task-opt seq_len=256 (repeatable; see `seqblocks list`)")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", "-n", type=int, default=300)
    g.add_argument("--temperature", "-t", type=float, default=0.8, help="0 is greedy")
    g.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop after generating this text, e.g. --stop $'\\n\\n' (repeatable; token ids separated by "
                        "spaces for checkpoints without a tokenizer)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the draws (default: a fresh one, printed so the sample can be repeated)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqblocks",
        description="Train, sample, evaluate and compare sequence models on embedded tasks (no download).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="registered mixers, FFNs, norms, positions, presets and tasks")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("info", help="parameters, layer pattern and memory estimate of a preset or config file")
    p.add_argument("config", nargs="?", default=None, help="preset name or JSON config file (default: tiny)")
    p.add_argument("--vocab-size", type=int, help="override the config's vocabulary size")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length of the estimate (default: preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch of the estimate (default: preset's)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train a model on a task (torchrun for several processes)")
    p.add_argument("config", nargs="?", default=None, help="preset name or JSON config file (default: tiny)")
    p.add_argument("--out", "-o", help="run directory (default: runs/<config name>)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                       "(with --steps N: to N steps)")
    start.add_argument("--overwrite", action="store_true", help="delete the previous run in --out (its checkpoints "
                       "and metrics) and start afresh")
    p.add_argument("--force-unlock", action="store_true", help="take --out even when its lock names a live run "
                   "(another host's, or a hung process)")
    p.add_argument("--stop-after", type=int, help="stop after this many steps of the schedule (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--config", dest="run_file", metavar="RUN.toml",
                   help="a run file (TOML or YAML: [model], [data], [tokenizer], [optim], [schedule], ...); every "
                        "flag, and --section.key VALUE for any key of it (--optim.lr 3e-4), overrides it")
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="train on your own text: a directory from `seqblocks prepare`, or text files, folders, "
                        "globs, .jsonl / .parquet / .arrow files, prepared into OUT/data first (repeatable)")
    p.add_argument("--tokenizer", help="tokenizer of text given to --data: char (default), gpt2, cl100k_base, ..., "
                   "a .tiktoken file or a tokenizer .json (from `seqblocks tokenizer train`)")
    _add_task_options(p, "task name (default: the preset's, usually chars)")
    p.add_argument("--model", choices=["causal_lm", "encoder_decoder", "classifier", "image_classifier"],
                   help="model kind (default: the one the task trains: an encoder-decoder for seq2seq, a "
                        "classifier for classification, a Vision Transformer for shapes, else the config's "
                        "causal LM)")
    _add_train_options(p)
    _add_threads_option(p)

    p = sub.add_parser("tokenizer", help="`tokenizer train`: train a byte-level BPE tokenizer on your text")
    p.add_argument("action", choices=["train"])
    p.add_argument("sources", nargs="+", help="text files, folders, globs, .jsonl / .parquet / .arrow files")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, 256 bytes and <|endoftext|> "
                   "included (default 8192)")
    p.add_argument("--min-frequency", type=int, default=2, help="learn no merge seen fewer times (default 2)")
    p.add_argument("--text-field", default="text", help="the text field of JSONL / table sources (default text)")
    p.add_argument("--out", "-o", default="tokenizer.json", help="where to write it (default tokenizer.json)")

    p = sub.add_parser("prepare", help="tokenize text once, in parallel, into memory-mapped token shards")
    p.add_argument("sources", nargs="+", help="text files, folders, globs, .jsonl / .parquet / .arrow files, "
                   "saved datasets, hf:NAME[:SPLIT]")
    p.add_argument("--out", "-o", required=True, help="the directory of the shards")
    p.add_argument("--tokenizer", default="char", help="char (default), gpt2, cl100k_base, ..., a .tiktoken file or "
                   "a tokenizer .json")
    p.add_argument("--val-fraction", type=float, default=0.01, help="held-out share of documents (default 0.01)")
    p.add_argument("--text-field", default="text", help="the text field of JSONL / table sources (default text)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: CPUs, at most 8)")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file (default 2**27)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("generate", help="sample from a checkpoint, streaming to the terminal")
    p.add_argument("checkpoint", help="checkpoint directory or run directory (uses its latest checkpoint)")
    p.add_argument("--prompt", "-p", default="def ", help="prompt text (token ids separated by spaces for "
                   "checkpoints without a tokenizer)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    _add_threads_option(p)
    _add_generation_options(p)

    p = sub.add_parser("serve", help="an HTTP server for a checkpoint: OpenAI-compatible /v1/completions and "
                       "/v1/chat/completions (streaming), continuous batching (needs the serve extra)")
    p.add_argument("checkpoint", help="checkpoint directory or run directory (uses its latest checkpoint)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (cache slots)")
    p.add_argument("--max-seqlen", type=int, default=2048, help="the most tokens (prompt + generated) per request")
    p.add_argument("--prefill-chunk-size", type=int, default=512, help="prompt tokens prefilled per engine step")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before new ones get a 503")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cancelled")
    p.add_argument("--cuda-graph", action="store_true", help="replay the decode step from a CUDA graph")
    p.add_argument("--model-name", help="the model id the API reports (default: the checkpoint's folder name)")
    _add_threads_option(p)

    p = sub.add_parser("eval", help="loss / perplexity / accuracy of a checkpoint on a task's held-out split")
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    _add_task_options(p, "task name (default: the task the checkpoint was trained on)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--seed", type=int, default=None, help="task seed (default: the training seed)")
    _add_threads_option(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="mixer speed (default), `bench tasks`: MQAR across mixer types, or "
                       "`bench mup`: learning-rate transfer across widths with and without muP")
    p.add_argument("what", nargs="?", choices=["speed", "tasks", "mup"], default="speed")
    p.add_argument("--mixers", help="comma-separated mixer names (default: every registered causal mixer for "
                   "speed; attn,mamba,rglru,s4d,lru for tasks, those registered)")
    p.add_argument("--out", "-o", default="bench", help="directory for the table, JSON and plot (default: bench)")
    p.add_argument("--device", default="auto")
    p.add_argument("--d-model", type=int, help="width (speed default 256, tasks default 64; mup: the base width, "
                   "default 32)")
    p.add_argument("--seq-len", type=int, help="sequence length (speed default 512; tasks and mup default 32)")
    p.add_argument("--batch-size", type=int, help="batch (speed default 4; tasks default 64; mup default 16)")
    p.add_argument("--repeats", type=int, default=5, help="speed: timed repetitions (median reported)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="speed: input and weight dtype")
    p.add_argument("--steps", type=int, help="tasks: training steps per mixer (default 2000); mup: per run "
                   "(default 80)")
    p.add_argument("--widths", help="mup: comma-separated widths, the narrowest = --d-model (default: d_model "
                   "and 4 * d_model)")
    p.add_argument("--num-kv-pairs", default=None, help="tasks: comma-separated MQAR pair counts (default 4)")
    p.add_argument("--lr", help="tasks: learning rate, or comma-separated rates to sweep (each mixer keeps its "
                   "best; default 1e-2); mup: the sweep (default 1e-3,3e-3,1e-2,3e-2,1e-1)")
    p.add_argument("--no-progress", action="store_true")
    _add_threads_option(p)

    p = sub.add_parser("demo", help="real-valued models on CPU: `demo denoise` (LRUUnet, SI-SNR) or `demo "
                       "oscillators` (forecasters, event vs regular form)")
    p.add_argument("what", choices=["denoise", "oscillators"])
    p.add_argument("--steps", type=int, help="training steps (default 150)")
    p.add_argument("--batch-size", type=int, help="examples per step (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--seq-len", type=int, help="samples per example (denoise default 512, oscillators 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixers", help="oscillators: comma-separated mixer names (default S5)")
    p.add_argument("--out", "-o", help="denoise: save the model here; oscillators: write the table here")
    p.add_argument("--no-progress", action="store_true")
    _add_threads_option(p)
    p = sub.add_parser("convert", help="convert a Hugging Face (or mamba_ssm) model folder to a seqblocks "
                       "checkpoint, or a seqblocks checkpoint to a Hugging Face folder")
    p.add_argument("src", help="the folder to read: a seqblocks checkpoint, an HF folder, or a mamba_ssm folder")
    p.add_argument("dst", help="the folder to write")
    p.add_argument("--to", choices=["seqblocks", "hf", "mamba_ssm"], default=None,
                   help="target format (default: hf for a seqblocks checkpoint, seqblocks otherwise)")
    p.add_argument("--family", default=None, help="HF family to write with --to hf (default: read from the model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="convert the weights to this dtype (default: keep them)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    from seqblocks.cli.post import add_post_parsers

    add_post_parsers(sub)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from seqblocks.cli.demo import cmd_demo

    return cmd_demo(args)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from seqblocks.cli import commands
    from seqblocks.tokenizers import MissingExtraError
    from seqblocks.train.config_file import is_override
    from seqblocks.train.rundir import RunDirectoryWriteError

    argv = list(sys.argv[1:] if argv is None else argv)
    # `train --optim.lr 3e-4`: the run file's dotted keys, taken out before argparse sees them.
    overrides: list[str] = []
    if argv[:1] == ["train"]:
        rest = []
        for i, word in enumerate(argv):
            if overrides and overrides[-1] is None:
                overrides[-1] = word
            elif i and is_override(word):
                overrides.extend([word] if "=" in word else [word, None])
            else:
                rest.append(word)
        argv = rest
    args = build_parser().parse_args(argv)
    if args.command == "train":
        if overrides and overrides[-1] is None:
            print(f"seqblocks train: error: {overrides[-2]} needs a value", file=sys.stderr)
            return 2
        args.overrides = overrides
    handler = {"list": commands.cmd_list, "info": commands.cmd_info, "train": commands.cmd_train,
               "generate": commands.cmd_generate, "serve": commands.cmd_serve, "eval": commands.cmd_eval,
               "bench": commands.cmd_bench, "demo": _cmd_demo, "convert": commands.cmd_convert,
               "tokenizer": commands.cmd_tokenizer, "prepare": commands.cmd_prepare}
    from seqblocks.cli.post import HANDLERS

    handler.update(HANDLERS)
    threads = None
    try:
        if hasattr(args, "threads"):  # the commands that compute
            from seqblocks.cli.threads import CpuThreads

            threads = args.cpu_threads = CpuThreads(args.threads)
            threads.start()
        return handler[args.command](args) or 0
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, MissingExtraError) as err:
        if os.environ.get("SEQBLOCKS_DEBUG"):
            raise
        print(f"seqblocks {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunDirectoryWriteError as err:  # a full disk, a read-only directory: the run's last checkpoint is intact
        if os.environ.get("SEQBLOCKS_DEBUG"):
            raise
        print(f"seqblocks {args.command}: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `seqblocks list | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"seqblocks {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if threads is not None:
            threads.restore()
