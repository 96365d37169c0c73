"""The model card (``README.md``) that ``save_pretrained`` writes next to a checkpoint.

Everything in it is read from the model: its class, parameter count, width, layer pattern (each
layer's mixer and MLP, with the registry's one-line description of the mixer) and weight dtype. When
``seqblocks train`` writes the checkpoint it adds how the model was trained: the task, the steps and
tokens, the learning rate, the seed and the validation result at that step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["model_card_markdown", "compress_pattern"]


def _count(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def compress_pattern(names: list[str]) -> str:
    """``["a", "b", "a", "b"]`` -> ``"(a, b) x 2"``; ``["m"] * 3`` -> ``"m x 3"``; otherwise the list."""
    n = len(names)
    for period in range(1, n // 2 + 1):
        if n % period == 0 and names == names[:period] * (n // period):
            unit = names[:period]
            return f"{unit[0]} x {n}" if period == 1 else f"({', '.join(unit)}) x {n // period}"
    return ", ".join(names)


def _mixer_name(mixer: nn.Module) -> tuple[str, str]:
    """(registry name, description) of a mixer module; its class name and "" when it is not registered."""
    from seqblocks.registry import MIXERS

    for name in MIXERS.primary_names():
        if MIXERS.get(name) is type(mixer):
            return name, MIXERS.describe(name)
    return type(mixer).__name__, ""


def _layers(model: nn.Module, config: dict[str, Any]) -> list[dict[str, Any]]:
    mixers = getattr(model, "mixers", None)  # a method of the LMs; a ModuleList attribute of Classifier
    mixers = list(mixers) if isinstance(mixers, nn.ModuleList) else (mixers() if callable(mixers) else [])
    # The names the config gives the layers (each LayerConfig's mixer name, or the mixer_types of the
    # constructor-argument form), else the registry's.
    given = config.get("mixer_types")
    layer_configs = config.get("layers")
    if given is None and isinstance(layer_configs, list):
        given = [entry.get("mixer") if isinstance(entry, dict) else None for entry in layer_configs]
    given = given if isinstance(given, list) and len(given) == len(mixers) else [None] * len(mixers)
    rows = []
    for i, (layer, mixer) in enumerate(zip(getattr(model, "layers", []), mixers)):
        name, description = _mixer_name(mixer)
        name = given[i] if isinstance(given[i], str) else name
        mlp = getattr(layer, "mlp", None) if hasattr(layer, "mlp") else getattr(layer, "ffn", None)
        if mlp is not None and getattr(mlp, "is_identity", False):
            mlp = None
        rows.append({"layer": i, "mixer": name, "class": type(mixer).__name__, "description": description,
                     "mixer_params": _count(mixer), "mlp": type(mlp).__name__ if mlp is not None else None,
                     "mlp_params": _count(mlp)})
    return rows


def _training_section(training: dict[str, Any]) -> list[str]:
    task = training.get("task", "?")
    about = f": {training['task_description']}" if training.get("task_description") else ""
    options = training.get("task_options") or {}
    step, steps = training.get("step"), training.get("steps")
    schedule = f"{step:,} of {steps:,} steps" if step is not None and steps is not None else "some steps"
    lines = ["## Training", "",
             f"Trained with `seqblocks train` for {schedule} on the task `{task}`{about}."]
    if options:
        lines.append("Task options: " + ", ".join(f"`{k}={v!r}`" for k, v in sorted(options.items())) + ".")
    per_step = []
    if training.get("batch_size") is not None and training.get("seq_len") is not None:
        per_step.append(f"{training['batch_size']} sequences of {training['seq_len']} tokens per step")
    if training.get("tokens") is not None:
        per_step.append(f"{training['tokens']:,} tokens in all")
    if training.get("lr") is not None:
        per_step.append(f"peak learning rate {training['lr']:g} (AdamW, warmup then cosine decay)")
    if training.get("seed") is not None:
        per_step.append(f"seed {training['seed']}")
    if training.get("precision"):
        per_step.append(f"precision {training['precision']}")
    if training.get("world_size", 1) > 1:
        per_step.append(f"{training['world_size']} processes")
    if per_step:
        text = "; ".join(per_step)
        lines.append(text[0].upper() + text[1:] + ".")
    result = training.get("eval")
    if result:
        lines.append(f"Held-out split at this step: loss {result['loss']:.4f} nats per scored token, perplexity "
                     f"{result['ppl']:.2f}, accuracy {result['acc']:.3f}.")
    return lines + [""]


def model_card_markdown(model: nn.Module, config: dict[str, Any], training: dict[str, Any] | None = None) -> str:
    """The body of the model card of ``model`` (markdown, without the metadata header).

    Args:
        model (nn.Module): a seqblocks model (``CheckpointMixin``).
        config (dict): its ``full_checkpoint_config()``.
        training (dict | None): how it was trained, as ``seqblocks train`` records it: ``task``,
            ``task_description``, ``task_options``, ``is_language``, ``step``, ``steps``, ``batch_size``, ``seq_len``,
            ``tokens``, ``lr``, ``seed``, ``precision``, ``world_size``, ``eval`` (``loss`` / ``ppl`` /
            ``acc``). Every key is optional. Default: None (the card says training is not recorded).
    """
    cls = type(model)
    total = _count(model)
    embedding = getattr(getattr(model, "embedding", None), "weight", None)
    layers = _layers(model, config)
    d_model = getattr(model, "d_model", config.get("d_model"))
    pattern = compress_pattern([row["mixer"] for row in layers]) if layers else None

    summary = f"A seqblocks `{cls.__name__}` with {total:,} parameters ({total / 1e6:.2f}M)"
    if layers:
        summary += f": {len(layers)} layers of width {d_model}, mixers {pattern}"
    lines = [f"# {cls.__name__}", "", summary + ".", "", "## Architecture", "",
             "| | |", "| --- | --- |", f"| class | `{cls.__module__}.{cls.__name__}` |"]
    params = f"{total:,}"
    if embedding is not None:
        tied = getattr(model, "tie_embeddings", False)
        params += f" ({embedding.numel():,} in the token embedding{', shared with the output head' if tied else ''})"
    lines.append(f"| parameters | {params} |")
    if d_model is not None:
        lines.append(f"| width (d_model) | {d_model} |")
    if layers:
        lines.append(f"| layers | {len(layers)}: {pattern} |")
    if hasattr(model, "vocab_size"):
        padded = getattr(model, "padded_vocab_size", model.vocab_size)
        vocab = f"{model.vocab_size}" + (f" (embedding padded to {padded} rows)" if padded != model.vocab_size else "")
        lines.append(f"| vocabulary | {vocab} |")
    if config.get("torch_dtype"):
        lines.append(f"| weights | {config['torch_dtype']} |")
    lines.append(f"| seqblocks version | {config.get('seqblocks_version', '?')} |")
    lines.append("")
    if layers:
        lines += ["| layer | mixer | what it is | mixer parameters | MLP | MLP parameters |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in layers:
            mixer = row["mixer"] if row["mixer"] == row["class"] else f"{row['mixer']} (`{row['class']}`)"
            what = row["description"].replace("|", "\\|") or "-"
            lines.append(f"| {row['layer']} | {mixer} | {what} | {row['mixer_params']:,} | {row['mlp'] or '-'} | "
                         f"{row['mlp_params']:,} |")
        lines.append("")
    lines += ["Every constructor argument is in `config.json`.", ""]
    if training:
        lines += _training_section(training)
    else:
        lines += ["## Training", "", "Written by `save_pretrained`; how the model was trained is not recorded here.",
                  ""]
    lines += ["## Use", "", "```python", "from seqblocks.checkpoint import load_pretrained", "",
              'model = load_pretrained("path/to/this/directory")  # a local directory or a Hub id', "```", ""]
    if training:
        lines += ["From the command line (the checkpoint holds its task, and the tokenizer of a text task):", "",
                  "```bash"]
        if training.get("is_language"):
            lines.append('seqblocks generate path/to/this/directory --prompt "def "')
        lines += ["seqblocks eval path/to/this/directory", "```", ""]
    return "\n".join(lines)
