"""What the trainer trains: a causal LM, an encoder-decoder, a classifier or an image classifier,
chosen by the model config.

A model config is a dict. Its ``"model"`` key names the kind (``MODEL_KINDS``); without one it is a
causal LM (``LRNNLMHeadModel`` keyword arguments, as ``seqblocks.presets`` writes them), or an image
classifier when its ``"model_type"`` names one of ``seqblocks.presets.MODEL_KINDS`` (a
``VisionTransformer``, as the ``vit-tiny`` / ``vim-tiny`` presets write it). The other keys are the
model's constructor arguments; the sizes a task fixes are set from the task:

- ``"causal_lm"``: ``LRNNLMHeadModel`` (``vocab_size`` from the task); trains on "lm" tasks, packed
  rows (``Batch.document_ids``) included.
- ``"encoder_decoder"``: ``TransformerEncoderDecoder`` (``src_vocab_size`` from the task); trains on
  "seq2seq" tasks, teacher-forced.
- ``"classifier"``: ``Classifier`` over token ids (``vocab_size`` and ``num_classes`` from the task);
  trains on "classification" tasks.
- ``"image_classifier"``: the ``seqblocks.presets.MODEL_KINDS`` model its ``model_type`` names
  (default ``VisionTransformer``; ``num_classes``, ``image_size``, ``num_channels`` from the task,
  ``Task.model_fields``); trains on "image" tasks (``shapes``), images [B, C, H, W] to [B, C] logits.

``forward_logits`` runs any of them on a ``Batch`` and returns logits shaped like the batch's
targets, so the loss, evaluation and accuracy code is one for all kinds. Token id 0 is padding in a
seq2seq source and a classifier's input (the encoder masks it; the classifier pools the prefix
before it), as the embedded seq2seq and classification tasks write them.

Shapes: B batch, T time, S source length, V vocabulary, C classes (and an image's channels, where said).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqblocks.tasks import Batch, Task

PAD_ID = 0  # padding of seq2seq sources and classifier inputs
__all__ = ["MODEL_KINDS", "DEFAULT_MODEL_CONFIGS", "choose_model_config", "model_kind", "kind_of_model",
           "build_train_model", "forward_logits", "save_train_model", "load_train_model", "activation_checkpointing"]

MODEL_KINDS = ("causal_lm", "encoder_decoder", "classifier", "image_classifier")
_TASK_KIND = {"causal_lm": "lm", "encoder_decoder": "seq2seq", "classifier": "classification",
              "image_classifier": "image"}
#: the preset whose model an image-classifier config defaults to
_IMAGE_PRESET = "vit-tiny"


#: The model ``seqblocks train`` builds for a kind when the config given is of another kind: small
#: enough to train on a CPU in minutes.
DEFAULT_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "encoder_decoder": {"model": "encoder_decoder", "d_model": 64, "num_heads": 4, "d_ff": 128,
                        "num_encoder_layers": 2, "num_decoder_layers": 2, "max_seq_len": 512},
    "classifier": {"model": "classifier", "d_model": 64, "d_state": 16, "n_layers": 2, "lrnn_cls": "s4d",
                   "pooling": "mean", "dropout": 0.1},
}


def choose_model_config(model_config: dict[str, Any], task_name: str, kind: str | None = None, *,
                        explicit: bool = False) -> dict[str, Any]:
    """The model config ``seqblocks train`` trains: ``model_config`` when it fits the task, else the
    default config of the kind the task needs (``DEFAULT_MODEL_CONFIGS``).

    Args:
        model_config (dict): the preset's or config file's model.
        task_name (str): the task (``seqblocks.tasks.TASKS``).
        kind (str | None): the kind asked for (``--model``); None: the one the task needs. Default: None.
        explicit (bool): ``model_config`` was chosen by the user (a config named on the command line):
            it is kept as it is unless ``kind`` asks for another kind. Default: False.

    Raises:
        ValueError: an unknown kind or task.
    """
    from seqblocks.tasks import TASKS

    have = model_kind(model_config)
    if kind is None:
        if explicit:
            return model_config
        need = getattr(TASKS.get(task_name), "kind", "lm")
        kind = next(k for k, v in _TASK_KIND.items() if v == need)
    elif kind not in MODEL_KINDS:
        raise ValueError(f"--model {kind!r}: expected one of {MODEL_KINDS}")
    if kind == have:
        return model_config
    if kind in ("causal_lm", "image_classifier"):
        from seqblocks.presets import DEFAULT_PRESET, get_preset

        return get_preset(DEFAULT_PRESET if kind == "causal_lm" else _IMAGE_PRESET)["model"]
    return dict(DEFAULT_MODEL_CONFIGS[kind])


def model_kind(model_config: dict[str, Any]) -> str:
    """The kind a model config names: its ``"model"`` key; without one ``"image_classifier"`` when its
    ``"model_type"`` is one of ``seqblocks.presets.MODEL_KINDS``, else ``"causal_lm"``.

    Raises:
        ValueError: an unknown kind.
    """
    kind = model_config.get("model")
    if kind is None:
        from seqblocks.presets import MODEL_KINDS as IMAGE_MODEL_TYPES

        kind = "image_classifier" if model_config.get("model_type") in IMAGE_MODEL_TYPES else "causal_lm"
    if kind not in MODEL_KINDS:
        raise ValueError(f"model config: model={kind!r} is not a model kind the trainer builds; expected one of "
                         f"{MODEL_KINDS}")
    return kind


def kind_of_model(model: nn.Module) -> str:
    """The kind of a built model (a DDP / compile wrapper is looked through)."""
    from seqblocks.models.classifier import Classifier
    from seqblocks.models.transformer import TransformerEncoderDecoder
    from seqblocks.models.vit import VisionTransformer

    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner) if isinstance(inner, nn.parallel.DistributedDataParallel) else inner
    if isinstance(inner, TransformerEncoderDecoder):
        return "encoder_decoder"
    if isinstance(inner, VisionTransformer):
        return "image_classifier"
    return "classifier" if isinstance(inner, Classifier) else "causal_lm"


def check_task_fits(model_config: dict[str, Any], task: Task) -> None:
    """The task's kind must be the one the model trains on (``ValueError`` naming both)."""
    kind = model_kind(model_config)
    wanted = _TASK_KIND[kind]
    got = getattr(task, "kind", "lm")
    if got != wanted:
        fits = [k for k, v in _TASK_KIND.items() if v == got]
        raise ValueError(f"task {task.name!r} is a {got!r} task, which a {kind} cannot train on; it needs "
                         f"model={fits[0]!r} in the model config (a {kind} trains on {wanted!r} tasks)")


def build_train_model(model_config: dict[str, Any], task: Task | None = None, device=None, dtype=None) -> nn.Module:
    """The model a config describes, with the sizes ``task`` fixes (vocabulary, classes).

    Raises:
        ValueError: an unknown kind, a task of another kind, and the model's own config errors.
    """
    kind = model_kind(model_config)
    args = {k: v for k, v in model_config.items() if k != "model"}
    if task is not None:
        check_task_fits(model_config, task)
    if kind == "causal_lm":
        from seqblocks.presets import build_model

        return build_model(args, vocab_size=None if task is None else task.vocab_size, device=device, dtype=dtype)
    if kind == "image_classifier":
        from seqblocks.presets import build_model

        args.setdefault("model_type", "VisionTransformer")
        args.pop("vocab_size", None)
        if task is not None:
            args.update(task.model_fields())
        return build_model(args, device=device, dtype=dtype)
    if kind == "encoder_decoder":
        from seqblocks.models.transformer import TransformerEncoderDecoder

        args.pop("vocab_size", None)
        if task is not None:
            args["src_vocab_size"] = task.vocab_size
            args["tgt_vocab_size"] = getattr(task, "target_vocab_size", task.vocab_size)
        return TransformerEncoderDecoder(**args, device=device, dtype=dtype)
    from seqblocks.models.classifier import Classifier

    if task is not None:
        args["vocab_size"] = task.vocab_size
        args["num_classes"] = task.num_classes
    return Classifier(**args, device=device, dtype=dtype)


def forward_logits(runner: nn.Module, batch: Batch, kind: str, boundaries: bool = True) -> tuple[Any, torch.Tensor]:
    """(output, logits) of ``runner`` on ``batch``; logits are [B, T, V] for "lm" / "seq2seq" batches and
    [B, 1, C] for a classifier or an image classifier (targets [B, 1]); output is the model's own (a
    ``CausalLMOutput`` for a causal LM, whose MTP logits the trainer reads). A causal LM gets the
    batch's ``document_ids`` (each packed document then runs alone) unless ``boundaries`` is False."""
    if kind == "causal_lm":
        extra = {} if batch.document_ids is None or not boundaries else {"document_ids": batch.document_ids}
        out = runner(batch.input_ids, **extra)
        return out, out.logits
    if kind == "encoder_decoder":
        if batch.src_ids is None:
            raise ValueError("an encoder-decoder needs batches with src_ids (a seq2seq task)")
        logits = runner(batch.src_ids, batch.input_ids, src_mask=batch.src_ids != PAD_ID)
        return logits, logits
    if kind == "image_classifier":
        logits = runner(batch.input_ids)[:, None]  # images [B, C, H, W] -> [B, 1, classes]
        return logits, logits
    lengths = (batch.input_ids != PAD_ID).sum(1).clamp(min=1)  # right padding is id 0
    logits = runner(batch.input_ids, lengths=lengths)[:, None]  # [B, 1, C]
    return logits, logits


def save_train_model(module: nn.Module, directory: Path, model_config: dict[str, Any], card: dict[str, Any]) -> None:
    """Write the model into a checkpoint directory: ``save_pretrained`` for a causal LM; for another
    kind ``model.safetensors`` and ``config.json`` (the model config, to rebuild it with
    ``build_train_model``)."""
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(directory, model_card_kwargs={"training": card})
        return
    from seqblocks.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_weights

    save_weights(module, Path(directory) / WEIGHTS_NAME, config=dict(model_config))
    (Path(directory) / CONFIG_NAME).write_text(json.dumps(model_config, indent=2, sort_keys=True))


def load_train_model(directory: Path, task_info: dict[str, Any] | None, device=None) -> nn.Module | None:
    """The encoder-decoder or classifier a checkpoint directory holds (``save_train_model``), rebuilt for
    its task (``task_info``: the checkpoint's ``{"name", "options"}``); None for a causal LM's checkpoint.

    Raises:
        ValueError: such a checkpoint without its task.
    """
    from seqblocks.checkpoint import CONFIG_NAME, load_checkpoint_weights
    from seqblocks.tasks import get_task

    path = Path(directory) / CONFIG_NAME
    config = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(config, dict) or config.get("model") not in ("encoder_decoder", "classifier"):
        return None
    if task_info is None:
        raise ValueError(f"{directory}: a {config['model']} checkpoint is rebuilt for its task, and it names none")
    model = build_train_model(config, get_task(task_info["name"], **task_info["options"]))
    load_checkpoint_weights(model, directory)  # model.safetensors, or a sharded checkpoint's dcp/
    return model.to(device)


def _checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``block``'s own forward, its activations recomputed in the backward pass (a module-level function
    bound with ``functools.partial``, so a deep copy or pickle of the model rebinds it to the copy).

    The recomputation runs under the context-parallel group of the forward (``seqblocks.parallel``):
    the backward pass runs outside the forward's ``with context_parallel(...)`` (on CUDA, on another
    thread), so the group is captured here and re-entered."""
    import contextlib

    from torch.utils.checkpoint import checkpoint

    from seqblocks.parallel.context import current_context_parallel, using_context_parallel

    forward = type(block).forward.__get__(block)
    if not torch.is_grad_enabled():  # evaluation: nothing to save
        return forward(*args, **kwargs)
    cp = current_context_parallel()
    if cp is None:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), using_context_parallel(cp)), **kwargs)


def activation_checkpointing(model: nn.Module, every: int) -> int:
    """Recompute the activations of every ``every``-th block in the backward pass instead of keeping
    them (``torch.utils.checkpoint``, non-reentrant, the RNG state restored so dropout repeats).

    The blocks are the entries of each ``layers`` ``nn.ModuleList`` in ``model`` (a causal LM's,
    an encoder's and a decoder's stack) and a classifier's ``mixers``. Only the forward of each block
    instance is replaced, so parameters, classes and state-dict keys are unchanged. Returns how many
    blocks were wrapped (a block already wrapped is not wrapped again).

    Raises:
        ValueError: ``every`` < 1.
    """
    import functools

    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"activation_checkpointing: every={every!r} must be a positive int")
    wrapped = 0
    for module in model.modules():
        for name in ("layers", "mixers"):
            stack = module._modules.get(name)
            if not isinstance(stack, nn.ModuleList):
                continue
            for i, block in enumerate(stack):
                if i % every or isinstance(block.__dict__.get("forward"), functools.partial):
                    continue
                block.forward = functools.partial(_checkpointed_forward, block)
                wrapped += 1
    return wrapped
