"""The subcommands of ``seqblocks``: each ``cmd_<name>(args)`` returns an exit status."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["cmd_list", "cmd_info", "cmd_train", "cmd_generate", "cmd_eval", "cmd_bench", "cmd_convert",
           "cmd_tokenizer", "cmd_prepare", "cmd_serve", "parse_task_options", "load_checkpoint", "stream_sample"]


def _out(text: str = "") -> None:
    print(text, flush=True)


def parse_task_options(pairs: list[str]) -> dict[str, Any]:
    """``["seq_len=256", "root=/tmp"]`` -> ``{"seq_len": 256, "root": "/tmp"}`` (Python literals or strings)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--task-opt {pair!r} must look like KEY=VALUE")
        try:
            options[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key.strip()] = value
    return options


# ---------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace) -> int:
    import seqblocks  # noqa: F401  (registers the built-in components)
    from seqblocks.presets import PRESETS
    from seqblocks.registry import FFNS, MIXERS, NORMS, POSITIONS
    from seqblocks.tasks import TASKS, task_options

    sections = {}
    for title, registry in (("mixers", MIXERS), ("ffns", FFNS), ("norms", NORMS), ("positions", POSITIONS)):
        sections[title] = {name: registry.describe(name) for name in registry.keys()}
    sections["presets"] = {name: p["description"] for name, p in sorted(PRESETS.items())}
    sections["tasks"] = {name: TASKS.describe(name) for name in TASKS.keys()}
    if args.json:
        _out(json.dumps(sections, indent=2))
        return 0
    for title, entries in sections.items():
        _out(f"{title}:")
        width = max(len(n) for n in entries) if entries else 0
        for name, description in entries.items():
            line = f"  {name:<{width}}  {description}"
            if title == "presets":
                model = PRESETS[name]["model"]
                mixers = model.get("mixer_types", [model.get("token_mixer", "attention")])
                missing = [m for m in mixers if m != "attention" and m not in MIXERS]
                if missing:
                    line += f"  [unavailable: mixer(s) {sorted(set(missing))} not registered]"
            if title == "tasks":
                opts = ", ".join(f"{k}={v!r}" for k, v in task_options(name).items())
                line += f"\n  {'':<{width}}  options: {opts}"
            _out(line)
        _out()
    return 0


# ---------------------------------------------------------------- info


def _build_for_info(model_config: dict[str, Any]):
    """The model on the meta device (no memory, fast even at 130M); on CPU if a mixer's init needs real tensors."""
    from seqblocks.presets import build_model

    try:
        with torch.device("meta"):
            return build_model(model_config), "meta"
    except (RuntimeError, NotImplementedError, TypeError):
        return build_model(model_config), "cpu"


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def model_summary(model: torch.nn.Module, model_config: dict[str, Any], seq_len: int, batch_size: int) -> dict:
    """Parameter counts, per-layer pattern and memory estimates of a model (any device, meta included)."""
    from seqblocks.params import count_parameters

    total, active = count_parameters(model)
    embedding = model.embedding.weight.numel() if hasattr(model, "embedding") else 0
    layers = []
    for i, layer in enumerate(getattr(model, "layers", [])):
        mixer = getattr(layer, "mixer", None)
        mlp = getattr(layer, "mlp", None)
        layers.append({
            "layer": i, "mixer": model.config.mixer_types[i], "class": type(mixer).__name__,
            "mixer_params": sum(p.numel() for p in mixer.parameters()) if mixer is not None else 0,
            "mlp": type(mlp).__name__ if mlp is not None else None,
            "mlp_params": sum(p.numel() for p in mlp.parameters()) if mlp is not None else 0,
        })
    cache_bytes, cache_note = None, ""
    try:
        cache = model.allocate_inference_cache(1, seq_len, dtype=torch.bfloat16)
        cache_bytes = _tensor_bytes(dict(cache))
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as err:
        cache_note = f"cannot allocate a decode cache: {err}"
    d, n_layer = model.config.d_model, model.config.n_layer
    # A rough floor for training activations: a few [B, T, D] tensors per layer kept for backward,
    # plus fp32 logits; the mixers' internal expansions (Mamba's 2x width, attention scores) add more.
    activations = batch_size * seq_len * (16 * d * n_layer * 2 + 4 * model.vocab_size * 3)
    return {
        "parameters": total, "active_parameters": active, "embedding_parameters": embedding,
        "non_embedding_parameters": total - embedding,
        "layers": layers,
        "memory": {
            "weights_fp32": 4 * total, "weights_bf16": 2 * total,
            "train_state_fp32_adamw": 16 * total,
            "activations_estimate": activations,
            "decode_cache_per_sequence_bf16": cache_bytes,
        },
        "seq_len": seq_len, "batch_size": batch_size, "note": cache_note,
    }


def cmd_info(args: argparse.Namespace) -> int:
    import seqblocks  # noqa: F401
    from seqblocks.presets import DEFAULT_PRESET, load_config
    from seqblocks.train.config import TrainConfig

    name = args.config or DEFAULT_PRESET
    config = load_config(name)
    model_config = dict(config["model"])
    if args.vocab_size is not None:
        model_config["vocab_size"] = args.vocab_size
    train_cfg = {**TrainConfig().to_dict(), **config["train"]}
    seq_len = args.seq_len or train_cfg["task_options"].get("seq_len", 128)
    batch_size = args.batch_size or train_cfg["batch_size"]
    model, where = _build_for_info(model_config)
    if not hasattr(model, "vocab_size"):  # another model kind (an image classifier): no LM summary
        return _info_other(model, config, args.json)
    summary = model_summary(model, model_config, seq_len, batch_size)
    summary["source"] = config["source"]
    if args.json:
        _out(json.dumps(summary, indent=2))
        return 0
    _out(f"{config['source']}: {config['description']}".rstrip(": "))
    _out(f"parameters: {summary['parameters']:,} ({summary['parameters'] / 1e6:.2f}M; "
         f"{summary['non_embedding_parameters']:,} without the embedding)")
    _out(f"active parameters per token: {summary['active_parameters']:,} "
         f"({summary['active_parameters'] / 1e6:.2f}M; fewer than all only with mixture-of-experts layers)")
    _out(f"d_model {model_config['d_model']}, d_state {model_config.get('d_state', 'per mixer')}, "
         f"vocab {model_config['vocab_size']}, "
         f"d_intermediate {model_config.get('d_intermediate', 0)}")
    _out("layers:")
    for row in summary["layers"]:
        mlp = f" + {row['mlp']} ({row['mlp_params']:,})" if row["mlp"] else ""
        _out(f"  {row['layer']:>3}  {row['mixer']:<10} {row['class']:<24} {row['mixer_params']:>12,}{mlp}")
    mem = summary["memory"]
    _out(f"memory (batch {batch_size} x seq_len {seq_len}):")
    _out(f"  weights              {_human(mem['weights_fp32'])} fp32 / {_human(mem['weights_bf16'])} bf16")
    _out(f"  training state       {_human(mem['train_state_fp32_adamw'])} (fp32 weights + grads + AdamW moments)")
    _out(f"  activations (rough)  {_human(mem['activations_estimate'])}")
    cache = mem["decode_cache_per_sequence_bf16"]
    _out(f"  decode cache         {_human(cache) + ' per sequence (bf16)' if cache is not None else summary['note']}")
    return 0


def _info_other(model: torch.nn.Module, config: dict[str, Any], as_json: bool) -> int:
    """``seqblocks info`` of a model that is not a language model: parameters, layers, weights."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    mixers = model.mixers() if hasattr(model, "mixers") else []
    summary = {"source": config["source"], "model_type": type(model).__name__, "parameters": total,
               "layers": [{"layer": i, "class": type(m).__name__,
                           "mixer_params": sum(p.numel() for p in m.parameters())} for i, m in enumerate(mixers)],
               "memory": {"weights_fp32": 4 * total, "weights_bf16": 2 * total, "train_state_fp32_adamw": 16 * total}}
    if as_json:
        _out(json.dumps(summary, indent=2))
        return 0
    _out(f"{config['source']}: {config['description']}".rstrip(": "))
    _out(f"{type(model).__name__}, parameters: {total:,} ({total / 1e6:.2f}M)")
    _out("layers:")
    for row in summary["layers"]:
        _out(f"  {row['layer']:>3}  {row['class']:<24} {row['mixer_params']:>12,}")
    _out(f"memory: weights {_human(4 * total)} fp32 / {_human(2 * total)} bf16, training state "
         f"{_human(16 * total)} (fp32 weights + grads + AdamW moments)")
    return 0


# ---------------------------------------------------------------- train


_TRAIN_FLAGS = ("steps", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                "grad_clip", "seed", "precision", "compile", "compile_backend", "parallel", "device", "eval_every",
                "eval_batch_size", "ckpt_every", "keep_checkpoints", "log_every", "sample_tokens", "sample_prompt",
                "sample_temperature", "activation_checkpointing", "eval_steps")
_TRAIN_FLAGS += ("seq_len_warmup", "seq_len_start")  # the curriculum (seqblocks.train.curriculum)
_TRAIN_FLAGS += ("fsdp_param_dtype", "fsdp_reduce_dtype", "fsdp_reshard_after_forward", "checkpoint_format")
_TRAIN_FLAGS += ("context_parallel", "context_parallel_attention")  # seqblocks.parallel


def train_config_from_args(args: argparse.Namespace, preset_train: dict[str, Any]):
    """TrainConfig defaults, overridden by the preset's ``train`` section, overridden by the flags given."""
    from seqblocks.train.config import TrainConfig

    values = {**TrainConfig().to_dict(), **preset_train}
    if args.task is not None and args.task != values["task"]:
        values["task"], values["task_options"] = args.task, {}
    values["task_options"] = {**values["task_options"], **parse_task_options(args.task_opt)}
    for flag in _TRAIN_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            values[flag] = value
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown training options {unknown} in the config's 'train' section; valid: "
                         f"{sorted(f.name for f in dataclasses.fields(TrainConfig))}")
    return TrainConfig.from_dict(values)


def _run_spec(args: argparse.Namespace):
    """The run file (``--config``) with its dotted overrides, ``--data`` and ``--tokenizer`` applied, or
    None when none of them is given (the preset alone describes the run)."""
    from seqblocks.train.config_file import load_run_file, parse_overrides, resolve_run

    overrides = parse_overrides(getattr(args, "overrides", []) or [])
    if args.data:
        overrides["data.path"] = args.data if len(args.data) > 1 else args.data[0]
    if args.tokenizer is not None:
        overrides["tokenizer.name"] = args.tokenizer
    if args.config is not None:
        overrides.setdefault("model.preset", args.config)
    if args.run_file is None and not (set(overrides) - {"model.preset"}):
        return None
    if args.run_file is not None:
        return load_run_file(args.run_file, overrides)
    return resolve_run({}, overrides, "command line")


def _prepare_run_data(spec, out: Path, progress: bool) -> None:
    """Point the run at its data: a prepared directory as it is, text sources prepared into ``OUT/data``."""
    from seqblocks.data import is_prepared, prepare
    from seqblocks.tokenizers import load_tokenizer

    path = spec.data.pop("path", None)
    if path is None:
        if spec.tokenizer is not None:
            raise ValueError(f"{spec.source}: tokenizer.name / --tokenizer is the tokenizer of your own text; give "
                             f"the text too (data.path / --data)")
        if spec.data:
            raise ValueError(f"{spec.source}: data.{sorted(spec.data)[0]} prepares your own text; give the text "
                             f"too (data.path / --data)")
        return
    if isinstance(path, str) and is_prepared(path):
        from seqblocks.data import Shards

        if spec.tokenizer is not None and load_tokenizer(spec.tokenizer).to_dict() != Shards(path).manifest[
                "tokenizer"]:
            raise ValueError(f"{path} was prepared with another tokenizer than {spec.tokenizer!r}; prepare it "
                             f"again with that tokenizer, or leave --tokenizer out")
        if spec.data:
            print(f"seqblocks train: {path} is prepared already; data.{', data.'.join(sorted(spec.data))} "
                  f"(options of preparing) are not used", file=sys.stderr)
        data_dir = Path(path)
    else:
        data_dir = out / "data"
        options = {k: spec.data[k] for k in ("val_fraction", "text_field", "workers", "shard_tokens") if k in spec.data}
        options.setdefault("val_fraction", 0.05)
        print(f"seqblocks train: preparing {path} into {data_dir}", file=sys.stderr, flush=True)
        manifest = prepare(path, spec.tokenizer or "char", data_dir, progress=progress, **options)
        split = manifest["splits"]
        print(f"seqblocks train: {split['train']['tokens']:,} training and {split['val']['tokens']:,} validation "
              f"tokens ({split['train']['documents']} + {split['val']['documents']} documents)", file=sys.stderr)
    spec.train["task_options"] = {**spec.train.get("task_options", {}), "path": str(data_dir.resolve())}


def _task_preset(task: str | None) -> str | None:
    """The preset a task trains with when no --config is given (an image task's classifier), else None."""
    if task is None:
        return None
    from seqblocks.tasks import TASKS

    try:
        return getattr(TASKS.get(task), "default_preset", None)
    except ValueError:  # an unknown task: the run reports it with the valid names
        return None


def cmd_train(args: argparse.Namespace) -> int:
    import seqblocks  # noqa: F401
    from seqblocks.presets import DEFAULT_PRESET, load_config
    from seqblocks.tasks import CharTokenizer
    from seqblocks.train import train

    # an image task trains its own preset's classifier (Task.default_preset) when no --config is given
    name = args.config or _task_preset(args.task) or DEFAULT_PRESET
    stem = Path(args.run_file).stem if args.run_file else Path(name).stem
    out = Path(args.out) if args.out else Path("runs") / stem
    if args.resume:
        if args.config is not None or args.task is not None or args.task_opt or args.run_file or args.data or \
                args.tokenizer or getattr(args, "overrides", None) or any(
                getattr(args, f, None) is not None for f in _TRAIN_FLAGS if f != "steps"):
            print("seqblocks train: --resume continues with the run's saved configuration; the other model and "
                  "training options given (all but --steps) are ignored", file=sys.stderr)
        model_config, config = {}, None
    else:
        from seqblocks.train.models import choose_model_config

        spec = _run_spec(args)
        if spec is None:
            loaded = load_config(name)
            model_config, config = loaded["model"], train_config_from_args(args, loaded["train"])
        else:
            _prepare_run_data(spec, out, progress=not args.no_progress)
            model_config, config = spec.model, train_config_from_args(args, spec.train)
        # the model kind follows the task (an encoder-decoder for seq2seq, a classifier for
        # classification) unless --model or a named config says otherwise
        model_config = choose_model_config(model_config, config.task, getattr(args, "model", None),
                                           explicit=args.config is not None or spec is not None)
    threads = getattr(args, "cpu_threads", None)
    header = [threads] if threads is not None else []

    def log(msg: str) -> None:
        # The thread count heads the run's own messages, once the run directory has been accepted:
        # a refused directory still ends with its one error line.
        while header:
            print(f"seqblocks train: {header.pop().describe()}", file=sys.stderr, flush=True)
        print(msg, file=sys.stderr)

    try:
        result = train(model_config, config, out, resume=args.resume, overwrite=args.overwrite,
                       force_unlock=args.force_unlock, steps=args.steps if args.resume else None,
                       stop_after=args.stop_after, progress=not args.no_progress, log=log,
                       step_hook=threads.update if threads is not None else None)
    finally:
        main_process = _is_main_process()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not main_process:
        return 0
    metrics = result.metrics
    if result.already_complete:
        _out(f"{out}: the run is complete ({result.step} steps); checkpoint: {result.checkpoint}")
        return 0
    if "val_loss" in metrics:
        _out(f"final: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f} "
             f"(ppl {metrics['val_ppl']:.2f}, acc {metrics['val_acc']:.3f})")
    if result.checkpoint is not None:
        _out(f"checkpoint: {result.checkpoint}")
    cfg = result.config
    if result.task.is_language and cfg.sample_tokens > 0 and result.step == cfg.steps:
        unit = "characters" if isinstance(result.task.tokenizer, CharTokenizer) else "tokens"
        _out(f"--- sample ({cfg.sample_tokens} {unit}, temperature {cfg.sample_temperature}) ---")
        stream_sample(result.model.eval(), result.task.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                      temperature=cfg.sample_temperature, seed=cfg.seed)
        _out("---")
        if result.checkpoint is not None:
            _out(f"sample more with: seqblocks generate {out} --prompt {cfg.sample_prompt!r}")
    return 0


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# ---------------------------------------------------------------- checkpoints, sampling


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model, task info dict or None, tokenizer or None) from a checkpoint or run directory."""
    from seqblocks.checkpoint import load_pretrained
    from seqblocks.tokenizers import tokenizer_from_dict
    from seqblocks.train.checkpointing import TASK_FILE, TOKENIZER_FILE, resolve_checkpoint
    from seqblocks.train.models import load_train_model

    ckpt = resolve_checkpoint(path)
    task = json.loads((ckpt / TASK_FILE).read_text()) if (ckpt / TASK_FILE).is_file() else None
    model = load_train_model(ckpt, task, device=device)  # an encoder-decoder's or classifier's
    if model is None:
        model = load_pretrained(ckpt, device=device)
    # The tokenizer the run trained with, whole (char, tiktoken or BPE): nothing to give again.
    tokenizer = tokenizer_from_dict(json.loads((ckpt / TOKENIZER_FILE).read_text())) \
        if (ckpt / TOKENIZER_FILE).is_file() else None
    return model, task, tokenizer, ckpt


def _device(name: str) -> torch.device:
    from seqblocks.train.distributed import resolve_device

    return resolve_device(name)


def _stop_sequences(stop: list[str], tokenizer) -> list[list[int]]:
    """``--stop`` values -> token-id sequences: each whole string (several characters allowed), or ids
    separated by spaces for checkpoints without a tokenizer."""
    sequences = []
    for text in stop:
        if not text:
            raise ValueError("--stop '' is empty; give the text (or token ids) to stop after")
        if tokenizer is None:
            try:
                sequences.append([int(t) for t in text.split()])
            except ValueError:
                raise ValueError(f"this checkpoint has no tokenizer: give --stop as token ids separated by spaces, "
                                 f"got {text!r}") from None
            continue
        ids = tokenizer.encode(text)
        unk_id = getattr(tokenizer, "unk_id", None)
        unknown = sorted({ch for ch, i in zip(text, ids) if unk_id is not None and i == unk_id})
        if unknown:
            raise ValueError(f"--stop {text!r}: the tokenizer has no {', '.join(map(repr, unknown))}, so the model "
                             f"never generates it")
        sequences.append(ids)
    return sequences


def stream_sample(model, tokenizer, prompt: str, max_new_tokens: int, *, stream: bool = True,
                  stop: list[str] | None = None, **options: Any) -> str:
    """Generate after ``prompt`` with ``seqblocks.generation.generate`` and print the text as it comes.

    ``tokenizer`` None means token ids: the prompt is ids separated by spaces, and so is the output.
    ``stop`` holds stop strings: generation ends after the first one generated (kept in the text).
    Every argument is checked before anything is printed, and an error during generation starts on
    a line of its own. Returns the generated text (without the prompt).
    """
    from seqblocks.generation import check_sampling_options, generate

    device = next(model.parameters()).device
    if tokenizer is not None:
        ids = tokenizer.encode(prompt)
        decode = tokenizer.decode
    else:
        try:
            ids = [int(t) for t in prompt.split()]
        except ValueError:
            raise ValueError(f"this checkpoint has no tokenizer: give the prompt as token ids separated by "
                             f"spaces, got {prompt!r}") from None
        decode = lambda toks: "".join(f" {t}" for t in toks)
    if not ids:
        raise ValueError("the prompt is empty; give at least one character (or token id)")
    stop_sequences = _stop_sequences(stop or [], tokenizer)
    check_sampling_options(**{k: v for k, v in options.items() if k in (
        "temperature", "top_k", "top_p", "min_p", "repetition_penalty")})
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"the number of new tokens ({max_new_tokens!r}) must be a positive integer")
    pieces: list[str] = []
    generated: list[int] = []
    streamed = False

    def emit(piece: str) -> None:
        pieces.append(piece)
        if stream:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def on_token(tokens: torch.Tensor, active: torch.Tensor) -> None:
        # Decoded as a whole and printed as it grows: a BPE token may hold part of a character, so a
        # trailing replacement character waits for the tokens that complete it.
        if bool(active[0]):
            generated.append(int(tokens[0]))
            text = decode(generated)
            done = len("".join(pieces))
            if tokenizer is None or not text.endswith("\ufffd"):
                emit(text[done:])

    if stream:
        sys.stdout.write(prompt if tokenizer is not None else " ".join(str(i) for i in ids))
        sys.stdout.flush()
        streamed = True
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            generate(model, input_ids, max_new_tokens, stop_sequences=stop_sequences or None, callback=on_token,
                     **options)
        rest = decode(generated)[len("".join(pieces)):] if generated else ""
        if rest:
            emit(rest)
    finally:
        if streamed:  # end the streamed line, so whatever follows (an error too) starts on its own
            sys.stdout.write("\n")
            sys.stdout.flush()
    return "".join(pieces)


def cmd_generate(args: argparse.Namespace) -> int:
    import secrets

    from seqblocks.generation import check_sampling_options

    device = _device(args.device)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples {args.num_samples} must be at least 1")
    temperature = 0.0 if args.greedy else args.temperature
    options = {"temperature": temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
               "repetition_penalty": args.repetition_penalty}
    check_sampling_options(**options)  # before loading: a bad flag costs no time
    model, _, tokenizer, ckpt = load_checkpoint(args.checkpoint, device=device)
    # A fresh seed unless --seed is given, printed so that any sample can be drawn again.
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    print(f"[{ckpt}, seed {seed}{'' if args.seed is not None else '; --seed ' + str(seed) + ' repeats this'}]",
          file=sys.stderr, flush=True)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            _out(f"--- sample {i + 1} (seed {seed + i}) ---")
        text = stream_sample(model, tokenizer, args.prompt, args.max_new_tokens, stream=not args.no_stream,
                             stop=args.stop, seed=seed + i, **options)
        if args.no_stream:
            _out(args.prompt + text)
    return 0


# ---------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    from seqblocks.serving import Engine
    from seqblocks.serving.server import serve

    device = _device(args.device)
    model, _, tokenizer, ckpt = load_checkpoint(args.checkpoint, device=device)
    engine = Engine(model.eval(), max_batch_size=args.max_batch_size, max_seqlen=args.max_seqlen,
                    prefill_chunk_size=args.prefill_chunk_size, cuda_graph=args.cuda_graph)
    if args.cuda_graph:
        engine.capture_graphs()  # every bucket's graph before the first request
    name = args.model_name or Path(ckpt).resolve().name
    print(f"[serving {ckpt} as {name!r} on http://{args.host}:{args.port}, {args.max_batch_size} slots]",
          file=sys.stderr, flush=True)
    serve(engine, tokenizer, host=args.host, port=args.port, model_name=name, max_queue=args.max_queue,
          request_timeout=args.request_timeout)
    return 0


# ---------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from seqblocks.tasks import get_task
    from seqblocks.train import evaluate
    from seqblocks.train.checkpointing import load_train_state

    device = _device(args.device)
    model, task_info, _, ckpt = load_checkpoint(args.checkpoint, device=device)
    if args.task is not None:
        name, options = args.task, parse_task_options(args.task_opt)
    elif task_info is not None:
        name, options = task_info["name"], {**task_info["options"], **parse_task_options(args.task_opt)}
    else:
        raise ValueError(f"{ckpt} does not say which task it was trained on; give --task")
    task = get_task(name, **options)
    from seqblocks.train.models import kind_of_model

    if kind_of_model(model) == "image_classifier":  # the width of its output: the classes
        if task.vocab_size > model.config.num_classes:
            raise ValueError(f"task {name!r} has {task.vocab_size} classes but the model only "
                             f"{model.config.num_classes}")
    elif task.vocab_size > getattr(model, "vocab_size", task.vocab_size):
        raise ValueError(f"task {name!r} has {task.vocab_size} tokens but the model only {model.vocab_size}")
    seed = args.seed
    if seed is None:
        try:
            state = load_train_state(ckpt)  # a post-training checkpoint keeps its run's config as "config"
            seed = state.get("train_config", state.get("config", {})).get("seed", 0)
        except FileNotFoundError:
            seed = 0
    result = evaluate(model, task, args.batch_size, device, args.precision, seed)
    result = {"checkpoint": str(ckpt), "task": name, **result}
    if args.json:
        _out(json.dumps(result))
    else:
        _out(f"{ckpt} on {name} (held-out split, {result['tokens']:,} scored tokens): loss {result['loss']:.4f}, "
             f"perplexity {result['ppl']:.3f}, accuracy {result['acc']:.4f}, sequence accuracy {result['seq_acc']:.4f}")
    return 0


# ---------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from seqblocks.cli import bench

    if args.what == "tasks":
        return bench.run_task_bench(args)
    if args.what == "mup":
        return bench.run_mup_bench(args)
    return bench.run_speed_bench(args)


# ---------------------------------------------------------------- convert


def cmd_convert(args: argparse.Namespace) -> int:
    from seqblocks.interop import convert, folder_kind

    try:
        kind = folder_kind(args.src)
        dst = convert(args.src, args.dst, to=args.to, family=args.family, dtype=args.dtype, overwrite=args.overwrite)
    except NotADirectoryError as err:
        raise ValueError(str(err)) from None
    target = args.to or ("hf" if kind == "seqblocks" else "seqblocks")
    config = json.loads((Path(dst) / "config.json").read_text())
    what = config.get("architectures", [config.get("model_type", "mamba_ssm MambaLMHeadModel")])[0]
    _out(f"{args.src} ({kind}) -> {dst} ({target}: {what})")
# ---------------------------------------------------------------- tokenizer, prepare


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from seqblocks.data import iter_documents
    from seqblocks.tokenizers import train_bpe

    out = Path(args.out)
    tokenizer = train_bpe(iter_documents(args.sources, args.text_field), args.vocab_size,
                          min_frequency=args.min_frequency)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    _out(f"{out}: byte-level BPE, {tokenizer.vocab_size:,} tokens (end of document: {tokenizer.eos!r}); use it with "
         f"--tokenizer {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from seqblocks.data import prepare

    manifest = prepare(args.sources, args.tokenizer, args.out, val_fraction=args.val_fraction,
                       text_field=args.text_field, shard_tokens=args.shard_tokens, workers=args.workers,
                       progress=not args.no_progress)
    for split in ("train", "val"):
        info = manifest["splits"][split]
        _out(f"{split}: {info['tokens']:,} tokens, {info['documents']:,} documents, {len(info['shards'])} shard(s)")
    _out(f"{args.out}: {manifest['dtype']} shards, vocabulary {manifest['vocab_size']:,}; train on it with "
         f"seqblocks train --data {args.out}")
    return 0
